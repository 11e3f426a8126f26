"""``python -m simpo_mcore.convert {hf-to-mcore,mcore-to-hf,tiny} ...`` (see :mod:`simpo_mcore.convert.tool`)."""

import sys

from simpo_mcore.convert.tool import main

if __name__ == "__main__":
    sys.exit(main())
