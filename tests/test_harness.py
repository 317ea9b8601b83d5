"""lm-eval's own tasks, offline, on local files: converters, the override YAMLs, per-sample scores."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
from suite_data import write_arc, write_hellaswag, write_lambada, write_piqa, write_wikitext, write_winogrande

from quantlab.errors import DataError, UsageError
from quantlab.evaluate.harness import HarnessSettings, check_tasks, prepare_tasks, run_tasks
from quantlab.evaluate.tasks import TASKS, convert

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_arc(root / "arc_challenge" / "ARC-Challenge-Test.jsonl", 12)
    write_winogrande(root / "winogrande", 10)
    write_piqa(root / "piqa", 10)
    write_hellaswag(root / "hellaswag" / "hellaswag_val_full.txt")
    write_lambada(root / "lambada_openai" / "lambada_test.jsonl", 11)
    write_wikitext(root / "wikitext2_raw" / "wiki.test.raw", 7)
    return root


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    from quantlab.models.load import load_causal_lm, load_tokenizer

    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the autouse per-test home is not set up yet
        mp.setenv("QUANTLAB_HOME", str(tmp_path_factory.mktemp("home")))
        return load_causal_lm(tiny_dir), load_tokenizer(tiny_dir)


def test_arc_and_winogrande_public_layouts_convert(data_dir):
    arc = convert.arc([data_dir / "arc_challenge" / "ARC-Challenge-Test.jsonl"])
    assert len(arc) == 12 and set(arc[0]) == {"id", "question", "choices", "answerKey"}
    assert arc[0]["choices"]["label"] == ["A", "B", "C", "D"] and isinstance(arc[0]["question"], str)
    wino = convert.winogrande([data_dir / "winogrande" / "dev.jsonl", data_dir / "winogrande" / "dev-labels.lst"])
    assert len(wino) == 10 and all(w["answer"] in ("1", "2") for w in wino)
    labels = (data_dir / "winogrande" / "dev-labels.lst").read_text().split()
    assert [w["answer"] for w in wino] == labels


def test_hellaswag_text_gets_lm_eval_capitalisation(data_dir):
    docs = convert.hellaswag([data_dir / "hellaswag" / "hellaswag_val_full.txt"])
    assert docs[0]["ctx_a"] == "A man is sitting on a roof." and docs[0]["ctx_b"] == "he"
    assert docs[1]["ctx_b"] == ""  # WikiHow context: complete sentences
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs  # lm-eval's own preprocessing, unchanged

    processed = process_docs(datasets.Dataset.from_list(docs))
    assert processed[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert processed[0]["gold"] == 3


def test_mismatched_label_file_is_named(tmp_path):
    folder = write_winogrande(tmp_path / "winogrande", 4)
    (folder / "dev-labels.lst").write_text("1\n2\n")
    with pytest.raises(DataError, match="dev-labels.lst has 2 labels for 4 items"):
        convert.winogrande([folder / "dev.jsonl", folder / "dev-labels.lst"])


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("name", [n for n in TASKS if n not in ("arc_challenge", "winogrande")])
def test_shared_data_converts_to_the_full_sets(name):
    task = TASKS[name]
    records = task.convert([SHARED / rel for rel in task.files])
    assert len(records) == task.items


def test_unknown_task_suggests_the_closest():
    with pytest.raises(UsageError, match="Unknown task 'helaswag'. Did you mean 'hellaswag'"):
        check_tasks(HarnessSettings(tasks=("helaswag",)))


def test_missing_file_names_file_and_data_dir(tmp_path):
    with pytest.raises(DataError, match=f"needs {tmp_path}/boolq/val.jsonl.*data dir {tmp_path}"):
        check_tasks(HarnessSettings(tasks=("boolq",), data_dir=str(tmp_path)))


def test_run_offline_with_per_sample_scores(tiny, data_dir, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    settings = HarnessSettings(tasks=("arc_challenge", "winogrande", "piqa"), data_dir=str(data_dir))
    result = run_tasks(*tiny, settings, prepare_tasks(settings))
    tasks = result["tasks"]
    assert list(tasks) == ["arc_challenge", "winogrande", "piqa"]
    for name, n in (("arc_challenge", 12), ("winogrande", 10), ("piqa", 10)):
        t = tasks[name]
        assert t["n"] == n and len(t["samples"]) == n and t["converted_items"] == n
        for row in t["samples"]:  # lm-eval's acc is the argmax of the stored log-likelihoods hitting the gold
            assert row["acc"] == float(max(range(len(row["ll"])), key=row["ll"].__getitem__) == row["gold"])
        assert t["metrics"]["acc"] == pytest.approx(sum(r["acc"] for r in t["samples"]) / n)
        assert t["stderr"]["acc"] == pytest.approx(math.sqrt(t["metrics"]["acc"] * (1 - t["metrics"]["acc"]) / (n - 1)))
    wino = json.loads((Path(prepare_tasks(settings).include_paths[1]).parent / "data" / "winogrande.jsonl")
                      .read_text().splitlines()[0])
    assert tasks["winogrande"]["samples"][0]["gold"] == int(wino["answer"]) - 1


def test_reruns_are_bit_identical_and_limit_takes_the_first_documents(tiny, data_dir):
    settings = HarnessSettings(tasks=("arc_challenge",), data_dir=str(data_dir), limit=5)
    first = run_tasks(*tiny, settings, prepare_tasks(settings))["tasks"]["arc_challenge"]["samples"]
    second = run_tasks(*tiny, settings, prepare_tasks(settings))["tasks"]["arc_challenge"]["samples"]
    assert first == second and [r["doc_id"] for r in first] == [0, 1, 2, 3, 4]


def _output(tiny, settings):
    """A `quantlab eval --output` file's content for ``settings``."""
    result = run_tasks(*tiny, settings, prepare_tasks(settings))
    samples = {t: info.pop("samples") for t, info in result["tasks"].items()}
    return {"model": "tiny", "runs": [{"recipe": "fp", "artifact": "x", "provenance": {"git_sha": str(settings.shard)},
                                       "accuracy": {**result, "settings": settings.to_dict(), "samples": samples}}]}


