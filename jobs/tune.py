"""Ray job entry point: `ray job submit --working-dir . -- python jobs/tune.py --recipe ...`.

The arguments are those of `distdl tune`; the exit code is the command's.
"""

import sys
from pathlib import Path

# The job runs in the uploaded working directory, where distdl may not be installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distdl.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
