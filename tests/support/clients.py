"""Install real client programs (aider, Claude Code) into `.cache/clients`, once per machine.

Their dependencies clash with Serai's (aider-chat pins dozens of packages), so each gets a
directory of its own: a venv made with the base interpreter of the test venv, or an npm prefix.
A stamp file records what was installed; a changed pin reinstalls, an unchanged one costs
nothing. A lock keeps two test sessions from installing into the same directory at once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO, _missing

CACHE = Path(os.environ.get("SERAI_TEST_CLIENTS_CACHE", REPO / ".cache" / "clients"))
INSTALL_TIMEOUT_S = 1200


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.parent.mkdir(parents=True, exist_ok=True)
    with (home.parent / f"{home.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _install(home: Path, wanted: str, steps: list[list[str]]) -> None:
    """Run `steps` into a fresh `home` unless its stamp already says `wanted`."""
    stamp = home / "installed.txt"
    if stamp.exists() and stamp.read_text() == wanted:
        return
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
                                cwd=home)
        if result.returncode != 0:
            output = (result.stdout + result.stderr)[-4000:]
            pytest.fail(f"installing {wanted!r} into {home} failed at {step[:4]}:\n{output}")
    stamp.write_text(wanted)


def python_client(name: str, requirement: str, *, executable: str) -> Path:
    """The path of `executable` in a venv of its own holding `requirement` (pip syntax)."""
    home = CACHE / name
    base_python = getattr(sys, "_base_executable", sys.executable)
    venv_python = str(home / "venv" / "bin" / "python")
    with _locked(home):
        _install(home, requirement, [
            [base_python, "-m", "venv", str(home / "venv")],
            [venv_python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             requirement],
        ])
    return home / "venv" / "bin" / executable


def npm_client(name: str, package: str, *, executable: str) -> Path:
    """The path of `executable` from `package` (npm syntax, name@version) in a prefix of its own.

    npm comes with Node.js, which a fresh machine may lack: the test skips then (fails under
    SERAI_TEST_REQUIRE_SERVICES=1)."""
    npm = shutil.which("npm")
    if npm is None:
        _missing(f"npm (Node.js) is not installed: {package} installs with npm")
    assert npm is not None
    home = CACHE / name
    with _locked(home):
        _install(home, package, [
            [npm, "install", "--prefix", str(home), "--no-save", "--no-audit", "--no-fund",
             "--loglevel=error", package],
        ])
    return home / "node_modules" / ".bin" / executable
