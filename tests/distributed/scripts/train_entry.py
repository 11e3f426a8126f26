"""``simpo-train`` under the test launcher: argv = config overrides..."""

import sys

from simpo_mcore.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
