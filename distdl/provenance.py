"""Where a result came from: versions, hardware and source revision, recorded with every run."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import distdl


def collect() -> dict[str, Any]:
    import ray
    import torch

    return {
        "distdl": distdl.__version__,
        "git_revision": git_revision(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cuda_devices": torch.cuda.device_count(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def git_revision() -> str:
    """The commit of the distdl source tree, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(distdl.__file__).parent, capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"
