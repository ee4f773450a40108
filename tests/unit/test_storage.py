"""--storage: a local folder or a URI, checked before Ray starts, in bounded time."""

from __future__ import annotations

import time

import pytest

from distdl import evaluate
from distdl.errors import UserError
from distdl.storage import probe
from distdl.train import trainer

# GCS and S3 clients pointed at a port where nothing listens: GCS retries for minutes.
UNREACHABLE = "endpoint_override=127.0.0.1:1&scheme=http"


def test_storage_that_never_answers_is_given_up_on_in_time():
    started = time.monotonic()
    with pytest.raises(UserError, match=r"storage gs://bucket/runs\?.* did not answer within 1 s"):
        probe(f"gs://bucket/runs?{UNREACHABLE}", timeout_s=1)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("uri, message", [
    (f"s3://bucket/runs?{UNREACHABLE}", "Could not connect to server"),
    ("foo://x/runs", "Unrecognized filesystem type in URI: foo://x/runs"),
    (f"s3://?{UNREACHABLE}", "it names no bucket or folder"),
    ("file:///", "it names no bucket or folder"),
])
def test_storage_that_fails_says_why(uri, message):
    with pytest.raises(UserError, match=f"cannot use storage .*{message}"):
        trainer.normalize_storage(uri)


def test_local_folders_and_file_uris_are_storage(tmp_path):
    assert trainer.normalize_storage(str(tmp_path / "new" / "runs")) == str(tmp_path / "new/runs")
    assert (tmp_path / "new" / "runs").is_dir()
    assert trainer.normalize_storage(f"file://{tmp_path}") == f"file://{tmp_path}"


def test_a_checkpoint_uri_is_looked_up_before_ray(tmp_path):
    with pytest.raises(UserError, match=f"checkpoint not found: file://{tmp_path}/none"):
        evaluate.locate(f"file://{tmp_path}/none")
    assert evaluate.locate(f"file://{tmp_path}") == f"file://{tmp_path}"
    with pytest.raises(UserError, match="cannot use checkpoint s3://bucket/ckpt"):
        evaluate.locate(f"s3://bucket/ckpt?{UNREACHABLE}")
