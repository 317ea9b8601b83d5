"""Every YAML shipped under experiments/ loads with the reader its place names (found by globbing, so a new file
is checked without editing this test): sweep and experiment files as specs, suites, gate policies, published
scores."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantlab.evaluate.harness import check_tasks
from quantlab.evaluate.suites import load_suite
from quantlab.fsutil import load_yaml
from quantlab.gate.policy import load_policy
from quantlab.sweep.spec import load_spec

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FILES = sorted(EXPERIMENTS.rglob("*.yaml"))


def test_there_are_shipped_files_of_every_kind():
    kinds = {p.relative_to(EXPERIMENTS).parts[0] if len(p.relative_to(EXPERIMENTS).parts) > 1 else p.name
             for p in FILES}
    assert {"gates", "published", "suites.yaml", "sweep-smollm2.yaml"} <= kinds


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_shipped_yaml_loads(path):
    rel = path.relative_to(EXPERIMENTS)
    if rel.parts[0] == "gates":
        assert load_policy(path).rules
    elif rel.name == "suites.yaml":
        for name in load_yaml(path, "Suite file", ""):
            check_tasks(load_suite(name))  # every task is known and its local data is there
    elif rel.parts[0] == "published":
        data = load_yaml(path, "Published scores", "")
        assert data["model"] and isinstance(data, dict) and len(data) > 1
    else:
        spec = load_spec(path)
        assert spec.models and spec.recipes and spec.label == path.stem
