"""`distdl serve`, `serve update`, `serve build` and `query` for real: Ray Serve on the session's
Ray, HTTP on 127.0.0.1, the model trained by the session's default `distdl train`."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import yaml
from PIL import Image

from distdl.config import DataConfig, ModelConfig
from distdl.inference import AUTO_WAIT_MS, deploy, serve_app
from distdl.inference.predictor import Predictor
from distdl.models import build_model
from distdl.train import checkpoint, rundir
from tests.integration.cli import fresh_shell_env, popen_cli, run_cli

PORT = 18231
BASE = f"http://127.0.0.1:{PORT}"
LIMITS = ("--max-pixels", "150000", "--max-instances", "8", "--max-body-mb", "1",
          "--body-timeout", "3")

pytestmark = pytest.mark.slow


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


def _post_png(path: str, image: np.ndarray, **kwargs) -> requests.Response:
    return requests.post(f"{BASE}{path}", data=_png(image),
                         headers={"Content-Type": "image/png", **kwargs.pop("headers", {})},
                         timeout=60, **kwargs)


def _wait_for_line(process: subprocess.Popen, text: str, timeout: float = 180) -> list[str]:
    """Read the CLI's output until `text`; the reader thread keeps the pipe drained after, and
    keeps adding to the returned lines until the process ends."""
    seen: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in process.stdout:
            seen.append(line)
            if text in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        process.kill()
        pytest.fail(f"no {text!r} from distdl serve:\n{''.join(seen)[-3000:]}")
    return seen


@pytest.fixture(scope="module")
def checkpoints(digits_run):
    """(best, another) checkpoint of the digits run: different weights, different versions."""
    run_dir, _ = digits_run
    best = rundir.read_result(run_dir)["best_checkpoint"]
    others = sorted(str(p.parent) for p in run_dir.glob("checkpoint_*/model.pt")
                    if str(p.parent) != best)
    assert others, "the run keeps more than one checkpoint"
    return best, others[-1]


@pytest.fixture(scope="module")
def served(ray_address, checkpoints):
    """`distdl serve` in the foreground, as a user runs it; Ctrl-C (SIGINT) at the end."""
    process = popen_cli("serve", f"vision={checkpoints[0]}", f"second={checkpoints[1]}",
                        "--port", str(PORT),
                        "--max-batch-size", "16", "--batch-wait-ms", "20", *LIMITS,
                        address=ray_address)
    output = _wait_for_line(process, "Ctrl-C stops")
    yield process
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"distdl serve still running 60 s after SIGINT:\n{''.join(output)[-3000:]}")
        assert process.returncode == 0, "".join(output)[-3000:]
    from ray import serve

    serve.shutdown()


@pytest.fixture(scope="module")
def validation(checkpoints):
    """The digits validation split as uint8 images, exactly as training held it out."""
    from distdl.data.sources import load_images

    meta = checkpoint.load_meta(checkpoints[0])
    val = load_images(DataConfig(**meta["data"])).val.take_all()
    return np.stack([row["image"] for row in val]), np.array([row["label"] for row in val])


def test_served_model_scores_validation_pngs_like_training(served, checkpoints, validation):
    images, labels = validation
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda im: _post_png("/vision/predict", im), images))
    assert all(r.status_code == 200 for r in replies)
    predicted = np.array([r.json()["predictions"][0]["class_index"] for r in replies])
    served_accuracy = float((predicted == labels).mean())
    trained_accuracy = checkpoint.load_meta(checkpoints[0])["metrics"]["val_accuracy"]
    assert abs(served_accuracy - trained_accuracy) <= 0.01, (served_accuracy, trained_accuracy)
    assert served_accuracy >= 0.95


def test_concurrent_clients_get_correct_answers_in_batches(served, checkpoints, validation):
    images, _ = validation
    expected = Predictor.from_checkpoint(checkpoints[0]).predict(images).argmax(axis=1)

    def client(worker: int) -> list[tuple[int, int, int]]:
        out = []
        for i in range(worker, len(images), 16):
            reply = _post_png("/vision/predict", images[i]).json()
            out.append((i, reply["predictions"][0]["class_index"], reply["batch_size"]))
        return out

    with ThreadPoolExecutor(16) as pool:
        results = [row for rows in pool.map(client, range(16)) for row in rows]
    assert len(results) == len(images)
    assert all(expected[i] == got for i, got, _ in results)
    assert max(batch for _, _, batch in results) > 1


def test_every_way_to_send_images_and_the_metadata(served, validation):
    images, labels = validation
    files = [("files", (f"{i}.png", _png(images[i]), "image/png")) for i in range(3)]
    multipart = requests.post(f"{BASE}/vision/predict", files=files, timeout=60)
    as_json = requests.post(f"{BASE}/vision/predict", timeout=60,
                            json={"instances": [images[i].squeeze(-1).tolist() for i in range(3)]})
    big = np.kron(images[0].squeeze(-1), np.ones((4, 4), np.uint8))[..., None]  # 32x32: resized
    resized = _post_png("/vision/predict", big)
    octets = requests.post(f"{BASE}/vision/predict", data=_png(images[0]), timeout=60,
                           headers={"Content-Type": "application/octet-stream"})
    for reply in (multipart, as_json, resized, octets):
        assert reply.status_code == 200, reply.text
    assert [p["class_index"] for p in multipart.json()["predictions"]] == \
        [p["class_index"] for p in as_json.json()["predictions"]]
    assert octets.json()["predictions"][0]["class_index"] == \
        multipart.json()["predictions"][0]["class_index"]
    assert len(multipart.json()["predictions"][0]["top_k"]) == 5
    info = requests.get(f"{BASE}/vision/model", timeout=10).json()
    assert info["classes"] == [str(d) for d in range(10)] and info["input_shape"] == [1, 8, 8]
    assert info["model_version"] == multipart.json()["model_version"]
    assert info["batch_wait_ms"] == 20.0 and not info["batch_wait_auto"]  # as `served` set it
    second = requests.get(f"{BASE}/second/model", timeout=10).json()  # mounted beside /vision
    assert second["checkpoint"] != info["checkpoint"]
    assert second["model_version"] != info["model_version"]
    health = requests.get(f"{BASE}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["applications"]["vision"] == "RUNNING"
    unknown = requests.get(f"{BASE}/nosuch/predict", timeout=10)
    assert unknown.status_code == 404 and "/nosuch/predict" in unknown.json()["error"]
    posted = requests.post(f"{BASE}/healthz", timeout=10)
    assert posted.status_code == 405 and posted.headers["Allow"] == "GET, HEAD", posted.text
    assert "/predict" in requests.get(f"{BASE}/vision/openapi.json", timeout=10).json()["paths"]


def _bad_requests(image: np.ndarray) -> dict[str, tuple[dict, int]]:
    png = _png(image)
    huge = _png(np.zeros((400, 400, 1), np.uint8))  # 160,000 pixels > --max-pixels 150000
    large = _png(np.zeros((300, 300, 1), np.uint8))  # 90,000 pixels: two hold more than 150000
    instance = image.squeeze(-1).tolist()
    as_json = {"headers": {"Content-Type": "application/json"}}
    return {
        "empty body": ({"data": b"", "headers": {"Content-Type": "image/png"}}, 400),
        "truncated png": ({"data": png[: len(png) // 2], "headers": {"Content-Type": "image/png"}},
                          400),
        "not an image": ({"data": b"hello", "headers": {"Content-Type": "image/jpeg"}}, 400),
        "content type": ({"data": png, "headers": {"Content-Type": "text/plain"}}, 415),
        "pixel bomb": ({"data": huge, "headers": {"Content-Type": "image/png"}}, 413),
        "pixels in all": ({"files": [("files", (f"{i}.png", large, "image/png"))
                                     for i in range(2)]}, 413),
        "body too big": ({"data": b"\0" * (1024 * 1024 + 1),
                          "headers": {"Content-Type": "image/png"}}, 413),
        "bad json": ({"data": b'{"instances": [', **as_json}, 400),
        "json nested too deep": ({"data": b"[" * 100_000, **as_json}, 400),
        "json not object": ({"data": b"[1, 2]", **as_json}, 400),
        "wrong shape": ({"data": json.dumps({"instances": [[1, 2, 3]]}), **as_json}, 400),
        "strings": ({"data": json.dumps({"instances": [[["a"]]]}), **as_json}, 400),
        "nan": ({"data": json.dumps({"instances": [[[float("nan")] * 8] * 8]}), **as_json}, 400),
        "infinity": ({"data": '{"instances": [[[Infinity]]]}', **as_json}, 400),
        "out of range": ({"data": json.dumps({"instances": [[[300] * 8] * 8]}), **as_json}, 400),
        # Beyond a float64 (as an array it would overflow), and beyond Python's digit limit.
        "huge integer": ({"data": '{"instances": [[[1%s]]]}' % ("0" * 400), **as_json}, 400),
        "huger integer": ({"data": '{"instances": [[[9%s]]]}' % ("0" * 5000), **as_json}, 400),
        "too many": ({"data": json.dumps({"instances": [instance] * 9}), **as_json}, 413),
        "json pixels in all": ({"data": json.dumps({"instances": [[[0] * 300] * 300] * 2}),
                                **as_json}, 413),
        "too many files": ({"files": [("files", (f"{i}.png", png, "image/png"))
                                      for i in range(9)]}, 413),
        "far too many files": ({"files": [("files", (f"{i}.png", png, "image/png"))
                                          for i in range(12)]}, 413),
        "no instances": ({"data": json.dumps({"instances": []}), **as_json}, 400),
        "bad multipart": ({"data": b"junk", "headers": {
            "Content-Type": "multipart/form-data; boundary=x"}}, 400),
    }


def test_large_inputs_decoded_off_the_event_loop_get_the_same_answers(served, validation):
    """Inputs past INLINE_PIXELS or INLINE_JSON_BYTES decode on a worker thread; small ones
    inline. Digits scaled up 25x (200x200, resized back by the replica) take the thread path."""
    images, _ = validation
    large = [np.kron(images[i].squeeze(-1), np.ones((25, 25), np.uint8))[..., None]
             for i in range(3)]
    assert serve_app.INLINE_PIXELS < len(large) * 200 * 200 <= int(LIMITS[1])
    files = [("files", (f"{i}.png", _png(image), "image/png")) for i, image in enumerate(large)]
    multipart = requests.post(f"{BASE}/vision/predict", files=files, timeout=60)
    body = json.dumps({"instances": [image.squeeze(-1).tolist() for image in large]})
    assert len(body) > serve_app.INLINE_JSON_BYTES
    as_json = requests.post(f"{BASE}/vision/predict", data=body, timeout=60,
                            headers={"Content-Type": "application/json"})
    one_by_one = [_post_png("/vision/predict", image) for image in large]  # 40,000 px: inline
    expected = [reply.json()["predictions"][0]["top_k"] for reply in one_by_one]
    for reply in (multipart, as_json):
        assert reply.status_code == 200, reply.text
        for got, want in zip(reply.json()["predictions"], expected):
            assert [s["class_index"] for s in got["top_k"]] == [s["class_index"] for s in want]
            assert got["top_k"][0]["probability"] == pytest.approx(want[0]["probability"],
                                                                   abs=1e-5)
    png = _png(large[1])
    files[1] = ("files", ("broken.png", png[: len(png) // 2], "image/png"))
    broken = requests.post(f"{BASE}/vision/predict", files=files, timeout=60)
    assert broken.status_code == 400 and "broken.png" in broken.json()["error"]


@pytest.mark.parametrize("case", list(_bad_requests(np.zeros((8, 8, 1), np.uint8))))
def test_bad_input_gets_its_4xx_and_the_replica_keeps_serving(served, validation, case):
    images, _ = validation
    kwargs, status = _bad_requests(images[0])[case]
    reply = requests.post(f"{BASE}/vision/predict", timeout=60, **kwargs)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]
    assert _post_png("/vision/predict", images[0]).status_code == 200


def _stalled_upload(path: str) -> socket.socket:
    """A request that declares a 1000-byte PNG body, sends 3 bytes of it and waits."""
    sock = socket.create_connection(("127.0.0.1", PORT), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                 "Content-Length: 1000\r\n\r\nabc".encode())
    return sock


def _reply_text(sock: socket.socket) -> str:
    """What the server sends back, up to the end of a JSON body or the connection's close."""
    received = b""
    while not received.rstrip().endswith(b"}"):
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            break
        if not chunk:
            break
        received += chunk
    return received.decode(errors="replace")