def test_shards_merge_into_the_unsharded_run(tiny, data_dir):
    from quantlab.evaluate.shards import merge_shards

    def output(settings):
        return _output(tiny, settings)

    tasks = ("arc_challenge", "piqa")
    full = output(HarnessSettings(tasks=tasks, data_dir=str(data_dir)))
    shards = [output(HarnessSettings(tasks=tasks, data_dir=str(data_dir), shard=(i, 3))) for i in (2, 0, 1)]
    assert [r["doc_id"] for r in shards[1]["runs"][0]["accuracy"]["samples"]["piqa"]] == [0, 3, 6, 9]
    merged_run = merge_shards(shards, ["a", "b", "c"])["runs"][0]
    merged, want = merged_run["accuracy"], full["runs"][0]["accuracy"]
    assert [(s["output"], s["shard"], s["git_sha"]) for s in merged_run["provenance"]["shards"]] == \
        [("a", "2/3", "(2, 3)"), ("b", "0/3", "(0, 3)"), ("c", "1/3", "(1, 3)")]
    for task in tasks:  # log-likelihoods move ~1e-6 with the batch's other documents (padding)
        got, ref = merged["samples"][task], want["samples"][task]
        assert [(r["doc_id"], r["gold"]) for r in got] == [(r["doc_id"], r["gold"]) for r in ref]
        assert [r["ll"] for r in got] == [pytest.approx(r["ll"], abs=1e-4) for r in ref]
        for metric, value in want["tasks"][task]["metrics"].items():
            assert merged["tasks"][task]["metrics"][metric] == pytest.approx(value)
            assert merged["tasks"][task]["stderr"][metric] == pytest.approx(want["tasks"][task]["stderr"][metric])
        assert merged["tasks"][task]["n"] == want["tasks"][task]["n"]
    with pytest.raises(UsageError, match="do not cover"):
        merge_shards(shards[:2], ["a", "b"])
    with pytest.raises(UsageError, match="--shard and --limit"):
        HarnessSettings(tasks=tasks, limit=3, shard=(0, 2))
    with pytest.raises(UsageError, match="is not a shard"):
        HarnessSettings(tasks=tasks, shard=(2, 2))


def test_merged_perplexities_are_lm_evals_on_the_unsharded_run(tiny, data_dir):
    """lambada_openai's perplexity is exp(-mean log-likelihood) over documents (its stderr lm-eval's bootstrap);
    wikitext's word/byte perplexities and bits per byte are weighted by each document's words or bytes."""
    from quantlab.evaluate.shards import merge_shards

    tasks = ("lambada_openai", "wikitext")
    settings = {"tasks": tasks, "data_dir": str(data_dir), "max_length": 128}
    full = _output(tiny, HarnessSettings(**settings))["runs"][0]["accuracy"]["tasks"]
    shards = [_output(tiny, HarnessSettings(**settings, shard=(i, 2))) for i in (0, 1)]
    out = merge_shards(shards, ["a", "b"])
    merged = out["runs"][0]["accuracy"]
    assert "exp(-mean over documents" in out["definitions"]["perplexity"]
    assert full["lambada_openai"]["aggregation"] == {"perplexity": "perplexity", "acc": "mean"}
    assert full["wikitext"]["aggregation"]["bits_per_byte"] == "bits_per_byte"
    for task, metrics in (("lambada_openai", ("perplexity", "acc")),
                          ("wikitext", ("word_perplexity", "byte_perplexity", "bits_per_byte"))):
        assert set(merged["tasks"][task]["metrics"]) == set(metrics) == set(full[task]["metrics"])
        for metric in metrics:  # log-likelihoods move ~1e-6 with the batch's other documents (padding)
            assert merged["tasks"][task]["metrics"][metric] == pytest.approx(full[task]["metrics"][metric], rel=1e-5)
            want = full[task]["stderr"][metric]
            assert merged["tasks"][task]["stderr"][metric] == (want if want is None else pytest.approx(want, rel=1e-4))
    lambada = merged["samples"]["lambada_openai"]
    assert merged["tasks"]["lambada_openai"]["metrics"]["perplexity"] == pytest.approx(
        math.exp(-sum(r["ll"] for r in lambada) / len(lambada)))
    assert full["lambada_openai"]["stderr"]["perplexity"] > 0  # lm-eval bootstrapped it


