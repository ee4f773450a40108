"""Ray job entry point: `ray job submit --working-dir . -- python jobs/train.py --recipe ...`.

The arguments are those of `distdl train`; the exit code is the command's.
"""

import sys

from distdl.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
