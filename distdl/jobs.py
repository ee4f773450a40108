"""Ray jobs: submit a distdl command to a cluster, follow it, and query or stop jobs.

The client authenticates the way Ray's own clients do: with token mode on, Ray's token loader
reads RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, and
JobSubmissionClient sends it as an `Authorization: Bearer` header.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import shlex
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from distdl.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Left out of the uploaded working directory: environments, outputs and history, not code.
# Ray itself leaves out .git and .venv (and warns when they are listed again).
EXCLUDES = ["venv", "runs", "*.egg-info", "__pycache__", ".pytest_cache", "evaluation",
            "*.parquet", "*.pt"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PROBE_TIMEOUT_S = 5.0
POLL_S = 1.0


def client(address: str | None):
    """A JobSubmissionClient for `address`, or one clear UserError (never a hang)."""
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS).rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    _probe(address)
    # Token mode must be on before Ray's token loader is first asked, or it sends no token.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    _quiet_upload()

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as exc:
        raise UserError(_auth_line(address, exc)) from None
    except (ConnectionError, RuntimeError) as exc:
        raise UserError(f"the Ray jobs API at {address} failed: {_first_line(exc)}") from None


def _quiet_upload() -> None:
    """The upload's INFO lines (packaging, ignored files) are not for the person submitting,
    nor Ray's notice that it now leaves out .git and .venv, which distdl never uploads.
    Set after importing Ray, which sets its loggers' levels as it is imported."""
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk",
                 "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").addFilter(
        lambda record: "is now ignored by default" not in record.getMessage())


def _probe(address: str) -> None:
    """Fail in seconds when nothing answers: the Jobs client's own requests have no timeout."""
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # something answers; authentication is checked by the client
    except http.client.BadStatusLine:
        # Its message is the raw first bytes of the answer: binary from an HTTP/2 (gRPC) port.
        raise UserError(f"the server at {address} does not answer as a Ray dashboard (not "
                        "HTTP/1.1: a Ray GCS or client port?); give --address the dashboard's "
                        "http://HOST:PORT (8265 unless set otherwise)") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"no Ray cluster answers at {address} ({reason}); is it running? "
                        "check --address (the dashboard's http://HOST:PORT)") from None


def _auth_line(address: str, exc: Exception) -> str:
    text = str(exc)
    if "required" in text.lower():
        return (f"the Ray cluster at {address} requires a token and none was found: set "
                "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or put it in ~/.ray/auth_token)")
    return (f"the Ray cluster at {address} refused the token: check RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def entrypoint(argv: list[str]) -> str:
    """The job's command line for `distdl ARGV` (checked before any cluster is contacted)."""
    if not argv:
        raise UserError("nothing to submit: give a distdl command after --, "
                        "e.g. distdl submit -- train --recipe debug")
    return shlex.join(["python", "-m", "distdl.cli", *argv])


def submit(job_client, entrypoint: str, working_dir: Path) -> str:
    """Submit `entrypoint` to run in a copy of `working_dir`; return the job id."""
    runtime_env = {"working_dir": str(working_dir.resolve()), "excludes": EXCLUDES}
    job_id = _call(job_client.submit_job, entrypoint=entrypoint, runtime_env=runtime_env)
    log.info("submitted %s as %s", entrypoint, job_id)
    return job_id


def follow(job_client, job_id: str, write: Callable[[str], None]) -> None:
    """Pass the job's log to `write` as it comes, until the job ends."""
    async def tail() -> None:
        async for chunk in job_client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())


def wait(job_client, job_id: str) -> str:
    """Poll until the job reaches a terminal status (Ctrl-C stops waiting); return it."""
    while True:
        status = str(_call(job_client.get_job_status, job_id))
        if status in TERMINAL:
            return status
        time.sleep(POLL_S)


def info(job_client, job_id: str) -> dict[str, Any]:
    details = _call(job_client.get_job_info, job_id)
    return {"job_id": job_id, "status": str(details.status), "message": details.message,
            "entrypoint": details.entrypoint, "start_time": details.start_time,
            "end_time": details.end_time}


def list_jobs(job_client) -> list[dict[str, Any]]:
    return [{"job_id": j.submission_id or j.job_id, "status": str(j.status),
             "entrypoint": j.entrypoint, "start_time": j.start_time}
            for j in _call(job_client.list_jobs)]


def logs(job_client, job_id: str) -> str:
    return _call(job_client.get_job_logs, job_id)


def stop(job_client, job_id: str) -> bool:
    return bool(_call(job_client.stop_job, job_id))


def log_tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _call(method, *args, **kwargs):
    """A jobs API call whose failures a user can cause end in one line."""
    from ray.exceptions import AuthenticationError

    try:
        return method(*args, **kwargs)
    except AuthenticationError as exc:
        raise UserError(_auth_line("the dashboard", exc)) from None
    except (RuntimeError, ValueError, ConnectionError) as exc:
        raise UserError(_first_line(exc)) from None
