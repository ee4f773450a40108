"""Storage URIs (s3://, gs://, ...): looked up through pyarrow, in bounded time."""

from __future__ import annotations

import threading

import pyarrow
import pyarrow.fs

from distdl.errors import UserError

# Without network or credentials, pyarrow's GCS client retries a lookup for 15 minutes.
PROBE_S = 30.0
# What pyarrow raises for a URI it cannot open or read: the user's to fix.
_USER_FAULTS = (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError)


def probe(uri: str, timeout_s: float = PROBE_S, *, what: str = "storage") -> pyarrow.fs.FileType:
    """Open `uri`'s filesystem and look the path up, for at most `timeout_s`; returns what is
    there (pyarrow.fs.FileType.NotFound where nothing is). `what` names the URI in errors."""
    found: list[tuple[str, pyarrow.fs.FileType]] = []
    failed: list[Exception] = []

    def look() -> None:
        try:
            fs, path = pyarrow.fs.FileSystem.from_uri(uri)
            found.append((path, fs.get_file_info(path).type))
        except Exception as exc:  # raised again below, in the caller's thread
            failed.append(exc)

    # A thread, as pyarrow's calls take no timeout; a lookup still retrying when this gives up
    # is left to end with the process.
    looking = threading.Thread(target=look, name="storage-probe", daemon=True)
    looking.start()
    looking.join(timeout_s)
    if looking.is_alive():
        raise UserError(f"{what} {uri} did not answer within {timeout_s:g} s; check the "
                        "network and the credentials for it, or use a local path")
    if failed and not isinstance(failed[0], _USER_FAULTS):
        raise failed[0]
    if failed:
        reason = (str(failed[0]).strip().splitlines() or [type(failed[0]).__name__])[0]
        raise UserError(f"cannot use {what} {uri}: {reason}")
    path, kind = found[0]
    if not path.strip("/"):  # s3:// alone: pyarrow looks up the account, not a bucket
        raise UserError(f"cannot use {what} {uri}: it names no bucket or folder, as in "
                        "s3://BUCKET/runs")
    return kind
