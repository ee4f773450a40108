"""The driver's check of the model, in a process of its own, so that the driver imports no torch.

`distdl train` refuses a model that cannot train on the data (a bad argument, an input too small
for it, too many parameters for the workers' memory) before any worker starts, which takes
building it once and counting its parameters, and so torch. Imported by the driver before Ray
starts, torch took about 2 s on one core, in series with the rest (README, Benchmark). The
driver starts this process first instead, so torch loads on the other core while the driver
imports Ray and starts it, and sends it one request once the data's shape is known.

    python -m distdl.train.model_check

reads one JSON request on stdin: the model config, the number of classes, the input shape
(C, H, W), the batch of one worker's forward pass and, for CPU workers, their number and the
cluster's memory. It answers one JSON line on stdout: the parameter count and the run's
provenance (torch's version and the GPUs, as this machine's torch sees them), or the error
line of a model that cannot train.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from typing import Any

from distdl.config import ModelConfig
from distdl.errors import UserError

MODULE = "distdl.train.model_check"
# Only bounds a stuck process: the check waits for nothing but its own import and build.
TIMEOUT_S = 300


class ModelCheck:
    """Starts the process at once; `run` asks it, once, and waits for its answer."""

    def __init__(self) -> None:
        # The driver's own import path: it may have found distdl through a folder it added
        # itself (jobs/train.py does, where a cluster has no distdl installed), and the check
        # must build the models of that same distdl.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self._process = subprocess.Popen([sys.executable, "-m", MODULE], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, env=env)
        self.provenance: dict[str, Any] | None = None
        """provenance.collect() as the process found it, once `run` has returned."""

    def run(self, model: ModelConfig, *, num_classes: int, shape: tuple[int, int, int],
            batch: int, cpu_workers: tuple[int, float] | None) -> int:
        """The model's parameter count, or a UserError where it cannot train on `batch`
        images of `shape` (models.build_checked) or, for `cpu_workers` (their number, the
        bytes of memory they share), where they cannot hold it (runtime.check_memory)."""
        request = {"model": dataclasses.asdict(model), "num_classes": num_classes,
                   "shape": list(shape), "batch": batch, "cpu_workers": cpu_workers}
        try:
            out, err = self._process.communicate(json.dumps(request), timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the model check gave no answer in {TIMEOUT_S} s") from None
        finally:
            self.close()
        lines = out.splitlines()
        if self._process.returncode != 0 or not lines:
            last = (err.strip().splitlines() or ["no error output"])[-1]
            raise RuntimeError(f"the model check process failed "
                               f"(exit {self._process.returncode}): {last}")
        sys.stderr.write(err)  # warnings from building the model, as the driver once showed
        answer = json.loads(lines[-1])
        if "error" in answer:
            raise UserError(answer["error"])
        self.provenance = answer["provenance"]
        return answer["parameters"]

    def close(self) -> None:
        """Stop the process where it is still running; a driver that stops early calls this."""
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()

    def __enter__(self) -> ModelCheck:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def main() -> None:
    # Ctrl-C in the terminal reaches this process too: the driver stops it, in its own words.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # First, before the request comes: the reason this process exists.
    import torch

    from distdl import provenance, runtime
    from distdl.models import build_checked, build_model

    torch.set_num_threads(1)  # a forward pass of two images, while the driver starts Ray
    text = sys.stdin.read()
    if not text:
        return  # the driver stopped before it asked
    request = json.loads(text)
    model = ModelConfig(**request["model"])
    num_classes, shape = request["num_classes"], tuple(request["shape"])
    try:
        # Counted on the meta device, which allocates nothing: a model too large for the
        # workers is refused before one is built.
        with torch.device("meta"):
            counted = build_model(model, num_classes=num_classes, in_channels=shape[0],
                                  image_size=shape[1])
        parameters = sum(p.numel() for p in counted.parameters())
        if request["cpu_workers"] is not None:
            runtime.check_memory(parameters, *request["cpu_workers"])
        build_checked(model, num_classes=num_classes, shape=shape, batch=request["batch"])
    except UserError as exc:
        print(json.dumps({"error": str(exc)}))
        return
    print(json.dumps({"parameters": parameters, "provenance": provenance.collect()}))


if __name__ == "__main__":
    main()
