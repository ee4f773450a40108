"""Where a result came from: versions, hardware and source revision, recorded with every run."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import distdl


def collect() -> dict[str, Any]:
    import torch

    return {
        "distdl": distdl.__version__,
        "git_revision": git_revision(),
        "ray": _installed_version("ray"),  # not imported: the Ray-free benchmarks run without it
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cuda_devices": torch.cuda.device_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


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
