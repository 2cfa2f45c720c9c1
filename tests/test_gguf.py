"""Model-file safety: crafted GGUF headers are refused before llama.cpp opens them, model files
are served only from the model directories, and pinned SHA-256s are checked.

The crafted files are a few hundred bytes built here with struct; only
`test_the_bundled_model_passes` reads a real model (the session's prepared bundled file).
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serai.cli import app
from serai.config import Settings
from serai.engines.gguf import validate_gguf
from serai.engines.models import admit_model, check_gguf
from serai.engines.router import Router
from serai.errors import InvalidRequest, ModelFileError
from serai.fleet import Fleet

U8, U32, F32, STRING, ARRAY = 0, 4, 6, 8, 9
HUGE = 1 << 60


def string(text: str | bytes, *, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def kv(key: str, kind: int, value: bytes) -> bytes:
    return string(key) + struct.pack("<I", kind) + value


def tensor(name: str, dims: list[int], kind: int = 0, offset: int = 0) -> bytes:
    return (string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d)
            for d in dims) + struct.pack("<IQ", kind, offset))


def gguf(metadata: list[bytes] | None = None, tensors: list[bytes] | None = None, *,
         version: int = 3, tensor_count: int | None = None, metadata_count: int | None = None,
         data: bytes = b"\0" * 32, magic: bytes = b"GGUF") -> bytes:
    """A GGUF file; the counts default to the entries given, the data follows at 32 bytes."""
    metadata = [kv("general.architecture", STRING, string("llama"))] if metadata is None \
        else metadata
    tensors = [tensor("t", [8])] if tensors is None else tensors
    header = magic + struct.pack("<IQQ", version,
                                 len(tensors) if tensor_count is None else tensor_count,
                                 len(metadata) if metadata_count is None else metadata_count)
    header += b"".join(metadata) + b"".join(tensors)
    return header + b"\0" * (-len(header) % 32) + data


@pytest.fixture
def write(tmp_path: Path):  # type: ignore[no-untyped-def]
    def write(content: bytes, name: str = "model.gguf") -> Path:
        path = tmp_path / name
        path.write_bytes(content)
        return path
    return write


def refused(path: Path) -> str:
    """The message a crafted file is refused with; the check stays within a few MiB."""
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError) as caught:
            check_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"validating a {path.stat().st_size}-byte file took {peak} bytes"
    message = str(caught.value)
    assert str(path) in message
    return message


def test_a_well_formed_file_passes(write) -> None:  # type: ignore[no-untyped-def]
    header = validate_gguf(write(gguf()))
    assert (header.version, header.tensor_count, header.metadata_count) == (3, 1, 1)
    assert header.data_offset % 32 == 0 and header.file_size == header.data_offset + 32


@pytest.mark.parametrize(("content", "expected"), [
    (gguf(magic=b"\x80\x04\x95\x00"), "not a GGUF file (it does not start with 'GGUF')"),
    (b"GG", "not a GGUF file"),
    (gguf(version=1), "GGUF version 1 is not supported (only 2 and 3)"),
    (gguf(version=0x03000000), "a big-endian file?"),
    (b"GGUF\x03\x00\x00\x00\x01\x00", "the file ends inside the tensor count (2 of its 8 bytes): it "
     "is truncated"),
    (gguf()[:40], "bytes left"),
    (gguf()[:86], "the file ends inside dimension 0 of tensor 0 ('t') (4 of its 8 bytes)"),
    (gguf()[:120], "the file ends (120 bytes) before its tensor data starts (byte 128)"),
    (gguf(metadata_count=HUGE), "it claims 1,152,921,504,606,846,976 metadata keys"),
    (gguf(metadata_count=1000), "the header (1,000 metadata keys and 1 tensors) needs at least "
     "13,024 bytes but the file has"),
    (gguf([kv("general.name", STRING, string("x", length=HUGE))]),
     "metadata key 0 ('general.name') claims a 1,152,921,504,606,846,976-byte string but the "
     "file has"),
    (gguf([string("k", length=HUGE)]), "the name of metadata key 0 is 1,152,921,504,606,846,976 "
     "bytes long"),
    (gguf([kv("tokens", ARRAY, struct.pack("<IQ", U8, HUGE))]),
     "metadata key 0 ('tokens') claims an array of 1,152,921,504,606,846,976 items"),
    (gguf([kv("scores", ARRAY, struct.pack("<IQ", F32, 1_000_000))]),
     "metadata key 0 ('scores') (1,000,000 float32 items) claims 4,000,000 bytes"),
    (gguf([kv("tokens", ARRAY, struct.pack("<IQ", STRING, 1_000_000))]),
     "metadata key 0 ('tokens') (1,000,000 strings) claims 8,000,000 bytes"),
    (gguf([kv("tokens", ARRAY, struct.pack("<IQ", STRING, 2) + string("a")
              + string("b", length=HUGE))]),
     "item 1 of metadata key 0 ('tokens') claims a 1,152,921,504,606,846,976-byte string"),
    (gguf([kv("nested", ARRAY, struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", U8, 1) + b"x")]),
     "metadata key 0 ('nested') is an array of arrays, which is not accepted"),
    (gguf([kv("odd", 13, b"\0" * 8)]), "metadata key 0 ('odd') has unknown type 13"),
    (gguf([kv("general.alignment", U32, struct.pack("<I", 3))]), "is 3, not a power of two"),
    (gguf([kv("a", U8, b"x"), kv("a", U8, b"y")]), "metadata key 1 ('a') appears twice"),
    (gguf([kv("split.count", 2, struct.pack("<H", 3))]), "the first of 3 split files"),
    (gguf(tensor_count=1000), "the header (1 metadata keys and 1,000 tensors) needs at least"),
    (gguf(tensor_count=HUGE), "it claims 1,152,921,504,606,846,976 tensors"),
    (gguf(tensors=[tensor("t", [1] * 1000)]), "tensor 0 ('t') has 1,000 dimensions (at most 4)"),
    (gguf(tensors=[tensor("t", [8], kind=99)]), "tensor 0 ('t') has ggml type 99"),
    (gguf(tensors=[tensor("t", [1 << 40, 1 << 40])]), "tensor 0 ('t') claims "
     "4,835,703,278,458,516,698,824,704 bytes of data but the whole file has"),
    (gguf(tensors=[tensor("t", [8], offset=32)]), "tensor 0 ('t') claims bytes 32 to 64 of the "
     "tensor data but the file has 32"),
    (gguf(tensors=[tensor("t", [8], offset=5)]), "starts at offset 5, not a multiple of the "
     "alignment 32"),
    (gguf(tensors=[tensor("t", [100], kind=12)]), "not a multiple of the type's block of 256"),
    (gguf(tensors=[tensor("t", [4]), tensor("t", [4], offset=0)]), "tensor 1 ('t') appears twice"),
], ids=["magic", "tiny", "version-1", "big-endian", "truncated-counts", "truncated-metadata",
        "truncated-tensor-info", "truncated-before-data",
        "huge-metadata-count", "metadata-count-beyond-file", "huge-string", "huge-key",
        "huge-array", "array-beyond-file", "string-array-beyond-file", "huge-string-in-array",
        "nested-array", "unknown-type", "bad-alignment", "duplicate-key", "split",
        "tensor-count-beyond-file", "huge-tensor-count", "too-many-dims", "unknown-ggml-type",
        "huge-tensor", "tensor-beyond-file", "misaligned-tensor", "partial-block",
        "duplicate-tensor"])
def test_crafted_headers_are_refused_with_the_reason(write, content: bytes,  # type: ignore[no-untyped-def]
                                                      expected: str) -> None:
    assert expected in refused(write(content))


def test_the_bundled_model_passes(bundled_gguf: Path) -> None:
    header = validate_gguf(bundled_gguf)
    assert header.version == 3 and header.tensor_count > 100
    assert header.data_offset < header.file_size


# --- model directories and pinned digests ------------------------------------------------------

def test_only_gguf_files_are_served(write, tmp_path: Path, no_config: None) -> None:  # type: ignore[no-untyped-def]
    for name in ("model.bin", "model.pt", "model.safetensors", "model.pkl", "model"):
        path = write(gguf(), name)  # a GGUF inside, but the name says otherwise
        with pytest.raises(ModelFileError, match="Serai serves only files named"):
            admit_model(path, Settings(data_dir=tmp_path / "d", model=path))
    good = write(gguf(), "Model.GGUF")
    assert admit_model(good, Settings(data_dir=tmp_path / "d", model=good)) == good


def test_files_outside_the_model_dirs_are_refused(tmp_path: Path, no_config: None) -> None:
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    models.mkdir()
    elsewhere.mkdir()
    outside = elsewhere / "evil.gguf"
    outside.write_bytes(gguf())
    inside = models / "ok.gguf"
    inside.write_bytes(gguf())
    strict = Settings(data_dir=tmp_path / "d", model_dirs=[models])
    assert admit_model(inside, strict) == inside
    with pytest.raises(ModelFileError, match=r"evil.gguf is outside the model directories"):
        admit_model(outside, strict)
    link = models / "link.gguf"  # inside by name, outside once the symlink is followed
    link.symlink_to(outside)
    with pytest.raises(ModelFileError, match="it resolves to .*evil.gguf.*outside"):
        admit_model(link, strict)
    # By default a file is served from the directory it is named in, but a link there that
    # leads elsewhere is not
    assert admit_model(outside, Settings(data_dir=tmp_path / "d", model=outside)) == outside
    with pytest.raises(ModelFileError, match="outside the model directories"):
        admit_model(link, Settings(data_dir=tmp_path / "d", model=link))
    with pytest.raises(ModelFileError, match="outside the model directories"):
        admit_model(outside, Settings(data_dir=tmp_path / "d", model=inside,
                                      models=[{"name": "a", "path": str(inside)}]))


def test_a_pinned_sha256_must_match(write, tmp_path: Path, no_config: None) -> None:  # type: ignore[no-untyped-def]
    path = write(gguf())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    settings = Settings(data_dir=tmp_path / "d", model=path, model_sha256=digest.upper())
    assert settings.model_sha256 == digest  # as sha256sum prints it, either case
    assert admit_model(path, settings, sha256=settings.model_sha256) == path
    path.write_bytes(gguf(data=b"\1" * 32))  # the same size, other weights
    with pytest.raises(ModelFileError, match=f"does not match its pinned SHA-256: the "
                       f"configuration says {digest}, the file is [0-9a-f]{{64}}"):
        admit_model(path, settings, sha256=settings.model_sha256)
    with pytest.raises(ValueError, match="model_sha256"):
        Settings(model_sha256="abc")
    [entry] = Settings(models=[{"name": "m", "path": str(path), "sha256": digest}]).models
    assert entry.sha256 == digest


def test_serve_refuses_a_crafted_file_with_the_reason(write, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                      no_config: None) -> None:
    crafted = write(gguf([kv("tokens", ARRAY, struct.pack("<IQ", U8, HUGE))]))
    # A real process, as an operator starts it (in no_config's environment): it stops before
    # the database or a port.
    process = subprocess.run([sys.executable, "-m", "serai", "serve", "--port", "0",
                              "--model", str(crafted), "--data-dir", str(tmp_path / "d")],
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == 1
    message = " ".join(process.stderr.split())
    assert "metadata key 0 ('tokens') claims an array of 1,152,921,504,606,846,976 items" \
        in message and str(crafted) in message
    assert "Traceback" not in message
    assert not (tmp_path / "d" / "serai.db").exists()


def test_serve_refuses_a_models_entry_whose_digest_differs(write, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           no_config: None) -> None:
    config = tmp_path / "serai.toml"
    good = write(gguf(), "good.gguf")
    config.write_text(f'[[models]]\nname = "m"\npath = "{good}"\nsha256 = "{"0" * 64}"\n')
    monkeypatch.setenv("SERAI_CONFIG", str(config))
    result = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 1
    assert "does not match its pinned SHA-256" in " ".join(result.output.split())
    assert not (tmp_path / "d" / "serai.db").exists()


def test_models_list_refuses_a_crafted_file(write, tmp_path: Path, no_config: None) -> None:  # type: ignore[no-untyped-def]
    crafted = write(gguf(version=7))
    result = CliRunner().invoke(app, ["models", "list", "--model", str(crafted),
                                      "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 1 and "GGUF version 7 is not supported" in result.output


async def test_a_reload_to_a_crafted_file_changes_nothing(write, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          no_config: None) -> None:
    upstream = {"name": "up", "base_url": "http://127.0.0.1:9/v1", "deployment": "up"}
    before = Settings(data_dir=tmp_path / "d", embedded=False, upstreams=[upstream])
    crafted = write(gguf([kv("general.name", STRING, string("x", length=HUGE))]))
    after = Settings(data_dir=tmp_path / "d", upstreams=[upstream],
                     models=[{"name": "m", "path": str(crafted)}])
    router = Router()
    fleet = Fleet(router, reread=lambda: after)
    await fleet.apply(before)
    [deployment] = router.all()
    with pytest.raises(InvalidRequest, match="nothing was changed.*-byte string"):
        await fleet.reload()
    assert router.all() == [deployment] and not fleet.draining
    await router.aclose()
