"""Ray job entry point: `ray job submit --working-dir . -- python jobs/serve.py CHECKPOINT --detach`.

The arguments are those of `distdl serve`. In a job, Serve runs on the job's cluster, so pass
--detach: the applications keep serving after the job ends. The cluster's nodes need distdl
installed (the KubeRay image has it): Serve replicas import it.
"""

import sys
from pathlib import Path

# The job runs in the uploaded working directory, where distdl may not be installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distdl.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
