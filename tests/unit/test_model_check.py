"""The driver's model check, in a process of its own (model_check.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import distdl
from distdl.config import ModelConfig
from distdl.errors import UserError
from distdl.models import build_checked, build_model
from distdl.train.model_check import ModelCheck


def test_the_check_counts_the_parameters_and_names_this_torch() -> None:
    model = ModelConfig(width=8)
    check = ModelCheck()
    parameters = check.run(model, num_classes=10, shape=(1, 8, 8), batch=2, cpu_workers=None)
    built = build_model(model, num_classes=10, in_channels=1, image_size=8)
    assert parameters == sum(p.numel() for p in built.parameters())
    assert check.provenance["torch"] == str(torch.__version__)


def test_a_model_that_cannot_train_gets_the_error_line_it_gets_in_process() -> None:
    model, shape = ModelConfig(name="torchvision:alexnet"), (1, 8, 8)
    with pytest.raises(UserError) as here:
        build_checked(model, num_classes=10, shape=shape, batch=2)
    with pytest.raises(UserError) as there:
        ModelCheck().run(model, num_classes=10, shape=shape, batch=2, cpu_workers=None)
    assert str(there.value) == str(here.value)


def test_cpu_workers_without_the_memory_for_the_model_are_refused() -> None:
    with pytest.raises(UserError, match="2 workers training a model of .* need about"):
        ModelCheck().run(ModelConfig(width=64), num_classes=10, shape=(1, 8, 8), batch=2,
                         cpu_workers=(2, 2**20))


def test_a_check_process_that_fails_says_how_instead_of_answering() -> None:
    # A number of classes that is not a number fails in the process, outside the model checks.
    with pytest.raises(RuntimeError, match=r"model check process failed \(exit 1\): TypeError"):
        ModelCheck().run(ModelConfig(), num_classes="ten", shape=(1, 8, 8), batch=2,
                         cpu_workers=None)


def test_a_check_that_is_never_asked_is_stopped() -> None:
    with ModelCheck() as check:
        pass
    assert check._process.returncode is not None


def test_a_driver_that_dies_without_asking_leaves_no_check_process() -> None:
    code = ("import os; from distdl.train.model_check import ModelCheck; "
            "print(ModelCheck()._process.pid, flush=True); os._exit(0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    pid = int(done.stdout)
    deadline = time.monotonic() + 60  # it imports torch first, then finds its stdin closed
    while _running(pid):
        assert time.monotonic() < deadline, "the check process outlived its driver"
        time.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def test_the_check_builds_with_the_distdl_its_driver_imported(tmp_path) -> None:
    """A driver that found distdl through a folder it put on sys.path itself, as jobs/train.py
    does where distdl is not installed: its check must not use another distdl."""
    copy = tmp_path / "copy"
    shutil.copytree(Path(distdl.__file__).parent, copy / "distdl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "distdl" / "__init__.py").write_text('__version__ = "the copy"\n')
    code = (f"import sys; sys.path.insert(0, {str(copy)!r}); "
            "from distdl.config import ModelConfig; "
            "from distdl.train.model_check import ModelCheck; check = ModelCheck(); "
            "check.run(ModelConfig(), num_classes=10, shape=(1, 8, 8), batch=2, "
            "cpu_workers=None); print(check.provenance['distdl'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "the copy"
