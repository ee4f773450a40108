"""`distdl query`: a small client that shows the endpoint's contract (requests, no Ray)."""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from distdl.errors import UserError


def query(url: str, files: list[str], *, api_key: str | None = None,
          timeout_s: float = 30.0) -> dict[str, Any]:
    """POST the files to URL/predict: one image as the raw body, several as multipart form
    files, or one .json file of {"instances": [...]} as is."""
    import requests

    if timeout_s <= 0:
        raise UserError(f"--timeout must be more than 0 seconds, got {timeout_s:g}")
    endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/predict") else "/predict")
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            problem = "is not a file" if path.exists() else "does not exist"
            raise UserError(f"{path} {problem}: give image files or one .json file")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        if len(paths) == 1 and paths[0].suffix.lower() == ".json":
            headers["Content-Type"] = "application/json"
            reply = requests.post(endpoint, data=paths[0].read_bytes(), headers=headers,
                                  timeout=timeout_s)
        elif len(paths) == 1:
            headers["Content-Type"] = _image_type(paths[0])
            reply = requests.post(endpoint, data=paths[0].read_bytes(), headers=headers,
                                  timeout=timeout_s)
        else:
            parts = [("files", (p.name, p.read_bytes(), _image_type(p))) for p in paths]
            reply = requests.post(endpoint, files=parts, headers=headers, timeout=timeout_s)
    except (requests.ConnectionError, requests.Timeout) as exc:
        if isinstance(exc, requests.ReadTimeout):  # connected, then no answer in time
            raise UserError(f"{endpoint} did not answer within {timeout_s:g} s (a busy or slow "
                            "server? raise --timeout)") from None
        raise UserError(f"cannot reach {endpoint}: {type(exc).__name__} "
                        "(is distdl serve running? check the URL)") from None
    except (requests.RequestException, ValueError) as exc:  # urllib3's bad hosts: ValueError
        raise UserError(f"cannot send to {endpoint}: {type(exc).__name__} (check the URL)") \
            from None
    return _body(reply, endpoint)


def _image_type(path: Path) -> str:
    """The image type a file's name gives, else octet-stream: the server reads the format from
    the bytes, and answers 400 naming the file's problem when they are not an image."""
    kind = mimetypes.guess_type(path.name)[0]
    return kind if kind and kind.startswith("image/") else "application/octet-stream"


def _body(reply, endpoint: str) -> dict[str, Any]:
    try:
        body = reply.json()
    except ValueError:
        body = {"error": reply.text.strip()[:200]}
    if reply.status_code != 200:
        raise UserError(f"{endpoint} answered {reply.status_code}: "
                        f"{body.get('error', body) if isinstance(body, dict) else body}")
    if not _is_prediction_reply(body):
        raise UserError(f"{endpoint} answered without distdl's predictions: is it a distdl "
                        "endpoint, such as http://127.0.0.1:8000/vision?")
    return body


def _is_prediction_reply(body: Any) -> bool:
    """The fields that format_reply reads, as the Serve application's PredictResponse has them."""
    try:
        return isinstance(body["model_version"], str) and all(
            isinstance(p["class_name"], str)
            and all(isinstance(s["class_name"], str) and isinstance(s["probability"], float)
                    for s in p["top_k"])
            for p in body["predictions"])
    except (TypeError, KeyError):
        return False


def format_reply(reply: dict[str, Any], files: list[str]) -> str:
    names = files if len(reply["predictions"]) == len(files) else \
        [f"instances[{i}]" for i in range(len(reply["predictions"]))]
    lines = [f"model version {reply['model_version']}"]
    for name, prediction in zip(names, reply["predictions"]):
        scores = ", ".join(f"{s['class_name']} {s['probability']:.3f}"
                           for s in prediction["top_k"][:3])
        lines.append(f"{name}: {prediction['class_name']}  ({scores})")
    return "\n".join(lines)
