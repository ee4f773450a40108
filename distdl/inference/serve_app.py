"""The Ray Serve application: a FastAPI ingress whose replicas batch images into the Predictor.

One deployment per model is both the HTTP ingress and the batched model; replicas scale out as
a unit. A separate model deployment behind the ingress adds a replica hop of several ms of CPU
per request: on 2 cores, 16 clients got 139 against 199 requests/s (digits) and 41 against 46
(ResNet-18 at 32x32) through Serve's proxy, and direct to the replica 282 against 653 and 53
against 108.

Config that can change without a restart (the checkpoint, the batch size and wait) is the
deployment's `user_config`, applied by `reconfigure`: `distdl serve update` swaps models in place.
Nothing here runs at import time beyond defining the app; the model loads in the replica.
(No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time.)
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException

from distdl.inference import (AUTO_WAIT_MS, BATCH_WAIT_MS, MAX_BATCH_SIZE, TOP_K,
                              auto_batch_wait_ms, inputs, parse_batch_wait)
from distdl.inference.deploy import API_KEY_ENV, HEALTH_APP
from distdl.inference.inputs import BadInput, Limits

log = logging.getLogger("ray.serve")


class ClassScore(BaseModel):
    class_index: int
    class_name: str
    probability: float


class Prediction(BaseModel):
    class_index: int
    class_name: str
    top_k: list[ClassScore]


class PredictResponse(BaseModel):
    model_version: str
    batch_size: int  # images scored together with this request's: > 1 when batched
    predictions: list[Prediction]


class ModelInfo(BaseModel):
    model_version: str
    checkpoint: str
    task: str
    classes: list[str]
    input_shape: list[int]
    model: dict[str, Any]
    metrics: dict[str, Any]
    max_batch_size: int
    batch_wait_ms: float
    batch_wait_auto: bool  # batch_wait_ms was measured: one forward pass of a lone image


async def require_api_key(request: Request) -> None:
    """With DISTDL_API_KEY set, every route needs it (Authorization: Bearer, or X-API-Key).

    A dependency of the app's routes (async: a plain function would run in a thread pool).
    The OpenAPI docs stay readable without the key, and so does the model's /healthz: a
    load balancer's probe sends no key, and learns only that the replica answers.
    """
    expected = os.environ.get(API_KEY_ENV)
    if not expected or getattr(request.scope.get("route"), "path", None) == "/healthz":
        return
    given = request.headers.get("x-api-key") or ""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        given = token.strip()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY' "
                                 "or 'X-API-Key: KEY'", headers={"WWW-Authenticate": "Bearer"})


api = FastAPI(
    title="distdl vision",
    description="Image classification with a model trained by `distdl train`.",
    version="1",
    dependencies=[Depends(require_api_key)],
)


@api.exception_handler(BadInput)
async def _bad_input(request: Request, exc: BadInput) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"},
                        status_code=422)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


def model_version(checkpoint: str | Path) -> str:
    """A short content hash of the weights: the same file always names the same version."""
    digest = hashlib.sha256((Path(checkpoint) / "model.pt").read_bytes()).hexdigest()
    return digest[:12]


# Module functions the deployment uses come before it: Serve pickles the class where it is
# decorated, and a name defined further down would be missing in the replica.
async def _read_body(request: Request, limits: Limits) -> bytes:
    """The body, refused with 413 as soon as it passes the limit (chunked bodies included),
    and with 408 where it has not all come within limits.body_timeout_s: each request holds
    one of the replica's few request slots while it is read, and a few clients that send
    slowly (or stop) would otherwise keep every other client waiting."""
    chunks, size = [], 0

    async def receive() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            inputs.check_body_size(size, limits)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), limits.body_timeout_s)
    except TimeoutError:
        raise BadInput(f"the request body did not all arrive within {limits.body_timeout_s:g} "
                       f"s ({size} bytes came)", status=408) from None
    request._body = b"".join(chunks)  # Starlette's cache: request.form() parses these bytes
    return request._body


def _model_thread(threads: int | None) -> ThreadPoolExecutor:
    """The one thread on which a replica runs torch: loading, forward passes, health checks.

    Each thread that calls torch gets its own team of intra-op (OpenMP) threads, and teams
    compete for the cores: in a plain script here, a ResNet-18 forward pass took about 11 ms
    on a thread when no other thread had used torch, and 15 to 20 ms once another had.
    """

    import torch  # here, not first on the new thread: one thread imports torch at a time

    def start() -> None:
        if threads:
            torch.set_num_threads(threads)

    return ThreadPoolExecutor(1, thread_name_prefix="distdl-model", initializer=start)


# Decoding that takes more than about a millisecond runs on a worker thread, so that the
# replica's event loop goes on batching and answering other requests meanwhile: here a 46 KB
# PNG of 4000x4000 pixels took 0.19 s to decode, one of 256x256 pixels 1.2 ms, a digit's 40 us.
# Small inputs decode inline, as the hop to a thread costs about 40 us.
INLINE_PIXELS = 256 * 256
INLINE_JSON_BYTES = 64 * 1024


async def _decode(inline: bool, decode: Callable[[], np.ndarray]) -> np.ndarray:
    return decode() if inline else await asyncio.to_thread(decode)


def _json_images(body: bytes, shape: tuple[int, int, int], limits: Limits) -> np.ndarray:
    try:
        # Integers as floats: pixels become floats anyway, and a huge integer becomes inf
        # (refused as such) instead of overflowing, or passing Python's digit limit.
        payload = json.loads(body, parse_int=float)
    except ValueError as exc:  # also JSONDecodeError, UnicodeDecodeError
        raise BadInput(f"body is not valid JSON: {exc}") from None
    except RecursionError:  # a small body can nest deeper than the parser can go
        raise BadInput("body is not valid JSON: nested too deeply") from None
    return inputs.from_json(payload, input_shape=shape, limits=limits)


async def _multipart_images(request: Request, shape: tuple[int, int, int],
                            limits: Limits) -> np.ndarray:
    try:
        form = await request.form(max_files=limits.max_instances)
    except Exception as exc:  # Starlette and python-multipart raise several types for bad bodies
        if "Too many files" in str(exc):  # Starlette stops reading past max_files
            raise BadInput(f"more than {limits.max_instances} images in one request, the "
                           "limit", status=413) from None
        raise BadInput(f"malformed multipart body: {exc}") from None
    files = [value for _, value in form.multi_items() if hasattr(value, "read")]
    inputs.count_instances(len(files), limits)
    named = [(await f.read(), f"file {f.filename!r}") for f in files]
    total = sum(inputs.pixels(data) for data, _ in named)
    if len(named) > 1:  # one image over the limit gets decode()'s message, which names it
        inputs.check_total_pixels(total, limits)

    def decode() -> np.ndarray:
        return np.stack([inputs.decode(data, input_shape=shape, limits=limits, what=what)
                         for data, what in named])

    return await _decode(total <= INLINE_PIXELS, decode)


@serve.deployment(name="VisionService", max_ongoing_requests=64, health_check_period_s=5)
@serve.ingress(api)
class VisionService:
    def __init__(self, checkpoint: str, limits: dict | None = None, top_k: int = TOP_K,
                 threads: int | None = None):
        self._model_thread = _model_thread(threads)
        self._limits = Limits(**(limits or {}))
        self._top_k = top_k
        self._checkpoint: str | None = None
        self._batch_config = {"max_batch_size": MAX_BATCH_SIZE, "batch_wait_ms": BATCH_WAIT_MS}
        # As predict_batch's decorator set it, until Serve applies the deployment's user_config
        # (distdl's configs always hold one) through `reconfigure`, before the replica serves.
        self._batching = {"max_batch_size": MAX_BATCH_SIZE, "batch_wait_ms": AUTO_WAIT_MS[0],
                          "batch_wait_auto": False}
        self._load(checkpoint)
        self._requests = metrics.Counter(
            "distdl_requests", description="Prediction requests by HTTP status.",
            tag_keys=("status",))
        self._batch_sizes = metrics.Histogram(
            "distdl_batch_size", description="Images per forward pass.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128])

    def _load(self, checkpoint: str) -> None:
        from distdl.inference.predictor import Predictor

        predictor = self._model_thread.submit(Predictor.from_checkpoint, checkpoint).result()
        # Both change together, between batches: a batch always runs on one model.
        self._predictor, self._version = predictor, model_version(checkpoint)
        self._checkpoint = checkpoint
        self._lone_ms: float | None = None  # this model's lone forward pass, once needed
        log.info("serving %s (version %s)", checkpoint, self._version)

    def reconfigure(self, config: dict) -> None:
        """Apply `user_config`: a new checkpoint loads before it replaces the old one."""
        if config.get("checkpoint") and config["checkpoint"] != self._checkpoint:
            self._load(config["checkpoint"])
        self._batch_config = {key: config.get(key, value)
                              for key, value in self._batch_config.items()}
        self._apply_batching()

    def _apply_batching(self) -> None:
        """An "auto" wait is measured on the model now serving (see distdl.inference)."""
        size = int(self._batch_config["max_batch_size"])
        wait = parse_batch_wait(self._batch_config["batch_wait_ms"])
        auto = wait == "auto"
        if auto and self._lone_ms is None:  # once per model
            self._lone_ms = self._lone_pass_ms()
        wait_ms = auto_batch_wait_ms(self._lone_ms) if auto else float(wait)
        self.predict_batch.set_max_batch_size(size)
        self.predict_batch.set_batch_wait_timeout_s(wait_ms / 1000)
        batching = {"max_batch_size": size, "batch_wait_ms": round(wait_ms, 2),
                    "batch_wait_auto": auto}
        if batching != self._batching:
            log.info("batches of at most %d, waiting %.1f ms%s", size, wait_ms,
                     " (auto)" if auto else "")
        self._batching = batching

    def _lone_pass_ms(self, passes: int = 7, warm_up: int = 2) -> float:
        """The fastest of a few forward passes of one image, on the model's thread."""
        blank = self._blank_image()

        def fastest() -> float:
            times = []
            for _ in range(passes):
                started = time.perf_counter()
                self._predictor.predict(blank)
                times.append(time.perf_counter() - started)
            return 1000 * min(times[warm_up:])

        return self._model_thread.submit(fastest).result()

    def check_health(self) -> None:
        """Serve calls this every few seconds; a replica whose model no longer runs (a lost GPU)
        raises here, and Serve replaces it."""
        self._model_thread.submit(self._predictor.predict, self._blank_image()).result()

    def _blank_image(self) -> np.ndarray:
        channels, height, width = self._predictor.input_shape
        return np.zeros((1, height, width, channels), np.uint8)

    # Both set again by `reconfigure` (_apply_batching).
    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=AUTO_WAIT_MS[0] / 1000)
    async def predict_batch(self, requests: list[np.ndarray]) -> list[dict[str, Any]]:
        """Requests that arrive together run as one forward pass, off the event loop. Their
        images (a request may hold many) go in passes no larger than the batch size or one
        request's most, whichever is larger, so that many large requests make no huge pass."""
        predictor, version = self._predictor, self._version
        images = np.concatenate(requests)
        size = max(self._batching["max_batch_size"], self._limits.max_instances)
        loop = asyncio.get_running_loop()
        probs = await loop.run_in_executor(self._model_thread, predictor.predict_in_passes,
                                           images, size)
        for start in range(0, len(images), size):
            self._batch_sizes.observe(min(size, len(images) - start))
        # Counted per batch: one metric update takes about 50 us, a tenth of what the event
        # loop spent per request when it counted each one (digits, 16 clients).
        self._requests.inc(len(requests), tags={"status": "200"})
        bounds = np.cumsum([0] + [len(r) for r in requests])
        return [{"model_version": version, "batch_size": len(images),
                 "predictions": inputs.top_k(probs[a:b], predictor.classes, self._top_k)}
                for a, b in zip(bounds[:-1], bounds[1:])]

    @api.post("/predict", response_model=PredictResponse,
              responses={400: {}, 401: {}, 413: {}, 415: {}, 503: {}})
    async def predict(self, request: Request) -> dict[str, Any]:
        """One image as the raw body (image/png, image/jpeg), several as multipart form files,
        or JSON {"instances": [pixel arrays]}. Images of another size are resized."""
        try:
            images = await self._read_images(request)
        except BadInput as exc:
            self._requests.inc(tags={"status": str(exc.status)})
            raise
        return await self.predict_batch(images)

    @api.get("/model", response_model=ModelInfo)
    async def model(self) -> dict[str, Any]:
        meta = self._predictor.meta
        return {"model_version": self._version, "checkpoint": self._checkpoint,
                "task": meta.get("task", "image_classification"), "classes": meta["classes"],
                "input_shape": meta["input_shape"], "model": meta["model"],
                "metrics": meta.get("metrics", {}), **self._batching}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model_version": self._version}

    async def _read_images(self, request: Request) -> np.ndarray:
        limits, shape = self._limits, tuple(self._predictor.input_shape)
        declared = request.headers.get("content-length", "")
        if declared.isdigit():
            inputs.check_body_size(int(declared), limits)
        body = await _read_body(request, limits)
        kind = inputs.media_type(request.headers.get("content-type"))
        if inputs.is_image_body(kind):
            image = await _decode(inputs.pixels(body) <= INLINE_PIXELS, lambda: inputs.decode(
                body, input_shape=shape, limits=limits))
            return image[None]
        if kind == "application/json":
            return await _decode(len(body) <= INLINE_JSON_BYTES,
                                 lambda: _json_images(body, shape, limits))
        if kind == "multipart/form-data":
            return await _multipart_images(request, shape, limits)
        raise BadInput(f"unsupported content type {kind or '(none)'}: send an image (image/png, "
                       "image/jpeg or any image/* type that Pillow reads, or "
                       "application/octet-stream), multipart/form-data or application/json",
                       status=415)


