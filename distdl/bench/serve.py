"""`distdl bench serve`: distdl on Ray Serve, batched and unbatched, against a bare FastAPI server.

Serve is measured three ways: through HAProxy on --port forwarding to the replica's own port
(what `distdl serve` uses where it can), through Serve's Python HTTP proxy on --port, and
direct to the replica's port (direct ingress), which skips the proxy's hop. The last two share
a Ray; HAProxy gets a second one, as Serve reads the choice at start-up.

All three serve the same checkpoint with the same decoding and Predictor, and the same torch
threads, to the same closed-loop load: `clients` concurrent HTTP clients on 127.0.0.1, each
sending the next PNG as soon as its last answer arrives. Each figure comes after a warm-up.
A one-client pass gives the per-request latency, whose difference from the bare server is
distdl's overhead per request.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from distdl import provenance, recipes, runtime
from distdl.config import resolve
from distdl.errors import UserError

# How requests reach Serve: (prefix of its ratio keys, suffix of its variant keys, in words).
PATHS = (("", "", "through HAProxy"), ("proxy_", "_proxy", "through Serve's proxy"),
         ("direct_", "_direct", "direct to the replica"))
VARIANTS = ("serve_batched", "serve_unbatched", "serve_batched_proxy", "serve_unbatched_proxy",
            "serve_batched_direct", "serve_unbatched_direct", "bare_fastapi")
MODELS = {"digits": "digits_cpu", "resnet18": "shapes_resnet18_gpu"}  # -> the recipe it comes from


def make_checkpoint(model: str, directory: Path) -> str:
    """An untrained checkpoint of a recipe's model: serving cost does not depend on the weights."""
    from distdl.data.sources import SHAPE_CLASSES
    from distdl.models import build_model
    from distdl.train import checkpoint

    cfg = resolve(recipes.get(MODELS[model]), None, [])
    channels, side = (1, 8) if cfg.data.source == "digits" else (3, cfg.data.image_size or 32)
    classes = [str(d) for d in range(10)] if cfg.data.source == "digits" else list(SHAPE_CLASSES)
    net = build_model(cfg.model, num_classes=len(classes), in_channels=channels, image_size=side)
    meta = checkpoint.make_meta(model=cfg.model, classes=classes,
                                input_shape=(channels, side, side),
                                normalization={"mean": [0.5] * channels, "std": [0.25] * channels},
                                data=cfg.data)
    return str(checkpoint.save(directory / model, net, meta))


def _pngs(input_shape: list[int], count: int = 64, seed: int = 0) -> list[bytes]:
    channels, height, width = input_shape
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


async def _closed_loop(url: str, bodies: list[bytes], *, clients: int, seconds: float,
                       max_requests: int) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    headers = {"Content-Type": "image/png"}
    timeout = aiohttp.ClientTimeout(total=30)

    async def client(session, k: int) -> None:
        nonlocal errors
        i = k
        while time.monotonic() < deadline and len(latencies) + errors < max_requests:
            started = time.perf_counter()
            try:
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
            i += clients

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(session, k) for k in range(clients)))
        elapsed = time.monotonic() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "requests": len(latencies), "errors": errors}


def measure(url: str, bodies: list[bytes], *, clients: int, seconds: float) -> dict[str, Any]:
    """Warm up, then the closed loop at `clients`, then one client alone for the latency."""
    asyncio.run(_closed_loop(url, bodies, clients=clients, seconds=2, max_requests=10_000))
    loaded = asyncio.run(_closed_loop(url, bodies, clients=clients, seconds=seconds,
                                      max_requests=200_000))
    alone = asyncio.run(_closed_loop(url, bodies, clients=1, seconds=seconds / 2,
                                     max_requests=20_000))
    return {**loaded, "one_client_p50_ms": alone["p50_ms"]}


def _serve_variants(ckpt: str, bodies: list[bytes], *, ingress: str, clients: int,
                    seconds: float, threads: int, max_batch_size: int, batch_wait_ms: float | str,
                    port: int) -> dict[str, Any]:
    """Batched, then unbatched, on a Ray of its own started with `ingress`: "direct" measures
    both Serve's proxy and the replica's port, "haproxy" HAProxy on the port."""
    import ray

    from distdl.inference import deploy

    environment = {k: v for k, v in deploy.ingress_environment(ingress, "127.0.0.1").items()
                   if k not in os.environ}
    os.environ.update(environment)
    runtime.connect(None, num_cpus=os.cpu_count())
    # One limit on requests in flight for both variants: the unbatched one's own default
    # (twice its batch of 1) would hold the clients back in Serve's queue, not in the model.
    options = deploy.ServeOptions(max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                                  threads=threads, max_ongoing_requests=max(64, 2 * max_batch_size),
                                  port=port)
    on_port = f"http://127.0.0.1:{port}/bench/predict"
    results = {}
    try:
        for name, batch in (("batched", max_batch_size), ("unbatched", 1)):
            # Only user_config differs: the second run reconfigures the same replica in place.
            config = deploy.serve_config([("bench", ckpt)], replace(options, max_batch_size=batch))
            deploy.deploy(config)
            urls = ({"": on_port} if ingress == "haproxy" else
                    {"_proxy": on_port, "_direct": deploy.replica_urls("bench")[0] + "/predict"})
            for suffix, url in urls.items():
                results[f"serve_{name}{suffix}"] = measure(url, bodies, clients=clients,
                                                           seconds=seconds)
            if batch > 1:  # the wait the replica chose, where it was "auto"
                wait = _batch_wait_used(on_port.replace("/predict", "/model"))
                for suffix in urls:
                    results[f"serve_batched{suffix}"]["batch_wait_ms"] = wait
    finally:
        deploy.stop(["bench"], local=True)
        ray.shutdown()  # the next variant, and the bare server, get the machine to themselves
        for variable in environment:
            os.environ.pop(variable, None)
    return results


