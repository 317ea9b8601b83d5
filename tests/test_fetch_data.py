"""scripts/fetch_data.sh, which the example workflow runs on a runner with internet: its files are the ones the
suites read, with the sha256 of the shared copies; what it refuses, it refuses before any download."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from quantlab.evaluate.suites import load_suite
from quantlab.evaluate.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "fetch_data.sh"
SHARED = ROOT.parent / "shared" / "data"


def _table(name: str) -> dict[str, str]:
    """``task/file`` -> sha256 from one of the script's tables (FILES or DERIVED)."""
    text = SCRIPT.read_text().split(f'{name}="', 1)[1].split('"', 1)[0]
    return {f"{row[0]}/{row[1]}": row[3] for row in (line.split() for line in text.splitlines()) if row}


FETCHED = {**_table("FILES"), **_table("DERIVED")}


@pytest.mark.parametrize("suite", ["quick", "ci"])
def test_the_script_writes_every_file_the_suite_reads(suite):
    for task in load_suite(suite).tasks:
        assert set(TASKS[task].files) <= set(FETCHED), task


@pytest.mark.skipif(not (SHARED / "SHA256SUMS").is_file(), reason="needs ../shared/data")
def test_its_sha256_are_the_shared_copies():
    sums = {line.split()[1].removeprefix("./"): line.split()[0]
            for line in (SHARED / "SHA256SUMS").read_text().splitlines() if line.strip()}
    assert {path: sums[path] for path in FETCHED} == FETCHED


def test_the_workflow_fetches_what_its_suite_reads():
    steps = yaml.safe_load((ROOT / ".github" / "workflows" / "quant-gate.yml").read_text())["jobs"]["gate"]["steps"]
    runs = "\n".join(step.get("run", "") for step in steps)
    fetched = next(line for line in runs.splitlines() if "fetch_data.sh" in line).split("fetch_data.sh", 1)[1].split()
    assert "--suite ci" in runs and set(load_suite("ci").tasks) <= set(fetched)


def _run(data_dir: Path, *tasks: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *tasks], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "QUANTLAB_DATA_DIR": str(data_dir)})


def test_an_unknown_task_and_a_foreign_file_are_errors_that_write_nothing(tmp_path):
    res = _run(tmp_path, "boolq")
    assert res.returncode == 2 and "Error: no source for task 'boolq' — known: arc_easy hellaswag piqa" in res.stderr
    assert not any(tmp_path.iterdir())
    (tmp_path / "arc_easy").mkdir()
    theirs = tmp_path / "arc_easy" / "ARC-Easy-Test.jsonl"
    theirs.write_text("not the ARC file\n")
    res = _run(tmp_path, "arc_easy")
    assert res.returncode == 1 and f"Error: {theirs} exists with sha256" in res.stderr and "move it away" in res.stderr
    assert theirs.read_text() == "not the ARC file\n" and sorted(p.name for p in theirs.parent.iterdir()) == [theirs.name]
