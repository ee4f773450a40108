"""Jobs on a real multi-node cluster on this machine: placement, shared storage, auth, failures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.cluster.conftest import distdl, group_pids

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[2]
# Two ranks of 1 CPU each on 1-CPU nodes: they cannot share a node.
LOOPBACK = re.compile(r"^(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]|\[::1\]):\d+$")
TRAIN_ARGS = ["--recipe", "debug", "--set", "train.cpus_per_worker=1"]


def _listeners_beyond_loopback(pids: set[int]) -> list[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    ours = [line for line in out.splitlines() if any(f"pid={pid}," in line for pid in pids)]
    assert ours  # the check below must have something to check
    return [line for line in ours if not LOOPBACK.match(line.split()[3])]


def test_status_lists_three_nodes_on_loopback(local_cluster):
    status = distdl("cluster", "status", "--dir", local_cluster["dir"])
    assert status.returncode == 0, status.stderr
    assert "3 nodes" in status.stdout
    for resource in ("node_head", "node_1", "node_2"):
        assert resource in status.stdout
    pids = group_pids({node["pid"] for node in local_cluster["nodes"]})
    assert _listeners_beyond_loopback(pids) == []


def test_up_twice_and_status_of_nothing_are_one_line(local_cluster, tmp_path):
    again = distdl("cluster", "up", "--dir", local_cluster["dir"])
    assert again.returncode == 2 and "already running" in again.stderr
    nothing = distdl("cluster", "status", "--dir", str(tmp_path))
    assert nothing.returncode == 2 and len(nothing.stderr.strip().splitlines()) == 1


def test_submit_follow_trains_on_two_nodes(local_cluster, cluster_env):
    storage = local_cluster["storage"]
    run = distdl("submit", "--address", local_cluster["dashboard_url"], "--follow", "--",
                 "train", *TRAIN_ARGS, "--storage", storage, "--name", "submitted",
                 env=cluster_env, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "epoch   2/2" in run.stdout and "SUCCEEDED" in run.stdout
    for noise in ("Ignoring upload", "Uploading package", "is now ignored by default"):
        assert noise not in run.stdout + run.stderr  # Ray's packaging lines, not for the user
    result = json.loads((Path(storage) / "submitted" / "result.json").read_text())
    assert len(set(result["worker_nodes"])) == 2
    assert Path(result["best_checkpoint"]).parent == Path(storage) / "submitted"
    assert (Path(result["best_checkpoint"]) / "model.pt").is_file()


def test_serve_job_keeps_serving_with_its_api_key(local_cluster, cluster_env):
    """`jobs/serve.py --detach` as a plain Ray job: the model serves on after the job ends."""
    result = json.loads((Path(local_cluster["storage"]) / "submitted" / "result.json").read_text())
    ray = str(Path(sys.executable).parent / "ray")
    run = subprocess.run(
        [ray, "job", "submit", "--address", local_cluster["dashboard_url"], "--working-dir", ".",
         "--", "python", "jobs/serve.py", result["best_checkpoint"], "--port", "18461",
         "--api-key", "k3y", "--detach"],
        capture_output=True, text=True, timeout=240, env=cluster_env, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    url = "http://127.0.0.1:18461/vision/model"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    asked = urllib.request.Request(url, headers={"Authorization": "Bearer k3y"})
    with urllib.request.urlopen(asked, timeout=10) as reply:
        assert json.loads(reply.read())["checkpoint"] == result["best_checkpoint"]
    serve = str(Path(sys.executable).parent / "serve")
    down = subprocess.run([serve, "shutdown", "-a", local_cluster["dashboard_url"], "-y"],
                          capture_output=True, text=True, timeout=120, env=cluster_env)
    assert down.returncode == 0, down.stderr


def test_plain_ray_job_submit(local_cluster, cluster_env):
    storage = local_cluster["storage"]
    ray = str(Path(sys.executable).parent / "ray")
    run = subprocess.run(
        [ray, "job", "submit", "--address", local_cluster["dashboard_url"], "--working-dir", ".",
         "--", "python", "jobs/train.py", *TRAIN_ARGS, "--storage", storage, "--name", "raycli"],
        capture_output=True, text=True, timeout=240, env=cluster_env, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((Path(storage) / "raycli" / "result.json").read_text())
    assert len(set(result["worker_nodes"])) == 2 and result["epochs_completed"] == 2


def test_a_jobs_working_directory_stays_while_its_driver_joins(local_cluster, cluster_env):
    """Each node has its own temp dir: sharing the head's, the worker nodes' agents unpacked a
    job's package again as its driver joined, deleting it first under the running driver."""
    ray = str(Path(sys.executable).parent / "ray")
    run = subprocess.run(
        [ray, "job", "submit", "--address", local_cluster["dashboard_url"], "--working-dir", ".",
         "--", "python", "tests/cluster/workdir_probe.py"],
        capture_output=True, text=True, timeout=240, env=cluster_env, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "vanished 0 times" in run.stdout


def test_bad_arguments_fail_with_their_error_line(local_cluster, cluster_env):
    """A recipe is checked before submitting; a data path only where the job runs."""
    address = ["--address", local_cluster["dashboard_url"]]
    refused = distdl("submit", *address, "--", "train", "--recipe", "no_such_recipe",
                     env=cluster_env, cwd=REPO)
    assert refused.returncode == 2 and "submitted" not in refused.stdout, refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("error: unknown recipe 'no_such_recipe'; choose one of:")
    run = distdl("submit", *address, "--", "train", "--recipe", "debug", "--set",
                 "data.source=imagefolder:/no/such/folder", env=cluster_env, cwd=REPO)
    assert run.returncode == 1
    assert "FAILED" in run.stdout
    assert "path not found: /no/such/folder" in run.stderr.strip().splitlines()[-1]
    job_id = run.stdout.split("submitted job ", 1)[1].split()[0]
    status = distdl("jobs", "status", job_id, *address, env=cluster_env)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "FAILED"
    logs = distdl("jobs", "logs", job_id, *address, env=cluster_env)
    assert "path not found: /no/such/folder" in logs.stdout
    unknown = distdl("jobs", "status", "raysubmit_nosuchjob", *address, env=cluster_env)
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1


def test_jobs_api_refuses_requests_without_the_token(local_cluster):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{local_cluster['dashboard_url']}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)


def test_wrong_token_or_address_is_one_line(local_cluster, cluster_env):
    wrong = {**cluster_env, "RAY_AUTH_TOKEN": "0" * 64}
    run = distdl("jobs", "list", "--address", local_cluster["dashboard_url"], env=wrong)
    assert run.returncode == 2 and "token" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    nowhere = distdl("jobs", "list", "--address", "http://127.0.0.1:9", env=cluster_env)
    assert nowhere.returncode == 2 and "no Ray cluster answers" in nowhere.stderr
