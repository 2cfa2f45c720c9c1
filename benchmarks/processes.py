"""Child server processes for the benchmarks: started, waited for, measured and stopped.

Shared by the benchmark scripts; it imports nothing heavy (no llama_cpp), so any of them can use
it.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
from pathlib import Path

from serai.testing.processes import wait_until_ready


def die_with_parent() -> None:
    # Children get SIGTERM if this script dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG).
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


class Server:
    """A child server process with its log in `log_path`, ready once `ready_url` answers 200."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path,
                 ready_url: str, base_url: str = "", ready_timeout_s: float = 300) -> None:
        self.name, self.log_path, self.base_url = name, log_path, base_url
        self.api_key: str | None = None
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=log_path.parent, preexec_fn=die_with_parent)
        # On failure the process has exited, or wait_until_ready has killed it.
        wait_until_ready(self.process, ready_url, log_path, timeout=ready_timeout_s, name=name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def memory_mib(self) -> dict[str, float]:
        pid = self.process.pid
        return {"peak_rss_mib": proc_status_kib(pid, "VmHWM") / 1024,
                "rss_mib": proc_status_kib(pid, "VmRSS") / 1024}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