def _batch_wait_used(model_url: str) -> float:
    import requests

    return requests.get(model_url, timeout=30).json()["batch_wait_ms"]


def _bare(ckpt: str, bodies: list[bytes], *, clients: int, seconds: float, threads: int,
          port: int) -> dict[str, Any]:
    import requests

    from distdl.inference.deploy import REPLICA_ENV

    # The replicas' environment too (OpenMP's idle threads sleep), so that only the path differs.
    server = subprocess.Popen([sys.executable, "-m", "distdl.bench.bare_server", ckpt, str(port),
                               str(threads)], env={**os.environ, **REPLICA_ENV},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise UserError(f"the bare server did not start: "
                                f"{server.stderr.read().decode()[-500:] if server.stderr else ''}")
            time.sleep(0.3)
        return measure(f"http://127.0.0.1:{port}/predict", bodies, clients=clients,
                       seconds=seconds)
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(*, model: str, checkpoint: str | None, clients: int, seconds: float,
        max_batch_size: int, batch_wait_ms: float | str, threads: int | None,
        port: int) -> dict[str, Any]:
    from distdl.inference.deploy import checked_checkpoint
    from distdl.train.checkpoint import load_meta

    if model not in MODELS:
        raise UserError(f"unknown benchmark model {model!r}; choose one of: {', '.join(MODELS)}")
    if clients < 1 or seconds < 1:
        raise UserError("--clients and --seconds must be at least 1")
    threads = threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as scratch:
        # As `distdl serve` checks it: a checkpoint that cannot load fails here, in one line,
        # not in the replicas of a Ray started for it.
        if checkpoint:
            ckpt = checked_checkpoint(checkpoint)[0]
        else:
            ckpt = make_checkpoint(model, Path(scratch))
        bodies = _pngs(load_meta(ckpt)["input_shape"])
        report = {}
        for ingress in ("haproxy", "direct"):
            report |= _serve_variants(ckpt, bodies, ingress=ingress, clients=clients,
                                      seconds=seconds, threads=threads,
                                      max_batch_size=max_batch_size,
                                      batch_wait_ms=batch_wait_ms, port=port)
        report["bare_fastapi"] = _bare(ckpt, bodies, clients=clients, seconds=seconds,
                                       threads=threads, port=port + 1)
    rate = {key: value["requests_per_s"] for key, value in report.items()}
    silent = [key for key, value in rate.items() if value == 0]
    if silent:  # no ratio can be taken of it
        raise UserError(f"no request was answered through {', '.join(silent)} in {seconds:g} s "
                        f"({', '.join(str(report[key]['errors']) for key in silent)} errors)")
    one_client = {key: value["one_client_p50_ms"] for key, value in report.items()}
    report.update({
        "model": checkpoint or model, "clients": clients, "seconds": seconds,
        "threads": threads, "max_batch_size": max_batch_size, "batch_wait_ms": batch_wait_ms,
        **_ratios(rate, one_client),
        "provenance": provenance.collect(),
    })
    return report


def _ratios(rate: dict[str, float], one_client: dict[str, float]) -> dict[str, float]:
    """For each path: batched against unbatched and against the bare server, and the
    one-client latency above the bare server's (unbatched, so that no batch wait counts)."""
    out = {}
    for prefix, suffix, _ in PATHS:
        batched, unbatched = f"serve_batched{suffix}", f"serve_unbatched{suffix}"
        out[f"{prefix}ratio_vs_unbatched"] = round(rate[batched] / rate[unbatched], 3)
        out[f"{prefix}ratio_vs_bare"] = round(rate[batched] / rate["bare_fastapi"], 3)
        out[f"{prefix}overhead_ms_vs_bare"] = round(one_client[unbatched]
                                                    - one_client["bare_fastapi"], 2)
    return out


def format_report(report: dict[str, Any]) -> str:
    lines = [f"serving benchmark: {report['model']}, {report['clients']} clients, "
             f"{report['seconds']:g} s each, {report['threads']} torch threads"]
    for key in VARIANTS:
        r = report[key]
        lines.append(f"  {key:<23} {r['requests_per_s']:>8.1f} req/s   p50 {r['p50_ms']:>7.1f} ms"
                     f"   p99 {r['p99_ms']:>7.1f} ms   1 client p50 {r['one_client_p50_ms']:.1f} ms"
                     f"   errors {r['errors']}"
                     + (f"   waits {r['batch_wait_ms']:.1f} ms" if "batch_wait_ms" in r else ""))
    for prefix, _, path in PATHS:
        lines.append(f"  {path}: batched vs unbatched {report[prefix + 'ratio_vs_unbatched']:.2f}x"
                     f", batched vs bare FastAPI {report[prefix + 'ratio_vs_bare']:.2f}x, "
                     f"overhead per request vs bare "
                     f"{report[prefix + 'overhead_ms_vs_bare']:+.1f} ms")
    return "\n".join(lines)
