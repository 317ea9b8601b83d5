"""Inputs of gate, merge-shards and report that would make a verdict, a merge or a page say something false:
refused before any work with one line on stderr naming the file, the field and the fix (issue 31, classes 2, 3
and 7). Every input here is written by hand, shaped as quantlab writes it: no model runs."""

from __future__ import annotations

import copy
import json
import math

import pytest
from click.testing import CliRunner

from quantlab import store
from quantlab.cli import cli
from quantlab.errors import UsageError
from quantlab.gate import stats
from quantlab.gate.policy import load_policy
from quantlab.report import load_results

N = 40
SHA = "a" * 64


def _rows(n: int = N, wrong=(), start: int = 0, step: int = 1) -> list[dict]:
    """Multiple-choice rows (4 choices, gold 0) as the harness keeps them; ``wrong`` documents answer choice 1."""
    out = []
    for i in range(start, n, step):
        bad = i in wrong
        out.append({"doc_id": i, "acc": 0.0 if bad else 1.0, "acc_norm": 0.0 if bad else 1.0,
                    "ll": [-4.0, -1.0, -3.0, -2.0] if bad else [-1.0, -2.0, -3.0, -4.0], "gold": 0,
                    "choice_len": [5, 6, 7, 8]})
    return out


def _task(rows: list[dict], sha: str = SHA, n_total: int | None = None) -> dict:
    acc = sum(r["acc"] for r in rows) / len(rows) if rows else 0.0
    return {"metrics": {"acc": acc, "acc_norm": acc}, "stderr": {"acc": 0.01, "acc_norm": 0.01}, "n": len(rows),
            "n_total": n_total or len(rows), "output_type": "multiple_choice", "version": 1.0, "num_fewshot": 0,
            "files": {"/data/arc_easy/ARC-Easy-Test.jsonl": sha}, "aggregation": {"acc": "mean", "acc_norm": "mean"}}


def _settings(limit=None, shard=None) -> dict:
    return {"tasks": ["arc_easy"], "limit": limit, "batch_size": 8, "max_length": 2048, "num_fewshot": None,
            "bootstrap_iters": 1000, "data_dir": None, "include_path": None, "shard": shard}


def _eval_output(rows=None, *, model="tiny", artifact="/models/tiny", sha=SHA, limit=None, shard=None,
                 n_total=None) -> dict:
    """What `quantlab eval MODEL --tasks arc_easy --output F` writes."""
    rows = _rows() if rows is None else rows
    return {"model": model, "device": "cpu", "definitions": {},
            "runs": [{"recipe": "fp", "method": "fp", "artifact": artifact, "provenance": {"git_sha": "x"},
                      "accuracy": {"tasks": {"arc_easy": _task(rows, sha, n_total)},
                                   "settings": _settings(limit, shard), "samples": {"arc_easy": rows}, "wall_s": 1.0,
                                   "cpu_s": 1.0}}]}


def _write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], obj={})


