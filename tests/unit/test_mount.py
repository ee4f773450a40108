"""Which checkpoint a serve command or `bench serve` loads, named by a path or NAME=PATH."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from distdl.bench.serve import make_checkpoint
from distdl.errors import UserError
from distdl.inference.deploy import checked_checkpoint, mount


@pytest.fixture(scope="module")
def checkpoint_with_equals(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("ckpt") / "lr=0.1"  # as in Ray Tune's default trial folders
    folder.mkdir()
    return make_checkpoint("digits", folder)


def test_a_path_is_a_checkpoint_even_with_an_equals_sign(checkpoint_with_equals):
    assert checked_checkpoint(checkpoint_with_equals) == (checkpoint_with_equals,
                                                          "image_classification")


def test_a_serve_command_mounts_a_path_with_an_equals_sign_whole(checkpoint_with_equals,
                                                                   monkeypatch):
    assert mount(checkpoint_with_equals) == ("vision", checkpoint_with_equals)
    parent, folder = checkpoint_with_equals.rsplit("/", 2)[0], "lr=0.1/digits"
    monkeypatch.chdir(parent)  # relative: "lr" before the "=" is not a name
    assert mount(folder) == ("vision", checkpoint_with_equals)


def test_name_equals_path_mounts_at_the_name(checkpoint_with_equals):
    assert mount(f"digits-v2={checkpoint_with_equals}") == ("digits-v2", checkpoint_with_equals)
    assert mount(f"={checkpoint_with_equals}") == ("vision", checkpoint_with_equals)


@pytest.mark.parametrize("spec, message", [
    ("bad name!={ckpt}", "bad application name 'bad name!'"),
    ("{ckpt}/missing", "does not exist: give the checkpoint directory"),
    ("s3://bucket/ckpt", "replicas load a checkpoint from a directory on their node"),
])
def test_bad_mounts_say_what_is_wrong(spec, message, checkpoint_with_equals):
    with pytest.raises(UserError, match=message):
        mount(spec.replace("{ckpt}", checkpoint_with_equals))


@pytest.mark.parametrize("task", ["detection", [1]])
def test_a_checkpoint_for_another_task_is_refused(checkpoint_with_equals, tmp_path, task):
    copy = shutil.copytree(checkpoint_with_equals, tmp_path / "ckpt")
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "task": task}))
    with pytest.raises(UserError, match=re.escape(f"is for task {task!r}; distdl serves")):
        checked_checkpoint(str(copy))