@serve.deployment(name="Health", max_ongoing_requests=16, ray_actor_options={"num_cpus": 0})
class Health:
    """GET /healthz: 200 when every application is running, else 503 with their states.

    Mounted at /, it also answers every path that no application serves, with a JSON 404
    (Serve's own would be text).
    """

    async def __call__(self, request: Request) -> JSONResponse:
        if request.url.path.rstrip("/") != f"/{HEALTH_APP}":
            return JSONResponse({"error": f"no such endpoint: {request.url.path}"},
                                status_code=404)
        if request.method not in ("GET", "HEAD"):
            return JSONResponse({"error": f"/{HEALTH_APP} answers GET and HEAD, not "
                                          f"{request.method}"},
                                status_code=405, headers={"Allow": "GET, HEAD"})
        states = {name: app.status.value for name, app in serve.status().applications.items()}
        ok = all(state == "RUNNING" for state in states.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "applications": states},
                            status_code=200 if ok else 503)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder (`import_path: distdl.inference.serve_app:build_app`)."""
    return VisionService.bind(checkpoint=args["checkpoint"], limits=args.get("limits"),
                              top_k=int(args.get("top_k", TOP_K)), threads=args.get("threads"))


def build_health(args: dict[str, Any]) -> serve.Application:
    return Health.bind()