def test_uploads_that_stall_get_408_and_keep_no_one_waiting(served, validation):
    """A request holds one of the replica's request slots (twice --max-batch-size) while its
    body is read: as many stalled uploads as slots kept every other client waiting."""
    images, _ = validation
    stalled = [_stalled_upload("/vision/predict") for _ in range(2 * 16)]
    try:
        ok = requests.post(f"{BASE}/vision/predict", data=_png(images[0]), timeout=30,
                           headers={"Content-Type": "image/png"})
        assert ok.status_code == 200
        replies = [_reply_text(sock) for sock in stalled]
    finally:
        for sock in stalled:
            sock.close()
    assert all(r.startswith("HTTP/1.1 408") for r in replies), replies[:2]
    assert all("did not all arrive within 3 s (3 bytes came)" in r for r in replies), replies[:2]


def test_api_key_guards_an_application(ray_address, served, checkpoints, validation):
    images, _ = validation
    done = run_cli("serve", f"secure={checkpoints[0]}", "--port", str(PORT), "--api-key", "s3cret",
                   "--detach", address=ray_address)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _post_png("/secure/predict", images[0]).status_code == 401
    assert requests.get(f"{BASE}/secure/model", timeout=10).status_code == 401
    assert requests.get(f"{BASE}/secure/healthz", timeout=10).json()["status"] == "ok"
    wrong = _post_png("/secure/predict", images[0], headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["error"]
    right = _post_png("/secure/predict", images[0], headers={"Authorization": "Bearer s3cret"})
    assert right.status_code == 200
    assert _post_png("/vision/predict", images[0]).status_code == 200  # the other app: no key


def test_query_prints_predictions(served, validation, tmp_path):
    images, _ = validation
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"digit{i}.png")
        paths[-1].write_bytes(_png(images[i]))
    done = run_cli("query", f"{BASE}/vision", *map(str, paths))
    assert done.returncode == 0, done.stderr
    for i, path in enumerate(paths):
        name = _post_png("/vision/predict", images[i]).json()["predictions"][0]["class_name"]
        assert f"{path}: {name}  (" in done.stdout
    pgm = tmp_path / "digit0.pgm"  # sent as image/x-portable-graymap, which Pillow reads
    Image.fromarray(images[0].squeeze(-1)).save(pgm)
    done = run_cli("query", f"{BASE}/vision", str(pgm))
    assert done.returncode == 0, done.stderr
    name = _post_png("/vision/predict", images[0]).json()["predictions"][0]["class_name"]
    assert f"{pgm}: {name}  (" in done.stdout
    nameless = tmp_path / "digit0"  # no extension: sent as octet-stream, read by its bytes
    nameless.write_bytes(paths[0].read_bytes())
    done = run_cli("query", f"{BASE}/vision", str(nameless))
    assert done.returncode == 0, done.stderr
    assert f"{nameless}: " in done.stdout
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    for args, words in (((f"{BASE}/vision", str(tmp_path / "missing.png")), "does not exist"),
                        ((f"{BASE}/vision", str(notes)), "answered 400"),
                        ((f"{BASE}/vision", str(tmp_path)), f"{tmp_path} is not a file"),
                        ((f"{BASE}/healthz", str(paths[0])), "answered 404: no such endpoint"),
                        ((f"{BASE}/vision", str(paths[0]), "--timeout", "0"), "above 0")):
        bad = run_cli("query", *args)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
        assert words in bad.stderr, bad.stderr


