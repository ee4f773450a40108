"""The serving benchmark's baseline: the same Predictor and decoding behind a bare FastAPI +
uvicorn process, one request per forward pass (no Ray, no batching).

    python -m distdl.bench.bare_server CHECKPOINT PORT [THREADS]
"""

from __future__ import annotations

import sys

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from distdl.inference import TOP_K, inputs
from distdl.inference.predictor import Predictor


def make_app(checkpoint: str) -> FastAPI:
    predictor = Predictor.from_checkpoint(checkpoint)
    limits, shape = inputs.Limits(), tuple(predictor.input_shape)
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        try:
            image = inputs.decode(await request.body(), input_shape=shape, limits=limits)
        except inputs.BadInput as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        probs = predictor.predict(image[None])  # on the event loop: one at a time, unbatched
        return JSONResponse({"predictions": inputs.top_k(probs, predictor.classes, TOP_K)})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    checkpoint, port = sys.argv[1], int(sys.argv[2])
    if len(sys.argv) > 3:
        torch.set_num_threads(int(sys.argv[3]))
    uvicorn.run(make_app(checkpoint), host="127.0.0.1", port=port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
