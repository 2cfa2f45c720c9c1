"""Child processes for tests and benchmarks: a free port, and waiting until a started server
answers. Both tests/ and benchmarks/ start real servers this way."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_ready(process: subprocess.Popen[bytes], ready_url: str, log_path: Path, *,
                     timeout: float, name: str = "the server",
                     verify: ssl.SSLContext | bool = True) -> None:
    """Poll `ready_url` until it answers 200; raise RuntimeError with the end of the process's
    log if it exits or never does. `timeout` is a cap so a broken server cannot hang its
    caller, not a timing assertion. `verify`: the TLS trust of an https `ready_url`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{_tail(log_path)}")
        try:
            if httpx.get(ready_url, timeout=2, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise RuntimeError(f"{name} did not become ready:\n{_tail(log_path)}")


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-5000:]