def test_update_swaps_the_model_without_failing_a_request(ray_address, served, checkpoints,
                                                           validation):
    images, _ = validation
    before = requests.get(f"{BASE}/vision/model", timeout=10).json()["model_version"]
    versions, failures, stop = [], [], threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                reply = _post_png("/vision/predict", images[len(versions) % len(images)])
                if reply.status_code == 200:
                    versions.append(reply.json()["model_version"])
                else:
                    failures.append(reply.status_code)
            except requests.RequestException as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    done = run_cli("serve", "update", "vision", "--checkpoint", checkpoints[1],
                   address=ray_address)
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join()
    assert done.returncode == 0, done.stderr[-2000:]
    after = requests.get(f"{BASE}/vision/model", timeout=10).json()["model_version"]
    assert failures == []
    assert before != after and after in done.stdout
    assert versions[0] == before and versions[-1] == after
    assert set(versions) == {before, after}


@pytest.fixture
def slow_checkpoint(tmp_path) -> str:
    """A ResNet-18 at 224x224, untrained: a real checkpoint whose forward pass takes a while."""
    model_cfg = ModelConfig(name="resnet18")
    model = build_model(model_cfg, num_classes=10, in_channels=3, image_size=224)
    meta = checkpoint.make_meta(model=model_cfg, classes=[str(i) for i in range(10)],
                                input_shape=(3, 224, 224),
                                normalization={"mean": [0.5] * 3, "std": [0.25] * 3},
                                data=DataConfig(source="shapes"))
    return str(checkpoint.save(tmp_path / "slow", model, meta))


