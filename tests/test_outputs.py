"""What a new user still hit (issue 31), closed by class: a user's file replaced (1), a YAML key given twice (2),
tracebacks from a zero budget, a damaged store and a file where QUANTLAB_HOME's folders belong (3), a full disk not
named as such (6), and errors on stdout, nowhere, or options left unchecked (7). Each ends as one line on stderr,
with a non-zero exit code and nothing of the user's changed."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantlab import store
from quantlab.cli import cli

QUANTLAB = [sys.executable, "-c", "import sys; from quantlab.cli import cli; sys.argv[0] = 'quantlab'; cli()"]


def _invoke(*args):
    return CliRunner().invoke(cli, list(args), obj={})


def _one_line_error(res, code: int, *needles: str) -> str:
    """The result exited ``code`` with exactly one stderr line, an Error naming each needle; no traceback."""
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == code, res.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in res.output
    return lines[0]


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. a user's file is never replaced ------------------------------------------------------------------------


def test_eval_refuses_to_replace_a_users_output_and_per_token_files_before_any_work(tmp_path, tiny_dir, tiny_text,
                                                                                    quantlab_home):
    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "results.json").write_text("my own results\n")
    (mine / "tokens.npz").write_bytes(b"my own arrays")
    before = _digest(mine)
    for option, name in (("--output", "results.json"), ("--per-token", "tokens.npz")):
        res = _invoke("eval", str(tiny_dir), "--baseline", str(tiny_dir), "--text", str(tiny_text), option,
                      str(mine / name))
        _one_line_error(res, 2, f"{option} {mine / name} exists and quantlab did not write it")
    assert _digest(mine) == before
    assert not (quantlab_home / "logits").exists()  # refused before the reference was computed


def test_gate_refuses_to_replace_a_users_summary_before_it_runs(tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("# my notes\n")
    res = _invoke("gate", "--baseline", str(tmp_path / "nope.json"), "--candidate", str(tmp_path / "nope.json"),
                  "--summary", str(summary))
    _one_line_error(res, 1, f"--summary {summary} exists and quantlab did not write it")
    assert summary.read_text() == "# my notes\n"


# --- 2. a YAML key given twice ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, line", [
    ("models: [x]\nrecipes: [fp]\nmodels: [y]\n", "line 3: the key 'models' is given twice (first on line 1)"),
    ("models: [x]\nrecipes:\n  - {method: rtn, bits: 4, bits: 8}\n", "line 3: the key 'bits' is given twice"),
    ("models: [x]\nrecipes: [fp]\nmeasure:\n  repetitions: 2\n  repetitions: 5\n", "the key 'repetitions'"),
])
def test_a_yaml_key_given_twice_is_refused_naming_its_lines(tmp_path, text, line):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(text)
    _one_line_error(_invoke("sweep", str(sweep), "--out", str(tmp_path / "out")), 2, str(sweep), line)
    assert not (tmp_path / "out").exists()


def test_yaml_merge_keys_still_override_without_being_duplicates(tmp_path):
    from quantlab.fsutil import load_yaml

    path = tmp_path / "m.yaml"
    path.write_text("base: &b {bits: 4, group_size: 64}\nrecipe:\n  <<: *b\n  bits: 8\n")
    assert load_yaml(path, "File", "fix it")["recipe"] == {"bits": 8, "group_size": 64}


def test_a_gate_policy_and_a_suite_with_a_key_given_twice_are_refused(tmp_path, tiny_dir):
    from quantlab.errors import UsageError
    from quantlab.gate.policy import load_policy

    policy = tmp_path / "p.yaml"
    policy.write_text("alpha: 0.05\nmetrics: [{task: arc_easy, metric: acc, max_drop: 0.01}]\nalpha: 0.5\n")
    with pytest.raises(UsageError, match=r"p.yaml: line 3: the key 'alpha' is given twice \(first on line 1\)"):
        load_policy(policy)
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks: [arc_easy]\nlimit: 5\nlimit: 50\n")
    _one_line_error(_invoke("eval", str(tiny_dir), "--suite", str(suite)), 2, "the key 'limit' is given twice")


# --- 3. tracebacks: a zero budget, a damaged store, a file where a folder belongs ------------------------------


@pytest.mark.parametrize("args", [
    ["fit", "{tiny}", "--weights-budget", "0"],
    ["fit", "{tiny}", "--gpu-mem", "0GB"],
    ["quantize", "fit-0MiB", "--model", "{tiny}"],
    ["quantize", "rtn-w8", "--model", "{tiny}", "--max-memory", "0"],
    ["plan", "{tiny}", "--gpu-mem", "0.0000000001"],
])
def test_a_budget_of_nothing_is_refused_in_one_line(args, tiny_dir, quantlab_home):
    res = _invoke(*[a.replace("{tiny}", str(tiny_dir)) for a in args])
    _one_line_error(res, 2, "is no memory at all — give a positive size")
    assert not (quantlab_home / "artifacts").exists()


def _damaged_store(path: Path) -> Path:
    """A store with 40 runs whose b-tree pages past the first two are overwritten, as a bad sector or a torn copy
    leaves them."""
    for i in range(40):
        store.insert_run(path, {"run_set": f"rs{i % 3}", "model": {"ref": "m", "fingerprint": "abc"}, "recipe": "fp",
                                "method": "fp", "bits": 16, "artifact": "/a", "fidelity": {"pad": "x" * 3000},
                                "provenance": {}})
    data = bytearray(path.read_bytes())
    for offset in range(2 * 4096, len(data) - 4096, 4096):
        data[offset:offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_store_is_named_with_its_recovery_and_left_unchanged(tmp_path, tiny_dir, tiny_text, quantlab_home):
    folder = tmp_path / "db"
    db = _damaged_store(folder / "runs.db")
    before = _digest(folder)
    line = _one_line_error(_invoke("runs", "--store", str(db)), 1, f"The store {db} is damaged", ".recover")
    assert "quantlab changed nothing" in line
    res = _invoke("quantize-and-compare", "--model", str(tiny_dir), "--recipes", "rtn-w8", "--text", str(tiny_text),
                  "--store", str(db), "--out", str(tmp_path / "out"))
    _one_line_error(res, 1, f"The store {db} is damaged")
    res = _invoke("report", "--run-set", "rs1", "--store", str(db), "--out", str(tmp_path / "r.html"))
    _one_line_error(res, 1, f"The store {db} is damaged")
    assert _digest(folder) == before
    assert not (quantlab_home / "artifacts").exists() and not (tmp_path / "out").exists()


def test_quantlab_home_or_one_of_its_folders_being_a_file_is_one_line(tmp_path, tiny_dir, tiny_text, monkeypatch):
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    monkeypatch.setenv("QUANTLAB_HOME", str(home))
    res = _invoke("quantize", "rtn-w8", "--model", str(tiny_dir))
    _one_line_error(res, 2, f"QUANTLAB_HOME {home} is a file where quantlab needs a folder")
    assert _invoke("runs").exit_code == 0  # reading runs never creates a store: none there is none stored
    home = tmp_path / "home"
    (home / "artifacts").parent.mkdir()
    (home / "artifacts").write_text("a file where the artifact cache belongs")
    monkeypatch.setenv("QUANTLAB_HOME", str(home))
    res = _invoke("quantize", "rtn-w8", "--model", str(tiny_dir))
    _one_line_error(res, 2, f"{home / 'artifacts'} is a file where quantlab needs a folder",
                    "point QUANTLAB_HOME at another folder")
    (home / "artifacts").unlink()
    (home / "quantlab.db").mkdir()
    _one_line_error(_invoke("runs"), 1, f"The store {home / 'quantlab.db'} is a folder")


# --- 6. a full disk, named with the free space of the folder written -------------------------------------------


def _in_full_tmpfs(tmp_path: Path, command: str) -> subprocess.CompletedProcess:
    """Run ``command`` (a shell line) where ``tmp_path/full`` is a 64 KiB tmpfs with exactly one 4 KiB page
    free: a real full disk, private to the command (a user and mount namespace: no root needed, nothing
    mounted outside it)."""
    full = tmp_path / "full"
    full.mkdir()
    fill = (f"{shlex.quote(sys.executable)} -c \"import pathlib\ni = 0\nwhile True:\n    "
            f"p = pathlib.Path('{full}/ballast-%d' % i)\n    try: p.write_bytes(bytes(4096))\n    "
            f"except OSError: p.unlink(); pathlib.Path('{full}/ballast-0').unlink(); break\n    i += 1\"")
    script = f"mount -t tmpfs -o size=64k tmpfs {full} || exit 97\n{fill}\n{command}"
    try:
        res = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except FileNotFoundError:
        pytest.skip("needs util-linux's unshare for a private tmpfs")
    if res.returncode == 97 or "unshare failed" in res.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {res.stderr.strip()[:200]}")
    return res


def test_an_atomic_write_that_runs_out_of_space_names_the_folder_and_leaves_nothing(tmp_path):
    code = ("import numpy as np, os, sys\nfrom quantlab.errors import DiskFullError\n"
            "from quantlab.fsutil import atomic_dir, atomic_write_bytes\nfull = sys.argv[1]\n"
            "for write in ('dir', 'file'):\n    try:\n        if write == 'dir':\n"
            "            with atomic_dir(full + '/cache') as tmp:\n"
            "                np.save(open(tmp / 'logprobs.npy', 'wb'), np.zeros(100_000))\n"
            "        else:\n            atomic_write_bytes(full + '/x.bin', bytes(100_000))\n"
            "    except DiskFullError as exc:\n        print(exc)\n"
            "print(sorted(n for n in os.listdir(full) if not n.startswith('ballast')))\n")
    res = _in_full_tmpfs(tmp_path, f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} {tmp_path / 'full'}")
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3, res.stdout + res.stderr
    for line, what in zip(lines, ("cache", "x.bin")):
        assert line.startswith(f"The disk holding {tmp_path / 'full'} is full (0 MB free) while writing {what}"), line
        assert "free space there or write to another disk" in line
    assert lines[2] == "[]"  # no temp file or folder left behind


def test_the_fidelity_step_names_a_full_disk(tmp_path, tiny_dir, tiny_text, quantlab_home):
    per_token = tmp_path / "full" / "tokens.npz"
    command = " ".join(shlex.quote(a) for a in [*QUANTLAB, "eval", str(tiny_dir), "--baseline", str(tiny_dir),
                                                "--text", str(tiny_text), "--per-token", str(per_token)])
    res = _in_full_tmpfs(tmp_path, command)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("Error")]
    assert res.returncode == 1, res.stderr
    assert lines == [f"Error: The disk holding {per_token.parent} is full (0 MB free) while writing tokens.npz — "
                     "free space there or write to another disk; nothing half-written was kept"], res.stderr
    assert "Traceback" not in res.stderr and "requested and" not in res.stderr


# --- 7. errors on stderr, every option checked -----------------------------------------------------------------


def test_eval_checks_max_memory_and_refuses_options_it_would_ignore(tmp_path, tiny_dir, quantlab_home):
    from suite_data import write_arc

    write_arc(tmp_path / "data" / "arc_challenge" / "ARC-Challenge-Test.jsonl", 4)
    base = ["eval", str(tiny_dir), "--tasks", "arc_challenge", "--data-dir", str(tmp_path / "data")]
    _one_line_error(_invoke(*base, "--max-memory", "garbage"), 2, "'garbage' is not a memory size")
    _one_line_error(_invoke(*base, "--text", "wikitext2_raw"), 2, "--text applies only with --baseline")
    _one_line_error(_invoke(*base, "--per-token", str(tmp_path / "t.npz")), 2, "--per-token applies only with --baseline")
    assert not (quantlab_home / "lmeval").exists()  # refused before the tasks were prepared


def test_eval_outside_a_git_checkout_prints_no_git_error(tmp_path, tiny_dir, quantlab_home):
    from suite_data import write_arc

    write_arc(tmp_path / "data" / "arc_challenge" / "ARC-Challenge-Test.jsonl", 4)
    outside = tmp_path / "not-a-checkout"
    outside.mkdir()
    res = subprocess.run([*QUANTLAB, "eval", str(tiny_dir), "--tasks", "arc_challenge", "--data-dir",
                          str(tmp_path / "data"), "--limit", "4"], cwd=outside, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "fatal" not in res.stderr and "not a git repository" not in res.stderr, res.stderr
    assert json.loads(res.stdout)["runs"][0]["accuracy"]["tasks"]["arc_challenge"]["n"] == 4


@pytest.mark.parametrize("args, needle", [
    (["gate", "--baseline", "a", "--candidate", "b", "--json-out", "{tmp}"], "Invalid value for '--json-out'"),
    (["fitt"], "No such command 'fitt'. Did you mean 'fit'? — see"),
    (["--bogus"], "No such option '--bogus' — see"),
    (["plan", "x", "--batch", "0"], "Invalid value for '--batch'"),
    (["fit", "{tiny}", "--weights-budget", "1MB", "--context", "8192"], "--context and --batch size the KV cache"),
])
def test_usage_errors_are_one_line_on_stderr_too(args, needle, tmp_path, tiny_dir):
    res = _invoke(*[a.replace("{tmp}", str(tmp_path)).replace("{tiny}", str(tiny_dir)) for a in args])
    line = _one_line_error(res, 2, needle)
    assert "Usage:" not in res.output and res.stdout == "" and " — " in line


@pytest.mark.parametrize("line, message", [("limit: true", "limit must be an integer (got True)"),
                                           ("limit: .nan", "limit must be an integer (got nan)"),
                                           ("batch_size: 2.5", "batch_size must be an integer (got 2.5)")])
def test_a_suite_value_of_the_wrong_type_is_named(tmp_path, tiny_dir, line, message):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"tasks: [arc_challenge]\n{line}\n")
    _one_line_error(_invoke("eval", str(tiny_dir), "--suite", str(suite)), 2, message)
