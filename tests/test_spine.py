"""The one spine: quantize-and-compare and sweep files make the same spec and jobs; the spec's data dir reaches
calibration and training text; recipe names are safe in file names; a run set of several models is never
mixed; a job's provenance is its own process's."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner
from tiny import build_llama_dir, write_text

from quantlab.cli import cli
from quantlab.provenance import sha256_text
from quantlab.recipe import parse_recipe, recipe_from_mapping
from quantlab.sweep.plan import plan_jobs
from quantlab.sweep.spec import compare_spec, load_spec


def _invoke(*args):
    return CliRunner().invoke(cli, list(args), obj={})


@pytest.fixture
def data_dir(tmp_path):
    """A data dir whose c4_calibration is not the shared one, so reading it (and not ../shared/data) shows."""
    path = tmp_path / "data"
    (path / "c4_calibration").mkdir(parents=True)
    write_text(path / "c4_calibration" / "c4.utf8", 3000, seed=7)
    return path


def test_flags_and_a_sweep_file_make_the_same_jobs(tmp_path, tiny_dir, tiny_text):
    sweep = tmp_path / "same.yaml"
    sweep.write_text(f"models: ['{tiny_dir}']\nrecipes: [rtn-w4-g32, bnb-nf4]\n"
                     f"evaluation: {{text: '{tiny_text}', chunks: 4, chunk_tokens: 32}}\n"
                     "measure: {batch_sizes: [1, 2], repetitions: 2}\nthreads: 1\n")
    from_file = plan_jobs(load_spec(sweep))
    from_flags = plan_jobs(compare_spec(str(tiny_dir), "rtn-w4-g32,bnb-nf4", text=str(tiny_text), chunks=4,
                                        chunk_tokens=32, batch_sizes=[1, 2], repetitions=2))
    assert [j.recipe.name for j in from_file] == ["fp", "rtn-w4-g32", "bnb-nf4"]
    assert [j.key for j in from_file] == [j.key for j in from_flags]
    from_experiment = plan_jobs(compare_spec(experiment=str(sweep), chunks=8))  # a flag beats the file
    assert from_experiment[0].fidelity.max_chunks == 8 and from_experiment[0].fidelity.chunk_tokens == 32
    assert from_experiment[0].key != from_file[0].key


def test_an_old_recipes_only_experiment_file_still_reads(tmp_path, tiny_text):
    old = tmp_path / "old.yaml"
    old.write_text(f"description: older form\nmodel: smollm2-135m\ntext: '{tiny_text}'\nrecipes: [fp, rtn-w8]\n")
    spec = compare_spec(experiment=str(old))
    assert spec.models == ("smollm2-135m",) and spec.text == str(tiny_text)
    assert [r.name for r in spec.recipes] == ["fp", "rtn-w8"] and spec.run_set_prefix == "compare-smollm2-135m"


def test_the_data_dir_reaches_calibration_and_training_text(tmp_path, tiny_dir, tiny_text, data_dir):
    """GPTQ calibrates on, and QAT trains on, the spec's data dir's c4_calibration: the cache keys hash it
    and the quantize steps read it (their manifests name the file)."""
    from quantlab.artifacts import read_manifest
    from quantlab.sweep.commands import quantize_model

    ours = sha256_text((data_dir / "c4_calibration" / "c4.utf8").read_text())
    gptq = parse_recipe("gptq-w4-g32")
    qat = recipe_from_mapping({"method": "qat", "group_size": 32, "steps": 2, "batch": 1, "seq_len": 16,
                               "heldout_windows": 1, "curve_points": 1}, "test")
    spec = compare_spec(str(tiny_dir), "rtn-w8", text=str(tiny_text), data_dir=str(data_dir))
    jobs = plan_jobs(dataclasses.replace(spec, recipes=(gptq, qat)))
    assert {j.data_dir for j in jobs} == {str(data_dir.resolve())}
    for recipe, notes_key in ((gptq, "calibration"), (qat, "train_text")):
        art = quantize_model(str(tiny_dir), recipe, "cpu", 1, data_dir=str(data_dir))
        notes = read_manifest(art["artifact"])["method_notes"][notes_key]
        assert notes["sha256"] == ours and notes["origin"] == str((data_dir / "c4_calibration" / "c4.utf8").resolve())


def test_recipe_names_are_safe_in_file_names(tmp_path, tiny_dir, tiny_text):
    from quantlab.fsutil import safe_name

    for name in ("../escape", "a/b", ".hidden", "x y", "gptq-w4-g64 calibration=self"):
        clean = safe_name(name)
        assert "/" not in clean and " " not in clean and not clean.startswith(".") and clean != safe_name(name + "!")
    assert safe_name("rtn-w4-g64") == "rtn-w4-g64"
    names = ("../a/b c",)
    exp = tmp_path / "named.yaml"
    exp.write_text(f"recipes:\n  - {{name: '{names[0]}', method: rtn, bits: 8, group_size: -1}}\n")
    out = tmp_path / "out"
    res = _invoke("quantize-and-compare", "--model", str(tiny_dir), "--experiment", str(exp), "--text", str(tiny_text),
                  "--out", str(out), "--store", str(tmp_path / "s.db"), "--chunks", "2", "--chunk-tokens", "16",
                  "--repetitions", "1", "--decode-tokens", "2", "--batch-sizes", "1", "--json")
    assert res.exit_code == 0, res.output
    assert [r["recipe"] for r in json.loads(res.stdout)["runs"]] == ["fp", *names]
    assert sorted(p.name for p in (out / "per_token").iterdir()) == sorted(f"{safe_name(n)}.npz" for n in ("fp", *names))
    assert not (out.parent / "a").exists() and not (out / "a").exists()


TAG = "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"


@pytest.mark.parametrize("text, message", [
    (None, "Experiment file {path} does not exist"),
    ("recipes: [fp\n", "Experiment file {path}: line 2: invalid YAML (expected ',' or ']'"),
    ("recipes: !!python/object/apply:os.system ['touch {flag}']\n", "Experiment file {path}: line 1: " + TAG),
    (b"recipes: [fp]\n\xff\xfe\n", "Experiment file {path} is not UTF-8 text (byte 14)"),
    ("- fp\n", "expected a mapping"),
    ("recipes: [fp]\nevaluation: {chunks: -1}\n", "{path}: evaluation: chunks must be an integer ≥ 1 (got -1)"),
    ("recipes: [fp]\nevaluation: {chunk_tokens: x}\n", "evaluation: chunk_tokens must be an integer ≥ 8 (got 'x')"),
    ("recipes: [fp]\nevaluation: {text: 5}\n", "evaluation: text must be a non-empty string (got 5)"),
    ("recipes: [fp]\nmeasure: {batch_sizes: x}\n", "batch_sizes must be a non-empty list of positive integers"),
    ("recipes: [fp]\nmeasure: {repetitions: -3}\n", "measure: repetitions must be an integer ≥ 1 (got -3)"),
    ("recipes: [fp]\ndata_dir: 5\n", "{path}: data_dir must be a non-empty string (got 5)"),
    ("recipes: [fp]\ndevice: gpu\n", "Unknown device 'gpu' — use cpu, cuda, cuda:N or auto"),
])
def test_a_missing_or_malformed_experiment_is_one_line(tmp_path, tiny_dir, text, message):
    path, flag = tmp_path / "exp.yaml", tmp_path / "ran"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text.replace("{flag}", str(flag)))
    res = _invoke("quantize-and-compare", "--model", str(tiny_dir), "--experiment", str(path),
                  "--out", str(tmp_path / "out"), "--store", str(tmp_path / "s.db"))
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and message.replace("{path}", str(path)) in lines[0], res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists() and not flag.exists()
    assert not (tmp_path / "s.db").exists()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_dir, tiny_text):
    """One sweep over two models: its run set holds the fp baseline of each."""
    root = tmp_path_factory.mktemp("two")
    other = build_llama_dir(root / "other", seed=3)
    sweep = root / "two.yaml"
    sweep.write_text(f"models: ['{tiny_dir}', '{other}']\nrecipes: [fp]\n"
                     f"evaluation: {{text: '{tiny_text}', chunks: 2, chunk_tokens: 16}}\n"
                     "measure: {batch_sizes: [1], repetitions: 1, decode_tokens: 2}\n")
    db = root / "runs.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLAB_HOME", str(root / "home"))
        res = _invoke("sweep", str(sweep), "--store", str(db), "--out", str(root / "out"), "--json")
    assert res.exit_code == 0, res.output
    return {"summary": json.loads(res.stdout), "db": db, "models": (str(tiny_dir), str(other)), "root": root}


def test_a_run_set_of_several_models_is_never_mixed(two_models):
    from quantlab import store
    from quantlab.gate import pair_runs
    from quantlab.gate.refs import load_ref

    run_set, db = two_models["summary"]["run_set"], str(two_models["db"])
    rows = store.find_runs(db, run_set)
    assert sorted(r["model_ref"] for r in rows) == sorted(two_models["models"]) and {r["recipe"] for r in rows} == {"fp"}
    base, cand = load_ref(f"{run_set}@fp", db), load_ref(run_set, db)
    assert len(base) == 2  # @recipe keeps that recipe of each model
    pairs = pair_runs(base, cand)
    assert len(pairs) == 2 and all(b["model"] == c["model"] for b, c in pairs)
    assert {b["model"] for b, _ in pairs} == set(two_models["models"])

    out = two_models["root"] / "r.html"
    mixed = _invoke("report", "--run-set", run_set, "--store", db, "--out", str(out))
    assert mixed.exit_code == 2 and "holds 2 models" in mixed.stderr and not out.exists(), mixed.output
    one = _invoke("report", "--run-set", run_set, "--store", db, "--model", two_models["models"][1], "--out", str(out))
    assert one.exit_code == 0, one.output
    assert two_models["models"][1] in out.read_text() and two_models["models"][0] not in out.read_text()


def test_a_jobs_provenance_is_recorded_by_the_process_that_ran_it(two_models):
    from quantlab import store
    from quantlab.sweep.jobs import job_dir

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLAB_HOME", str(two_models["root"] / "home"))
        for row in store.find_runs(str(two_models["db"]), two_models["summary"]["run_set"]):
            own = json.loads((job_dir(row["job_key"]) / "result.json").read_text())["provenance"]
            assert own["host"] and own["versions"]["torch"] and own["device"]["torch_threads"] == 1
            assert row["provenance"] == {**own, "run_set": two_models["summary"]["run_set"]}


def test_gate_pairs_by_model_and_recipe_when_the_baseline_holds_several_models():
    from quantlab.errors import UsageError
    from quantlab.gate import pair_runs

    base = [{"model": m, "recipe": r, "label": f"{m}@{r}"} for m in ("a", "b") for r in ("fp", "rtn-w8")]
    cand = [{"model": m, "recipe": "rtn-w8", "label": f"{m}@rtn-w8"} for m in ("b", "a")]
    assert [(b["label"], c["label"]) for b, c in pair_runs(base, cand)] == [("b@rtn-w8", "b@rtn-w8"),
                                                                          ("a@rtn-w8", "a@rtn-w8")]
    with pytest.raises(UsageError, match="no run of c@rtn-w8"):
        pair_runs(base, [{"model": "c", "recipe": "rtn-w8", "label": "c"}])
