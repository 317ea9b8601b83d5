import pytest

from quantlab.errors import DataError
from quantlab.evaluate import text as text_mod


def test_dataset_name_reads_from_the_data_dir(tmp_path):
    (tmp_path / "wikitext2_raw").mkdir()
    (tmp_path / "wikitext2_raw" / "wiki.test.raw").write_text(" = Title = \n some text \n")
    src = text_mod.resolve_text("wikitext2_raw", tmp_path)
    assert src.name == "wikitext2_raw" and src.read().startswith(" = Title")
    assert len(src.sha256) == 64


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_DATA_DIR", str(tmp_path))
    assert text_mod.data_dir() == tmp_path
    with pytest.raises(DataError, match="does not exist"):
        text_mod.resolve_text("c4_calibration")


def test_non_utf8_text_is_an_error(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 ".encode("latin-1") * 10)
    with pytest.raises(DataError, match="not UTF-8"):
        text_mod.resolve_text(str(f))


def test_self_text_is_generated_once_and_cached(tiny_dir, quantlab_home):
    from quantlab.models.source import resolve_model

    source = resolve_model(str(tiny_dir))
    first = text_mod.resolve_text("self", model=source)
    cached = list((quantlab_home / "text").glob("self-*.txt"))
    assert len(cached) == 1 and first.name == "self"
    mtime = cached[0].stat().st_mtime_ns
    second = text_mod.resolve_text("self", model=source)
    assert second.sha256 == first.sha256 and cached[0].stat().st_mtime_ns == mtime
    assert len(first.read().split()) > 100
