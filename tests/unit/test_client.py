"""`distdl query` against servers that are not distdl's, or too slow: one clear error each."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distdl.errors import UserError
from distdl.inference.client import query


class _Handler(BaseHTTPRequestHandler):
    reply: dict = {}
    delay_s = 0.0

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(self.delay_s)
        body = json.dumps(self.reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    """A plain HTTP server on 127.0.0.1 whose handler class the test configures."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()
    httpd.server_close()
    _Handler.reply, _Handler.delay_s = {}, 0.0


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG")  # never decoded: these servers do not look
    return str(path)


def test_another_servers_predictions_are_not_taken_for_distdl_ones(server, image):
    url, handler = server
    handler.reply = {"predictions": [[0.1, 0.9]]}  # the shape of KServe v1 / TF Serving
    with pytest.raises(UserError, match="answered without distdl's predictions"):
        query(url, [image])


def test_distdl_shaped_replies_pass(server, image):
    url, handler = server
    handler.reply = {"model_version": "abc", "batch_size": 1, "predictions": [
        {"class_index": 1, "class_name": "1", "top_k": [{"class_name": "1", "probability": 0.9}]}]}
    assert query(url, [image]) == handler.reply


def test_a_server_slower_than_the_timeout_is_named_so(server, image):
    url, handler = server
    handler.delay_s = 1.5
    with pytest.raises(UserError, match=r"did not answer within 0.5 s .*raise --timeout"):
        query(url, [image], timeout_s=0.5)


@pytest.mark.parametrize("url", ["http://my..host:8000/vision", f"http://{'a' * 70}.local/x"])
def test_a_host_that_is_no_host_name_is_one_line(url, image):
    with pytest.raises(UserError, match=r"cannot send to .*\(check the URL\)"):
        query(url, [image])