def test_a_metric_without_per_document_values_is_not_merged(tiny, data_dir):
    from quantlab.evaluate.shards import merge_shards

    settings = {"tasks": ("wikitext",), "data_dir": str(data_dir), "max_length": 128}
    shards = [_output(tiny, HarnessSettings(**settings, shard=(i, 2))) for i in (0, 1)]
    for shard in shards:
        for row in shard["runs"][0]["accuracy"]["samples"]["wikitext"]:
            del row["words"]
    with pytest.raises(UsageError, match="wikitext's word_perplexity needs each document's log-likelihood and words"):
        merge_shards(shards, ["a", "b"])
    shards[0]["runs"][0]["accuracy"]["tasks"]["wikitext"]["aggregation"]["word_perplexity"] = "median"
    with pytest.raises(UsageError, match="aggregated by lm-eval's median, which quantlab cannot rebuild"):
        merge_shards(shards, ["a", "b"])


def test_user_task_yaml_via_include_path(tiny, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"q": f"the city of {w}", "a": 0}) + "\n" for w in ("one", "two", "three")))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.yaml").write_text(
        "task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(docs) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n"
        "doc_to_choice: ['film', 'game']\nmetric_list:\n  - metric: acc\n")
    settings = HarnessSettings(tasks=("my_task",), include_path=str(tmp_path / "tasks"))
    result = run_tasks(*tiny, settings, prepare_tasks(settings))["tasks"]["my_task"]
    assert result["n"] == 3 and [r["gold"] for r in result["samples"]] == [0, 0, 0]
    assert result["note"] == "user task YAML"


@pytest.mark.parametrize("content, message", [
    (b"task: !!python/object/apply:os.system ['true']\n", "line 1: could not determine a constructor for the tag"),
    (b"task: \xff\n", "is not readable UTF-8 text"),
])
def test_an_unreadable_user_task_yaml_is_one_error_naming_it(tmp_path, content, message):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "bad.yaml").write_bytes(content)
    with pytest.raises(UsageError, match=message) as err:
        check_tasks(HarnessSettings(tasks=("my_task",), include_path=str(tmp_path / "tasks")))
    assert str(tmp_path / "tasks" / "bad.yaml") in str(err.value)


def test_suites_file_and_its_errors(tmp_path):
    from quantlab.evaluate.suites import load_suite, task_settings

    quick = load_suite("quick")
    assert quick.tasks == ("arc_easy", "hellaswag", "piqa") and quick.limit == 100
    assert load_suite("standard").limit is None and load_suite("quick", limit=5).limit == 5
    with pytest.raises(UsageError, match="Unknown suite 'quik'. Did you mean 'quick'"):
        load_suite("quik")
    bad = tmp_path / "s.yaml"
    bad.write_text("tasks: [piqa]\nlimt: 3\n")
    with pytest.raises(UsageError, match="unknown key\\(s\\) limt"):
        load_suite(str(bad))
    with pytest.raises(UsageError, match="not both"):
        task_settings("piqa", "quick")


@pytest.mark.parametrize("args, message", [
    (["--tasks", "piqa", "--suite", "quick"], "Give --tasks or --suite, not both"),
    ([], "Nothing to evaluate"),
    (["--tasks", "arc_easyy"], "Did you mean 'arc_easy'"),
    (["--tasks", "piqa", "--limit", "0"], "Invalid value for '--limit'"),
    (["--tasks", "piqa", "--shard", "1of2"], "is not I/N"),
])
def test_eval_bad_input_is_one_line(tiny_dir, args, message):
    from click.testing import CliRunner

    from quantlab.cli import cli

    res = CliRunner().invoke(cli, ["eval", str(tiny_dir), *args], obj={})
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