def test_an_update_to_another_input_shape_is_refused(ray_address, served, slow_checkpoint):
    before = requests.get(f"{BASE}/vision/model", timeout=10).json()
    done = run_cli("serve", "update", "vision", "--checkpoint", slow_checkpoint,
                   address=ray_address)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "takes images of shape [3, 224, 224] (C, H, W), the running one [1, 8, 8]" in done.stderr
    after = requests.get(f"{BASE}/vision/model", timeout=10).json()
    assert after["model_version"] == before["model_version"]


def test_overload_gets_503_with_retry_after_quickly(ray_address, served, slow_checkpoint):
    done = run_cli("serve", f"slow={slow_checkpoint}", "--port", str(PORT), "--max-batch-size",
                   "1", "--max-queued-requests", "2", "--detach", address=ray_address)
    assert done.returncode == 0, done.stderr[-2000:]
    png = _png(np.zeros((224, 224, 3), np.uint8))

    def call(_) -> tuple[int, float, str | None]:
        started = time.monotonic()
        reply = requests.post(f"{BASE}/slow/predict", data=png, timeout=60,
                              headers={"Content-Type": "image/png"})
        return reply.status_code, time.monotonic() - started, reply.headers.get("Retry-After")

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, range(24)))
    ok = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 503]
    assert len(ok) + len(rejected) == 24 and ok and rejected
    assert all(retry == "1" for _, _, retry in rejected)
    assert max(seconds for _, seconds, _ in rejected) < max(seconds for _, seconds, _ in ok)


