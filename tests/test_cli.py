"""End to end through click's CliRunner on a tiny random Llama, and every bad input of the spine."""

import json
import shutil

import pytest
from click.testing import CliRunner

from quantlab import store
from quantlab.cli import cli

FAST = ["--chunk-tokens", "32", "--chunks", "8", "--repetitions", "2", "--decode-tokens", "4", "--batch-sizes", "1,2"]


def _invoke(*args):
    return CliRunner().invoke(cli, list(args), obj={})


@pytest.fixture(scope="module")
def compared(tiny_dir, tiny_text, tmp_path_factory):
    """Three runs sharing one QUANTLAB_HOME: the second must reuse everything; the third recomputes two of the
    recipes (--force)."""
    from suite_data import write_arc

    home = tmp_path_factory.mktemp("home")
    out = tmp_path_factory.mktemp("out")
    db = home / "runs.db"
    data = tmp_path_factory.mktemp("data")
    write_arc(data / "arc_challenge" / "ARC-Challenge-Test.jsonl", 16)
    suite = data / "suite.yaml"
    suite.write_text("description: test suite\ntasks: [arc_challenge]\nlimit: 12\n")
    args = ["quantize-and-compare", "--model", str(tiny_dir), "--recipes", "bnb-int8,bnb-nf4,rtn-w4-g32",
            "--text", str(tiny_text), "--out", str(out / "r"), "--store", str(db), "--json", *FAST,
            "--suite", str(suite), "--data-dir", str(data)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLAB_HOME", str(home))
        first = _invoke(*args)
        second = _invoke(*args)
        swap = {"bnb-int8,bnb-nf4,rtn-w4-g32": "rtn-w4-g32", str(out / "r"): str(out / "forced")}
        forced = _invoke(*[swap.get(a, a) for a in args], "--force")
    return {"first": first, "second": second, "forced": forced, "db": db, "out": out / "r", "home": home,
            "args": args}


def test_results_have_every_field(compared):
    res = compared["first"]
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["model"]["fingerprint"] and data["model"]["params"] > 0
    assert [r["recipe"] for r in data["runs"]] == ["fp", "bnb-int8", "bnb-nf4", "rtn-w4-g32"]
    for run in data["runs"]:
        for key in ("kld_mean", "kld_p99", "top1_agreement", "ppl", "ppl_baseline", "tokens"):
            assert run["fidelity"][key] is not None
        for key in ("weights_bytes", "disk_bytes", "peak_bytes"):
            assert run["memory"][key] > 0
        assert run["latency"]["prefill_ms"] > 0
        assert set(run["latency"]["decode_tok_s"]) == {"1", "2"}
        assert run["cost"]["quantize_wall_s"] is not None
        walls = run["step_wall_s"]  # each step's own process, timed; the quantize one is the artifact's build
        assert walls["quantize"] == run["cost"]["quantize_wall_s"] and walls["fidelity"] > 0 and walls["bench"] > 0
        assert walls["bench"] > sum(run["latency"]["detail"]["prefill_ms_samples"]) / 1000
        prov = run["provenance"]
        assert prov["versions"]["torch"] and prov["versions"]["transformers"] and prov["data_sha256"]
        assert prov["device"]["torch_threads"] == 1
    assert all(run["guard"] == {"ok": True, "reasons": []} for run in data["runs"])
    fp, int8, nf4, rtn = data["runs"]
    assert fp["fidelity"]["kld_mean"] == pytest.approx(0.0, abs=1e-9)
    assert fp["fidelity"]["top1_agreement"] == 1.0
    assert nf4["fidelity"]["kld_mean"] > 0 and rtn["fidelity"]["kld_mean"] > 0
    assert nf4["memory"]["weights_bytes"] < fp["memory"]["weights_bytes"]
    assert nf4["cost"]["quantize_wall_s"] > 0
    assert (compared["out"] / "results.json").is_file()
    assert (compared["out"] / "per_token" / "bnb-nf4.npz").is_file()
    report = compared["out"] / "report.html"
    assert data["report_path"] == str(report) and f"report: {report}" in res.stderr
    page = report.read_text()
    for run in data["runs"]:  # every recipe's measured weights and KLD, as results.json has them
        assert f"{run['memory']['weights_bytes'] / 2**20:.2f}" in page and f"{run['fidelity']['kld_mean']:.4f}" in page
    for run in data["runs"]:
        task = run["accuracy"]["tasks"]["arc_challenge"]
        assert task["n"] == 12 and task["metrics"]["acc"] is not None and "samples" not in task
        assert (compared["out"] / run["accuracy"]["samples_path"]).is_file()
    from quantlab.table import render_table

    assert "arc_challenge acc_norm" in render_table(data) and "± = 1.96 x lm-eval stderr" in render_table(data)
    assert {"acc", "acc_norm", "gold_logprob", "step_wall_s"} <= set(data["definitions"])


def test_gate_passes_a_rerun_and_reads_the_store(compared):
    first = json.loads(compared["first"].stdout)
    forced = json.loads(compared["forced"].stdout)
    assert forced["run_set"] != first["run_set"]
    res = _invoke("gate", "--baseline", str(compared["out"] / "results.json"), "--candidate", first["run_set"],
                  "--store", str(compared["db"]))
    assert res.exit_code == 0, res.output
    assert res.output.count("PASS: drop ≤ 0 not rejected") == 4 * 3  # 4 recipes x (acc, acc_norm, gold_logprob)
    res = _invoke("gate", "--baseline", f"{first['run_set']}@rtn-w4-g32", "--candidate",
                  f"{forced['run_set']}@rtn-w4-g32", "--store", str(compared["db"]))  # recomputed: passes too
    assert res.exit_code == 0, res.output
    assert res.output.count("PASS: drop ≤ 0 not rejected") == 3
    rows = store.read_samples(compared["db"], first["runs"][1]["run_id"])
    assert len(rows["arc_challenge"]) == 12
    stored = {r["id"]: r for r in store.list_runs(compared["db"], first["run_set"])}
    assert all(stored[r["run_id"]]["fidelity"]["guard"] == r["guard"] for r in first["runs"])


def test_flips_against_fp_are_in_results_the_store_and_the_report(compared):
    from quantlab.gate.refs import read_samples

    data = json.loads(compared["first"].stdout)
    fp_rows = read_samples(compared["out"] / data["runs"][0]["accuracy"]["samples_path"])["arc_challenge"]
    stored = {r["id"]: r for r in store.list_runs(compared["db"], data["run_set"])}
    page = (compared["out"] / "report.html").read_text()
    assert "flips" not in data["runs"][0]["accuracy"] or not data["runs"][0]["accuracy"]["flips"]
    for run in data["runs"][1:]:
        flips = run["accuracy"]["flips"]["arc_challenge"]
        rows = read_samples(compared["out"] / run["accuracy"]["samples_path"])["arc_challenge"]
        changed = sum(a["acc_norm"] != b["acc_norm"] for a, b in zip(fp_rows, rows))  # both sorted by doc_id
        assert flips["metric"] == "acc_norm" and flips["documents"] == 12 and flips["counts"]["flips"] == changed
        assert flips["right_to_wrong"] + flips["wrong_to_right"] == pytest.approx(flips["flips"])
        assert stored[run["run_id"]]["accuracy"]["flips"]["arc_challenge"] == flips
        assert f"{flips['flips']:.1%} [" in page
    assert "flips" in data["definitions"]
    nf4 = data["runs"][2]["fidelity"]  # the llama.cpp-style statistics, in the report and (compact) the table
    assert "--kl-divergence</code> reports them" in page and f"{nf4['kld_p999']:.3f}" in page
    assert f"{100 * nf4['dp_rms']:.3f}" in page and f"{nf4['ln_ppl_ratio']:+.4f}" in page
    from quantlab.table import render_table

    table = render_table(data)
    assert "RMS Δp %" in table and f"{100 * nf4['dp_rms']:.2f}" in table and "flips vs fp arc_challenge" in table


def test_gate_on_fidelity_kld_and_ppl_reads_the_store_run_set(compared, tmp_path):
    first = json.loads(compared["first"].stdout)
    policy = tmp_path / "p.yaml"
    policy.write_text("metrics:\n  - metric: fidelity/kld_mean\n    max_drop: 10.0\n")
    res = _invoke("gate", "--baseline", f"{first['run_set']}@fp", "--candidate", f"{first['run_set']}@bnb-nf4",
                  "--store", str(compared["db"]), "--policy", str(policy), "--json-out", str(tmp_path / "v.json"))
    assert res.exit_code == 0, res.output
    (kld,) = json.loads((tmp_path / "v.json").read_text())["comparisons"][0]["metrics"]
    nf4 = first["runs"][2]["fidelity"]
    assert kld["n"] == 8 and kld["candidate"] == pytest.approx(nf4["kld_mean"]) and len(nf4["kld_per_window"]) == 8
    policy.write_text("metrics:\n  - metric: fidelity/ppl\n    min_recovery: 0.5\n")  # token-level perplexity
    res = _invoke("gate", "--baseline", f"{first['run_set']}@fp", "--candidate", f"{first['run_set']}@bnb-nf4",
                  "--store", str(compared["db"]), "--policy", str(policy), "--json-out", str(tmp_path / "v.json"))
    assert res.exit_code == 0, res.output
    (ppl,) = json.loads((tmp_path / "v.json").read_text())["comparisons"][0]["metrics"]
    assert ppl["candidate"] == pytest.approx(nf4["ppl"]) and ppl["baseline"] == pytest.approx(nf4["ppl_baseline"])
    assert ppl["margin"] == pytest.approx(nf4["ppl_baseline"])  # baseline x (1 / 0.5 - 1)


def test_second_run_reuses_every_job_and_force_recomputes(compared):
    first = json.loads(compared["first"].stdout)
    assert first["jobs"] == {"jobs": 4, "already_stored": 0, "from_cache": 0, "computed": 4, "stored": 4,
                             "refused": 0}
    res = compared["second"]
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["jobs"] == {"jobs": 4, "already_stored": 4, "from_cache": 0, "computed": 0, "stored": 0,
                            "refused": 0}
    assert "4 of 4 recipes already stored" in res.stderr
    assert data["run_set"] == first["run_set"] and data["runs"] == first["runs"]
    res = compared["forced"]
    assert res.exit_code == 0, res.output
    forced = json.loads(res.stdout)
    assert forced["jobs"]["computed"] == 2 and [r["recipe"] for r in forced["runs"]] == ["fp", "rtn-w4-g32"]
    assert not forced["runs"][1]["artifact_cached"]
    assert all(r["fidelity"]["baseline_cached"] for r in forced["runs"])
    for a, b in zip([first["runs"][0], first["runs"][3]], forced["runs"]):
        assert a["fidelity"]["kld_mean"] == pytest.approx(b["fidelity"]["kld_mean"], rel=1e-9, abs=1e-12)
        assert a["artifact"] == b["artifact"] and a["run_id"] != b["run_id"]


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_republishing_replaces_only_quantlabs_own_files_and_refuses_anyone_elses(compared, tmp_path, monkeypatch):
    from quantlab.outputs import MANIFEST

    monkeypatch.setenv("QUANTLAB_HOME", str(compared["home"]))
    out = tmp_path / "out"
    shutil.copytree(compared["out"], out)  # a folder quantlab published: its manifest lists every file in it
    assert sorted(json.loads((out / MANIFEST).read_text())["files"]) == sorted(set(_tree(out)) - {MANIFEST})
    (out / "notes.txt").write_text("mine")
    (out / "per_token" / "mine.npz").write_bytes(b"mine too")
    before = _tree(out)
    swap = {"bnb-int8,bnb-nf4,rtn-w4-g32": "rtn-w4-g32", str(compared["out"]): str(out),
            str(compared["db"]): str(tmp_path / "s.db")}
    args = [swap.get(a, a) for a in compared["args"]]
    res = _invoke(*args)
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.output
    assert f"--out {out} holds files quantlab did not write (notes.txt, per_token/mine.npz)" in res.stderr
    assert _tree(out) == before and not (tmp_path / "s.db").exists()
    (out / "notes.txt").unlink()
    (out / "per_token" / "mine.npz").unlink()
    res = _invoke(*args)  # the same jobs from the job cache: a smaller publication replaces the larger one
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["jobs"]["from_cache"] == 2
    assert sorted(p.name for p in (out / "per_token").iterdir()) == ["fp.npz", "rtn-w4-g32.npz"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["fp.json.gz", "rtn-w4-g32.json.gz"]
    assert sorted(json.loads((out / MANIFEST).read_text())["files"]) == sorted(set(_tree(out)) - {MANIFEST})


def test_report_from_the_stored_run_set(compared, tmp_path):
    data = json.loads(compared["first"].stdout)
    out = tmp_path / "set.html"
    res = _invoke("report", "--run-set", data["run_set"], "--store", str(compared["db"]), "--out", str(out),
                  "--gpu-mem", "24GiB", "--context", "2048")
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert "Fit on a 25.7698 GB GPU at context 2048" in page and page.count("<svg") >= 5
    res = _invoke("report", "--run-set", "nope", "--store", str(compared["db"]), "--out", str(out))
    assert res.exit_code == 2 and "No runs in run set 'nope'" in res.output


def test_runs_lists_stored_runs(compared):
    res = _invoke("runs", "--store", str(compared["db"]), "--json")
    assert res.exit_code == 0
    rows = json.loads(res.stdout)
    assert len(rows) == 6 and {r["recipe"] for r in rows} == {"fp", "bnb-int8", "bnb-nf4", "rtn-w4-g32"}
    assert all(r["step_wall_s"]["fidelity"] > 0 and r["step_wall_s"]["bench"] > 0 for r in rows)  # kept as stored
    table = _invoke("runs", "--store", str(compared["db"]))
    assert "bnb-nf4" in table.stdout


def test_eval_and_bench_an_artifact(compared, tiny_dir, tiny_text, monkeypatch):
    monkeypatch.setenv("QUANTLAB_HOME", str(compared["home"]))
    nf4 = json.loads(compared["first"].stdout)["runs"][2]["artifact"]
    res = _invoke("eval", nf4, "--baseline", str(tiny_dir), "--text", str(tiny_text))
    assert res.exit_code == 0, res.output
    fid = json.loads(res.stdout)["fidelity"]
    assert fid["kld_mean"] > 0 and fid["ppl_kind"] == "token-level"
    res = _invoke("bench", nf4)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["memory"]["weights_bytes"] > 0


def _encoder_dir(path):
    from transformers import DistilBertConfig

    path.mkdir()
    DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(path)
    return path


def _corrupt_dir(tiny_dir, path):
    shutil.copytree(tiny_dir, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return path


def _file(path, text):
    path.write_text(text)
    return path


def _dir(path):
    path.mkdir()
    return path


# case -> (args given tmp dir t, tiny model dir d, reference text x; expected message; exit code)
BAD = {
    "missing path": (lambda t, d, x: ["--model", str(t / "nope")], "does not exist", 1),
    "hub id offline": (lambda t, d, x: ["--model", "no-such-org/no-such-model"], "Could not get", 1),
    "no config.json": (lambda t, d, x: ["--model", str(_dir(t / "empty"))], "has no config.json", 1),
    "not a causal LM": (lambda t, d, x: ["--model", str(_encoder_dir(t / "enc"))], "not a causal language model", 1),
    "unknown recipe": (lambda t, d, x: ["--model", str(d), "--recipes", "gtpq"], "Unknown recipe 'gtpq'", 2),
    "rtn-w3": (lambda t, d, x: ["--model", str(d), "--recipes", "rtn-w3"], "bits must be 8 or 4", 2),
    "bad group size": (lambda t, d, x: ["--model", str(d), "--recipes", "rtn-w4-g48"], "does not divide", 2),
    "corrupt safetensors": (lambda t, d, x: ["--model", str(_corrupt_dir(d, t / "bad"))], "Corrupt safetensors", 1),
    "empty text": (lambda t, d, x: ["--model", str(d), "--text", str(_file(t / "e.txt", ""))], "is empty", 1),
    "missing text": (lambda t, d, x: ["--model", str(d), "--text", str(t / "none.txt")], "does not exist", 1),
    "unwritable out": (lambda t, d, x: ["--model", str(d), "--out", str(_file(t / "f", "x") / "sub")],
                       "not a directory", 2),
    "recipes and experiment": (lambda t, d, x: ["--recipes", "fp", "--experiment", str(t / "e.yaml")],
                               "not both", 2),
    "unknown experiment key": (lambda t, d, x: ["--model", str(d), "--experiment",
                                                str(_file(t / "e.yaml", "recipes: [fp]\nrecipies: [bnb-nf4]\n"))],
                               "top-level: unknown key(s) recipies", 2),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_with_no_trace(case, tmp_path, tiny_dir, tiny_text, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_args, message, code = BAD[case]
    db = tmp_path / "store.db"
    out = tmp_path / "out"
    args = make_args(tmp_path, tiny_dir, tiny_text)
    args += [] if "--text" in args else ["--text", str(tiny_text)]
    args += [] if "--out" in args else ["--out", str(out)]
    res = _invoke("quantize-and-compare", *args, "--store", str(db))
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert not out.exists()
    assert not db.exists() or store.list_runs(db) == []


def test_debug_shows_the_traceback(tmp_path):
    res = _invoke("--debug", "quantize-and-compare", "--model", str(tmp_path / "nope"))
    assert res.exit_code != 0
    assert res.exception is not None and "does not exist" in str(res.exception)


@pytest.mark.parametrize("max_drop, code", [(10.0, 0), (0.0, 3)])
def test_gate_on_fidelity_kld_pairs_text_windows(compared, tmp_path, max_drop, code):
    results = compared["out"] / "results.json"
    policy = tmp_path / "p.yaml"
    policy.write_text(f"metrics:\n  - metric: fidelity/kld_mean\n    max_drop: {max_drop}\n")
    res = _invoke("gate", "--baseline", f"{results}@fp", "--candidate", f"{results}@bnb-nf4", "--policy", str(policy),
                  "--json-out", str(tmp_path / "v.json"))
    assert res.exit_code == code, res.output
    kld = json.loads((tmp_path / "v.json").read_text())["comparisons"][0]["metrics"][0]
    assert kld["n"] == 8 and kld["baseline"] == pytest.approx(0.0, abs=1e-6) and kld["drop"] > 0  # 8 windows
