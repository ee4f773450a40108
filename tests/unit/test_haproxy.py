"""distdl's HAProxy launcher: wildcard listeners move to the serving host, and nothing else."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from distdl.inference import haproxy

CONFIG = """global
    maxconn 64
defaults
    mode http
    timeout connect 5s
    timeout client 5s
    timeout server 5s
frontend prometheus
    bind :19101
    http-request return status 200 if { path /metrics }
frontend http_frontend
    bind 127.0.0.1:18000
    http-request return status 200
listen stats
  bind *:18404
  stats enable
"""


def test_rebind_moves_only_the_wildcard_listeners():
    rebound = haproxy.rebind(CONFIG, "127.0.0.1")
    assert "    bind 127.0.0.1:19101\n" in rebound
    assert "  bind 127.0.0.1:18404\n" in rebound
    assert "    bind 127.0.0.1:18000\n" in rebound
    assert "bind 10.1.2.3:19101" in haproxy.rebind(CONFIG, "10.1.2.3")
    assert haproxy.rebind(rebound, "127.0.0.1") == rebound


def _launcher_or_skip() -> str:
    launcher, binary = haproxy.launcher(), haproxy.real_binary()
    if launcher is None or binary is None:
        pytest.skip(f"needs the {haproxy.LAUNCHER} command (pip install -e .) and an HAProxy "
                    "binary (ray[serve] installs one on Linux)")
    return launcher


def test_launcher_rewrites_the_config_then_runs_haproxy_on_it(tmp_path):
    launcher = _launcher_or_skip()
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG)
    # As Ray runs it: found through BINARY_ENV, which must not make it run itself again.
    # -c: HAProxy checks the config and exits, binding nothing.
    env = {**os.environ, haproxy.HOST_ENV: "127.0.0.1", haproxy.BINARY_ENV: launcher}
    done = subprocess.run([launcher, "-c", "-f", str(config)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert config.read_text() == haproxy.rebind(CONFIG, "127.0.0.1")
    config.write_text("this is not a config\n")
    broken = subprocess.run([launcher, "-c", "-f", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert broken.returncode != 0, "HAProxy itself must judge the config"


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_haproxy_stops_when_the_process_that_started_it_is_killed(tmp_path):
    launcher = _launcher_or_skip()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"defaults\n    mode http\n    timeout client 5s\n"
                      f"frontend web\n    bind 127.0.0.1:{port}\n    http-request return status 200\n")
    # The parent stands in for Ray's process that runs HAProxy; -db keeps HAProxy in it.
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen(sys.argv[1:]); time.sleep(120)",
                               launcher, "-db", "-f", str(config)])
    try:
        assert _wait(lambda: _listening(port), 30), "HAProxy did not start"
    finally:
        parent.kill()
        parent.wait()
    stopped = _wait(lambda: not _listening(port), 10)
    for orphan in psutil.process_iter(["cmdline"]):
        if str(config) in (orphan.info["cmdline"] or []):
            orphan.kill()
    assert stopped, "HAProxy outlived the process that started it"