def test_serve_build_writes_a_config_that_validates_and_deploys_and_autoscales(
        ray_address, served, digits_run, checkpoints, validation, tmp_path):
    """Last in the module: `serve deploy` replaces every application with the file's. It is
    given the run directory, which stands for the run's best checkpoint."""
    import ray
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "serve.yaml"
    done = run_cli("serve", "build", f"built={digits_run[0]}", "--port", str(PORT),
                   "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "2",
                   "--access-log", "-o", str(out))
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path.startswith("distdl.") and app.route_prefix == "/built"
    assert config["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] == 2
    dashboard = "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]
    serve_cli = str(Path(sys.executable).parent / "serve")
    deployed = subprocess.run([serve_cli, "deploy", str(out), "-a", dashboard],
                              capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stderr[-2000:]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        reply = requests.get(f"{BASE}/built/model", timeout=10)
        if reply.status_code == 200:
            break
        time.sleep(1)
    assert reply.status_code == 200 and reply.json()["checkpoint"] == checkpoints[0]
    assert _replicas_under_load("built", images=validation[0], want=2) == 2
    # The access log is off by default (the `served` fixture's /vision), on with --access-log.
    assert _access_log_lines("built", "POST /built/predict 200") > 0
    assert _access_log_lines("vision", "/predict") == 0


def _access_log_lines(app: str, text: str) -> int:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return sum(line.count(text) for path in logs.glob(f"replica_{app}_*.log")
               for line in path.read_text().splitlines())


def _replicas_under_load(app: str, *, images: np.ndarray, want: int) -> int:
    """Load the application with 16 clients until it runs `want` replicas (60 s at most)."""
    from ray import serve

    stop = threading.Event()

    def client(k: int) -> None:
        while not stop.is_set():
            _post_png(f"/{app}/predict", images[k])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for thread in threads:
        thread.start()
    running, deadline = 0, time.monotonic() + 60
    try:
        while running < want and time.monotonic() < deadline:
            time.sleep(1)
            states = serve.status().applications[app].deployments["VisionService"].replica_states
            running = states.get("RUNNING", 0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return running


def test_serve_refuses_bad_checkpoints_and_options_in_one_line(checkpoints, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("{not json")
    cases = {
        "does not exist": ("serve", str(tmp_path / "nothing")),
        "corrupt checkpoint metadata": ("serve", str(tmp_path / "bad")),
        "copy it to one": ("serve", "s3://bucket/run/checkpoint_1"),
        "--detach needs a running cluster": ("serve", checkpoints[0], "--detach"),
        "not both": ("serve", checkpoints[0], "--replicas", "2", "--max-replicas", "3"),
        "would mount at /vision": ("serve", "build", checkpoints[0], checkpoints[1]),
        "no folder": ("serve", "build", checkpoints[0], "-o", str(tmp_path / "no" / "s.yaml")),
        "its nodes' environment chooses: RAY_SERVE_ENABLE_HA_PROXY=1": (
            "serve", checkpoints[0], "--ingress", "haproxy", "--address", "127.0.0.1:1"),
    }
    served_by_uri = run_cli("serve", "build", f"file://{checkpoints[0]}", "-o",
                            str(tmp_path / "uri.yaml"))  # a file:// URI is a local directory
    assert served_by_uri.returncode == 0, served_by_uri.stderr
    for words, args in cases.items():
        done = run_cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("error: ") and words in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
    wait = run_cli("serve", checkpoints[0], "--batch-wait-ms", "soon")  # argparse's own line
    assert wait.returncode == 2 and wait.stderr.count("\n") == 1, wait.stderr
    assert "batch wait must be 'auto' or milliseconds, got 'soon'" in wait.stderr


def test_local_serve_with_direct_ingress_answers_on_the_replica_port(checkpoints, validation):
    """No --address: distdl starts its own Ray; the `serve update` command it prints swaps the
    model from another process; SIGTERM (a service manager's stop) shuts it all down as
    gracefully as Ctrl-C."""
    images, _ = validation
    process = popen_cli("serve", checkpoints[0], "--port", str(PORT + 1), "--ingress", "direct",
                        address=None)
    output = _wait_for_line(process, "Ctrl-C stops")
    try:
        direct = [line.split()[-1] for line in output if "replica, direct:" in line]
        assert len(direct) == 1 and f":{PORT + 1}/" not in direct[0]
        reply = requests.post(direct[0], data=_png(images[0]), timeout=60,
                              headers={"Content-Type": "image/png"})
        assert reply.status_code == 200 and reply.json()["predictions"]
        swap = [line.split("swap a model: distdl ")[1].split() for line in output
                if "swap a model:" in line]
        assert len(swap) == 1, output
        command = [checkpoints[1] if word == "NEW" else word for word in swap[0]]
        done = run_cli(*command, address=None, env=fresh_shell_env())
        assert done.returncode == 0, done.stderr[-2000:]
        info = requests.get(f"http://127.0.0.1:{PORT + 1}/vision/model", timeout=30).json()
        assert info["model_version"] in done.stdout and info["checkpoint"] == checkpoints[1]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0
    deadline = time.monotonic() + 10  # the reader thread may not have taken the last lines yet
    while "stopped\n" not in output and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "stopped\n" in output and "Traceback" not in "".join(output), "".join(output)
    # Nothing of Ray's own between distdl's lines: Serve's INFO line as it starts, the retry
    # notice of its shutdown call.
    assert not [line for line in output if "Started Serve" in line or "(raylet)" in line], output


def _haproxy_listeners() -> list[tuple[str, int]]:
    """(address, port) of every TCP socket that an HAProxy process listens on."""
    haproxies = {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"}
    return sorted((c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN and c.pid in haproxies)


def test_local_serve_behind_haproxy_passes_answers_errors_and_overload_through(
        checkpoints, validation, slow_checkpoint):
    """By default a local Serve listens through HAProxy, with its stats page and Prometheus
    exporter on --host too, not on every interface. HAProxy forwards to the replicas' own
    ports: answers, a client's 4xx and the replica's 503 with Retry-After (HAProxy turns only
    its own errors into 500) reach the client as they left the replica. SIGTERM lets the
    replicas answer the requests in flight before the proxies go."""
    images, labels = validation
    port = PORT + 2
    process = popen_cli("serve", checkpoints[0], f"slow={slow_checkpoint}", "--port", str(port),
                        "--max-batch-size", "1", "--max-queued-requests", "2", address=None)
    output = _wait_for_line(process, "Ctrl-C stops")
    base = f"http://127.0.0.1:{port}"
    stopping = False
    try:
        listeners = _haproxy_listeners()
        assert ("127.0.0.1", port) in listeners and len(listeners) >= 3, listeners
        assert {address for address, _ in listeners} == {"127.0.0.1"}, listeners
        assert requests.get(f"{base}/healthz", timeout=30).status_code == 200
        info = requests.get(f"{base}/vision/model", timeout=30).json()
        assert info["batch_wait_auto"], "the default batch wait is measured in the replica"
        assert AUTO_WAIT_MS[0] <= info["batch_wait_ms"] <= AUTO_WAIT_MS[1]
        answers = [requests.post(f"{base}/vision/predict", data=_png(image), timeout=60,
                                 headers={"Content-Type": "image/png"}) for image in images[:20]]
        assert all(reply.status_code == 200 for reply in answers)
        predicted = [reply.json()["predictions"][0]["class_index"] for reply in answers]
        assert np.mean(np.array(predicted) == labels[:20]) >= 0.9
        empty = requests.post(f"{base}/vision/predict", data=b"", timeout=60,
                              headers={"Content-Type": "image/png"})
        assert empty.status_code == 400 and empty.json()["error"]
        png = _png(np.zeros((224, 224, 3), np.uint8))
        with ThreadPoolExecutor(24) as pool:
            replies = list(pool.map(lambda _: requests.post(
                f"{base}/slow/predict", data=png, timeout=60,
                headers={"Content-Type": "image/png"}), range(24)))
        statuses = sorted({reply.status_code for reply in replies})
        assert statuses == [200, 503], statuses
        assert all(r.headers.get("Retry-After") == "1" for r in replies if r.status_code == 503)
        # Fewer than the slow app holds (2 in its replica, 2 queued): once the first is
        # answered, the others are in flight when the stop begins. Each gets its answer (a
        # 503 too, should the replica still count an answered one), none a cut connection.
        with ThreadPoolExecutor(3) as pool:
            in_flight = [pool.submit(requests.post, f"{base}/slow/predict", data=png, timeout=60,
                                     headers={"Content-Type": "image/png"}) for _ in range(3)]
            wait(in_flight, return_when=FIRST_COMPLETED)
            process.send_signal(signal.SIGTERM)
            stopping = True
            answered = [reply.result().status_code for reply in in_flight]
        assert 200 in answered and set(answered) <= {200, 503}, answered
    finally:
        if not stopping:  # a second signal would cut the stop short
            process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0, "".join(output)[-3000:]


def test_a_port_in_use_is_one_line(checkpoints):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", checkpoints[0], "--port", str(port))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"error: Serve cannot start on 127.0.0.1:{port}")
    assert "Traceback" not in done.stderr


def test_a_killed_serve_leaves_nothing_on_its_port(checkpoints):
    """Killed outright (SIGKILL, the OOM killer), `distdl serve` cannot stop HAProxy itself;
    HAProxy must still go with Ray's processes, or the next `distdl serve` finds --port taken."""
    if deploy.default_ingress() != "haproxy":
        pytest.skip("needs HAProxy, the default ingress where ray[serve] installs it")
    port = PORT + 3
    process = popen_cli("serve", checkpoints[0], "--port", str(port), address=None)
    output = _wait_for_line(process, "Ctrl-C stops")
    assert ("127.0.0.1", port) in _haproxy_listeners(), "".join(output)
    process.kill()
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while ("127.0.0.1", port) in _haproxy_listeners() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ("127.0.0.1", port) not in _haproxy_listeners()
