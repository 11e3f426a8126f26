"""``simpo-eval`` under the test launcher: argv = config overrides..."""

import sys

from simpo_mcore.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main(sys.argv[1:]))