def _one_line_error(res, code: int, *parts: str) -> str:
    """The result is exit ``code`` with one `Error: ...` line on stderr holding ``parts``, and nothing on stdout."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert res.stdout == "", res.stdout
    assert res.stderr.startswith("Error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr and " — " in res.stderr, res.stderr
    for part in parts:
        assert part in res.stderr, (part, res.stderr)
    return res.stderr


# ---------------------------------------------------------------------------------------------------- policies

@pytest.mark.parametrize("entry, key, shown", [
    ("max_drop: .nan", "max_drop", ".nan"),
    ("max_drop: .inf", "max_drop", ".inf"),
    ("max_drop: true", "max_drop", "true"),
    ("max_drop: '0.03'", "max_drop", "'0.03'"),
    ("max_drop: 3", "max_drop", "3"),  # a share: 3 tolerates every drop (3 % is 0.03)
    ("min_recovery: 0", "min_recovery", "0"),  # a lower-is-better rule divided by it
    ("min_recovery: 1.5", "min_recovery", "1.5"),  # beyond 1 it silently tolerated nothing
    ("min_recovery: .nan", "min_recovery", ".nan"),
    ("min_recovery: false", "min_recovery", "false"),
])
def test_a_policy_number_must_be_a_finite_number_in_range(tmp_path, entry, key, shown):
    policy = tmp_path / "p.yaml"
    policy.write_text(f"metrics:\n  - metric: arc_easy/acc\n    {entry}\n")
    with pytest.raises(UsageError) as info:
        load_policy(policy)
    message = str(info.value)
    assert str(policy) in message and f"(arc_easy/acc): {key} must be" in message and "finite number" in message
    assert f"(got {shown})" in message and f"e.g. {key}: " in message and "\n" not in message


@pytest.mark.parametrize("top, shown", [("alpha: .nan", ".nan"), ("alpha: true", "true"), ("alpha: 1", "1")])
def test_a_policy_alpha_must_be_a_finite_number_in_0_1(tmp_path, top, shown):
    policy = tmp_path / "p.yaml"
    policy.write_text(f"{top}\nmetrics:\n  - metric: arc_easy/acc\n")
    with pytest.raises(UsageError, match=rf"alpha must be in \(0, 1\), a finite number \(got {shown}\) — e\.g\. "):
        load_policy(policy)


@pytest.mark.parametrize("text, match", [
    ("inconclusive: true\nmetrics:\n  - metric: arc_easy/acc\n",
     r"inconclusive must be 'pass' or 'fail' \(got true\) —"),
    ("metrics:\n  - metric: arc_easy/acc\n    direction: true\n",
     r"direction must be 'higher' or 'lower' \(got true\) —"),
    ("metrics:\n  - metric: 5\n", r"metric 1: 5 is not <task>/<metric>"),
    ("metrics:\n  - {metric: arc_easy/acc, max_drop: 0.1}\n  - {metric: arc_easy/acc, min_recovery: 0.9}\n",
     r"metric arc_easy/acc is listed twice \(entries 1 and 2\) — keep one entry"),
    ("description: [a]\nmetrics:\n  - metric: arc_easy/acc\n", r"description must be text \(got \['a'\]\) — quote it"),
])
def test_other_bad_policy_values_are_named(tmp_path, text, match):
    policy = tmp_path / "p.yaml"
    policy.write_text(text)
    with pytest.raises(UsageError, match=match):
        load_policy(policy)


def test_the_gate_refuses_a_nan_tolerance_before_testing(tmp_path):
    base = _write(tmp_path / "base.json", _eval_output())
    cand = _write(tmp_path / "cand.json", _eval_output(_rows(wrong=range(20))))  # half the documents lost
    policy = tmp_path / "p.yaml"
    policy.write_text("metrics:\n  - metric: arc_easy/acc\n    max_drop: .nan\n")
    _one_line_error(_invoke("gate", "--baseline", base, "--candidate", cand, "--policy", policy,
                            "--json-out", tmp_path / "v.json"), 1, str(policy), "max_drop must be")
    assert not (tmp_path / "v.json").exists()


# ------------------------------------------------------------------------------------ comparable baseline/candidate

def _results(ref: str, fingerprint: str, rows=None, text_sha: str = "t" * 64, chunk_tokens: int = 256,
             kld=None) -> dict:
    """A quantize-and-compare results.json of one fp run with suite accuracy and per-window fidelity."""
    kld = [0.0] * 16 if kld is None else kld
    out = _eval_output(rows, model=ref)
    run = out["runs"][0]
    run.update(bits=32, params={"dtype": "auto"},
               fidelity={"kld_mean": sum(kld) / len(kld), "kld_per_window": kld, "nll_per_window": [3.0] * len(kld),
                         "chunks": len(kld), "tokens": len(kld) * (chunk_tokens - 1)},
               provenance={"text": {"name": "ref.txt", "sha256": text_sha},
                           "fidelity_settings": {"chunk_tokens": chunk_tokens, "max_chunks": 16}})
    out["model"] = {"ref": ref, "fingerprint": fingerprint, "path": None, "note": ""}
    out["text"] = {"name": "ref.txt", "sha256": text_sha}
    return out


def test_a_candidate_of_another_model_is_refused_naming_both(tmp_path):
    base = _write(tmp_path / "base.json", _results("smollm2-135m", "1" * 64))
    other = _write(tmp_path / "other.json", _results("qwen2.5-0.5b", "2" * 64))
    res = _invoke("gate", "--baseline", base, "--candidate", other, "--json-out", tmp_path / "v.json")
    _one_line_error(res, 1, "smollm2-135m", "qwen2.5-0.5b", "111111111111", "222222222222", "--allow-other-model")
    assert not (tmp_path / "v.json").exists()
    same = _write(tmp_path / "same.json", _results("./models/smollm2", "1" * 64))  # another name, the same weights
    assert _invoke("gate", "--baseline", base, "--candidate", same).exit_code == 0
    allowed = _invoke("gate", "--baseline", base, "--candidate", other, "--allow-other-model")
    assert allowed.exit_code == 0 and allowed.stdout.startswith("## quantlab gate: PASS"), allowed.output


def test_an_eval_output_against_another_fidelity_baseline_is_refused(tmp_path):
    base, cand = _eval_output(), _eval_output(model="/models/other")
    base["fidelity_baseline"] = {"ref": "tiny", "fingerprint": "1" * 64}
    cand["fidelity_baseline"] = {"ref": "other", "fingerprint": "3" * 64}
    res = _invoke("gate", "--baseline", _write(tmp_path / "b.json", base),
                  "--candidate", _write(tmp_path / "c.json", cand))
    _one_line_error(res, 1, "of model tiny", "of model /models/other", "--allow-other-model")


def test_stored_runs_of_two_models_are_refused(tmp_path):
    db = str(tmp_path / "s.db")
    ids = []
    for ref, fp in (("tiny", "1" * 64), ("other", "2" * 64)):
        record = {"run_set": f"set-{ref}", "model": {"ref": ref, "fingerprint": fp}, "recipe": "fp", "method": "fp",
                  "bits": 32, "artifact": f"/models/{ref}", "accuracy": _eval_output()["runs"][0]["accuracy"]}
        samples = record["accuracy"].pop("samples")
        ids.append(store.insert_run(db, record, samples))
    res = _invoke("gate", "--baseline", ids[0], "--candidate", ids[1], "--store", db)
    _one_line_error(res, 1, "tiny@fp", "other@fp", "--allow-other-model")
    assert _invoke("gate", "--baseline", ids[0], "--candidate", ids[0], "--store", db).exit_code == 0


@pytest.mark.parametrize("change, parts", [
    (dict(sha="b" * 64), ["arc_easy", "data sha256 aaaaaaaaaaaa", "on bbbbbbbbbbbb", "same data files"]),
    (dict(limit=20), ["arc_easy", "--limit unset", "--limit 20", "same --limit"]),
])
def test_a_candidate_scored_on_other_documents_is_refused(tmp_path, change, parts):
    rows = _rows(20) if change.get("limit") else None
    base = _write(tmp_path / "base.json", _eval_output())
    cand = _write(tmp_path / "cand.json", _eval_output(rows, **change))
    _one_line_error(_invoke("gate", "--baseline", base, "--candidate", cand), 1, *parts)


def test_a_candidate_scored_with_another_task_version_is_refused(tmp_path):
    data = _eval_output()
    data["runs"][0]["accuracy"]["tasks"]["arc_easy"]["version"] = 2.0
    res = _invoke("gate", "--baseline", _write(tmp_path / "b.json", _eval_output()),
                  "--candidate", _write(tmp_path / "c.json", data))
    _one_line_error(res, 1, "lm-eval task version 1.0", "2.0")


@pytest.mark.parametrize("change, parts", [
    (dict(text_sha="u" * 64), ["measured on text ref.txt (sha256 tttttttttttt)", "uuuuuuuuuuuu", "same --text"]),
    (dict(chunk_tokens=128), ["16 windows of 256 tokens", "16 windows of 128 tokens", "--chunk-tokens"]),
])
def test_fidelity_on_another_text_or_windows_is_refused(tmp_path, change, parts):
    policy = tmp_path / "p.yaml"
    policy.write_text("metrics:\n  - metric: fidelity/kld_mean\n    max_drop: 0.01\n")
    base = _write(tmp_path / "base.json", _results("tiny", "1" * 64))
    cand = _write(tmp_path / "cand.json", _results("tiny", "1" * 64, kld=[0.001] * 16, **change))
    _one_line_error(_invoke("gate", "--baseline", base, "--candidate", cand, "--policy", policy), 1, *parts)


# ------------------------------------------------------------------------------- gate errors: stderr, never a verdict

def test_an_empty_samples_list_is_an_error_on_stderr(tmp_path):
    base = _write(tmp_path / "base.json", _eval_output())
    empty = _eval_output()
    empty["runs"][0]["accuracy"]["samples"]["arc_easy"] = []
    res = _invoke("gate", "--baseline", _write(tmp_path / "empty.json", empty), "--candidate", base)
    _one_line_error(res, 1, "empty.json", "empty list of per-sample scores for task 'arc_easy'")


def test_a_metric_the_baseline_lacks_is_an_error_on_stderr_before_any_test(tmp_path, monkeypatch):
    old = _eval_output()
    for row in old["runs"][0]["accuracy"]["samples"]["arc_easy"]:
        del row["acc_norm"]  # the task says it has acc_norm; the per-sample rows do not
    policy = tmp_path / "p.yaml"
    policy.write_text("metrics:\n  - metric: arc_easy/acc\n  - metric: arc_easy/acc_norm\n")

    def tested(*args, **kwargs):
        raise AssertionError("a test ran before every input was checked")

    monkeypatch.setattr(stats, "paired_binary", tested)
    res = _invoke("gate", "--baseline", _write(tmp_path / "old.json", old),
                  "--candidate", _write(tmp_path / "new.json", _eval_output()), "--policy", policy,
                  "--summary", tmp_path / "s.md")
    _one_line_error(res, 1, "arc_easy/acc_norm", "old.json", "have no 'acc_norm'")
    assert not (tmp_path / "s.md").exists()


def test_a_document_scored_twice_is_refused(tmp_path):
    twice = _eval_output(_rows() + _rows(3))
    res = _invoke("gate", "--baseline", _write(tmp_path / "twice.json", twice),
                  "--candidate", _write(tmp_path / "c.json", _eval_output()))
    _one_line_error(res, 1, "twice.json", "more than once")


def test_an_accuracy_that_is_not_0_or_1_is_refused(tmp_path):
    odd = _eval_output()
    odd["runs"][0]["accuracy"]["samples"]["arc_easy"][5]["acc"] = 0.5
    res = _invoke("gate", "--baseline", _write(tmp_path / "b.json", _eval_output()),
                  "--candidate", _write(tmp_path / "odd.json", odd))
    _one_line_error(res, 1, "arc_easy/acc needs 0/1 per-sample scores")


def test_a_verdict_is_never_written_over_an_input(tmp_path):
    base = tmp_path / "base.json"
    _write(base, _eval_output())
    # quantlab's own eval output (its folder's manifest lists it): replaceable by quantlab, yet not by this verdict
    (tmp_path / ".quantlab-manifest.json").write_text(json.dumps({"written_by": "quantlab", "files": ["base.json"]}))
    before = base.read_bytes()
    res = _invoke("gate", "--baseline", base, "--candidate", _write(tmp_path / "c.json", _eval_output()),
                  "--json-out", base)
    _one_line_error(res, 1, f"--json-out {base} is the file given as --baseline")
    assert base.read_bytes() == before


# --------------------------------------------------------------------------------- results files of the wrong shape

def _report_results() -> dict:
    def run(recipe, method, bits, params, kld):
        out = _results("tiny", "1" * 64, kld=[kld] * 16)["runs"][0]
        out.update(recipe=recipe, method=method, bits=bits, params=params,
                   memory={"weights_bytes": 1000, "disk_bytes": 1100, "peak_bytes": 3000},
                   latency={"prefill_ms": 1.0, "decode_tok_s": {"1": 10.0}, "skipped": None,
                            "detail": {"prefill_ms": {"iqr": 0.1}, "decode_tok_s": {"1": {"iqr": 0.2}}}},
                   cost={"quantize_wall_s": 1.0, "quantize_cpu_s": 1.0}, guard={"ok": True, "reasons": []})
        out["fidelity"]["ci95"] = {"kld_mean": [kld, kld]}
        return out

    data = _results("tiny", "1" * 64)
    data["runs"] = [run("fp", "fp", 32, {"dtype": "auto"}, 0.0),
                    run("rtn-w8", "rtn", 8, {"bits": 8, "group_size": 64, "symmetric": True, "format": "torchao"},
                        0.01),
                    run("rtn-w4-g64", "rtn", 4, {"bits": 4, "group_size": 64, "symmetric": True, "format": "torchao"},
                        0.2)]
    return data


def _set(data: dict, path: str, value) -> dict:
    """``data`` with the field at ``path`` (runs.2.fidelity.kld_mean) set to ``value`` (``...`` deletes it)."""
    data = copy.deepcopy(data)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = data
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return data


@pytest.mark.parametrize("path, value, field, what", [
    ("runs.2.fidelity.kld_mean", "0.1", "runs[2].fidelity.kld_mean", "is a string ('0.1'), where a number belongs"),
    ("runs.0.accuracy.tasks", [], "runs[0].accuracy.tasks", "is an empty list, where a mapping belongs"),
    ("runs.1.memory.weights_bytes", [1], "runs[1].memory.weights_bytes", "is a list of 1, where a number belongs"),
    ("runs.0.method", ..., "runs[0].method", "is missing"),
    ("runs.1.params", "bits=8", "runs[1].params", "where a mapping belongs"),
    ("runs.1.latency.decode_tok_s", {"1": "fast"}, "runs[1].latency.decode_tok_s.1", "where a number belongs"),
    ("runs.0.fidelity.ci95.kld_mean", [0.1], "runs[0].fidelity.ci95.kld_mean", "holds 1 items, where 2 belong"),
    ("runs.0.guard.reasons", "bad", "runs[0].guard.reasons", "where a list belongs"),
    ("runs.1.accuracy.samples.arc_easy.3.acc", "1", "runs[1].accuracy.samples.arc_easy[3].acc", "where a number"),
    ("runs.2.accuracy.tasks.arc_easy.metrics.acc", None, "runs[2].accuracy.tasks.arc_easy.metrics.acc", "is null"),
    ("runs.0.fidelity.kld_per_window", {"0": 0.1}, "runs[0].fidelity.kld_per_window", "where a list belongs"),
    ("runs.2.params.colour", "red", "runs[2] (rtn-w4-g64): params do not fit method 'rtn'", "colour"),
    ("runs", [1], "runs[0]", "is the number 1, where a mapping belongs"),
])
def test_report_names_the_field_of_the_wrong_type(tmp_path, path, value, field, what):
    assert len(load_results(results=_write(tmp_path / "good.json", _report_results()))["runs"]) == 3
    results = _write(tmp_path / "results.json", _set(_report_results(), path, value))
    out = tmp_path / "r.html"
    res = _invoke("report", "--results", results, "--out", out)
    _one_line_error(res, 2, f"{results}: {field}", what)
    assert not out.exists()


@pytest.mark.parametrize("text, what", [
    ("", "is empty"),
    ("{\"runs\": [\n", "is not JSON (line 2, column 1"),
    ("[]", "holds an empty list, not the mapping"),
    ("null", "holds null, not the mapping"),
    ("{\"runs\": {}}", "runs is an empty mapping, where a list belongs"),
])
def test_report_refuses_a_file_that_is_no_results_json(tmp_path, text, what):
    results = tmp_path / "results.json"
    results.write_text(text)
    _one_line_error(_invoke("report", "--results", results, "--out", tmp_path / "r.html"), 2, str(results), what)


@pytest.mark.parametrize("literal, field", [("NaN", "runs[1].fidelity.kld_mean"),
                                            ("Infinity", "runs[0].memory.peak_bytes")])
def test_a_results_json_holding_nan_is_refused_naming_the_field(tmp_path, literal, field):
    path = field.replace("[", ".").replace("]", "")
    text = json.dumps(_set(_report_results(), path, math.nan if literal == "NaN" else math.inf))
    assert literal in text
    results = tmp_path / "results.json"
    results.write_text(text)
    _one_line_error(_invoke("report", "--results", results, "--out", tmp_path / "r.html"), 2,
                    f"{field} is {literal}, not a number")
    res = _invoke("gate", "--baseline", results, "--candidate", results)
    _one_line_error(res, 1, f"{field} is {literal}")


@pytest.mark.parametrize("path, value, field", [
    ("runs.0.accuracy.samples.arc_easy.3.acc", "1", "runs[0].accuracy.samples.arc_easy[3].acc"),
    ("runs.0.accuracy.samples.arc_easy.3.doc_id", ..., "runs[0].accuracy.samples.arc_easy[3].doc_id"),
    ("runs.0.accuracy.samples.arc_easy", {"0": {}}, "runs[0].accuracy.samples.arc_easy"),
    ("runs.0.accuracy.samples.arc_easy.0.ll", "x", "runs[0].accuracy.samples.arc_easy[0].ll"),
    ("runs.0.recipe", 7, "runs[0].recipe"),
])
def test_the_gate_names_the_field_of_the_wrong_type(tmp_path, path, value, field):
    bad = _write(tmp_path / "bad.json", _set(_eval_output(), path, value))
    res = _invoke("gate", "--baseline", _write(tmp_path / "b.json", _eval_output()), "--candidate", bad)
    _one_line_error(res, 1, f"{bad}: {field}")


# ------------------------------------------------------------------------------------------------------- shards

def _shard(i: int, n: int = 3, **kw) -> dict:
    return _eval_output(_rows(N, start=i, step=n), shard=[i, n], n_total=N, **kw)


def _shards(tmp_path, *outputs) -> list[str]:
    return [_write(tmp_path / f"s{k}.json", data) for k, data in enumerate(outputs)]


@pytest.mark.parametrize("outputs, parts", [
    (lambda: (_shard(0), _shard(1, sha="b" * 64), _shard(2)),
     ["s0.json and ", "s1.json scored arc_easy with different data", "sha256 aaaaaaaaaaaa vs sha256 bbbbbbbbbbbb"]),
    (lambda: (_shard(0), _shard(1), _shard(2, artifact="/models/other")),
     ["s0.json and ", "s2.json are of different models", "/models/other"]),
    (lambda: (_shard(0), _shard(1), _shard(1)), ["s1.json and ", "s2.json are both shard 1/3"]),
    (lambda: (_shard(0), _shard(1), _eval_output()), ["s2.json is not a shard output"]),
    (lambda: (_shard(0, n=2), _shard(1)), ["s0.json is shard 0/2", "s1.json is shard 1/3"]),
    (lambda: (_shard(0), _shard(1), {**_shard(2), "runs": [_shard(2)["runs"][0], _shard(0)["runs"][0]]}),
     ["s2.json holds 2 runs"]),
    (lambda: (_shard(0), _shard(1), _set(_shard(2), "runs.0.accuracy.samples.arc_easy.0.doc_id", 3)),
     ["s2.json is shard 2/3 but holds document 3"]),
    (lambda: (_shard(0), _shard(1),
              _set(_shard(2), "runs.0.accuracy.samples.arc_easy", _rows(N, start=2, step=3)[:-1])),
     ["hold 39 of arc_easy's 40 documents"]),
    (lambda: (_shard(0), _shard(1), _set(_shard(2), "runs.0.accuracy.tasks.arc_easy.n_total", "40")),
     ["s2.json: runs[0].accuracy.tasks.arc_easy.n_total is a string ('40')"]),
    (lambda: (_shard(0), _shard(1), _set(_shard(2), "runs.0.accuracy.samples.arc_easy.1.acc", math.nan)),
     ["s2.json: runs[0].accuracy.samples.arc_easy[1].acc is NaN"]),
])
def test_shards_that_do_not_make_one_run_are_refused(tmp_path, outputs, parts):
    paths = _shards(tmp_path, *outputs())
    res = _invoke("merge-shards", *paths, "--output", tmp_path / "full.json")
    _one_line_error(res, 2, *parts)
    assert not (tmp_path / "full.json").exists()


def test_a_shard_given_twice_is_named(tmp_path):
    paths = _shards(tmp_path, _shard(0), _shard(1), _shard(2))
    res = _invoke("merge-shards", *paths, paths[1], "--output", tmp_path / "full.json")
    _one_line_error(res, 2, f"{paths[1]} is given twice")


def test_merge_shards_never_replaces_a_shard_or_a_users_file(tmp_path):
    paths = _shards(tmp_path, _shard(0), _shard(1), _shard(2))
    before = (tmp_path / "s0.json").read_bytes()
    res = _invoke("merge-shards", *paths, "--output", paths[0])
    _one_line_error(res, 2, f"--output {paths[0]} is one of the shards")
    assert (tmp_path / "s0.json").read_bytes() == before
    mine = tmp_path / "notes.json"
    mine.write_text("my own notes\n")
    _one_line_error(_invoke("merge-shards", *paths, "--output", mine), 2,
                    f"--output {mine} exists and quantlab did not")
    assert mine.read_text() == "my own notes\n"
    for _ in range(2):  # a new path, then the merge it wrote: replaced
        res = _invoke("merge-shards", *paths, "--output", tmp_path / "full.json")
        assert res.exit_code == 0, res.output
    merged = json.loads((tmp_path / "full.json").read_text())["runs"][0]["accuracy"]
    assert [r["doc_id"] for r in merged["samples"]["arc_easy"]] == list(range(N))
