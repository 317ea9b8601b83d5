"""Jobs: one (model, recipe) under one evaluation and measurement setting, content-addressed.

A job's key is the sha256 of everything that can change its result: the artifact key (model fingerprint,
recipe, calibration data sha256, quantlab version, the method's library versions, device class), the
evaluation text sha256 and fidelity settings, the latency settings and threads, and the suite's settings,
data sha256 and lm-eval version. A finished job is cached under ``QUANTLAB_HOME/jobs/<key>/`` (written to
a temp dir and renamed into place), so a rerun reuses it whole. A job is the one context its steps run in:
the model (with its trust_remote_code), the recipe, the text and settings, the device, threads, data dir and
memory budget, and each step's typed plan. The local executor hands the Job itself to its threads; it becomes a
payload only to cross into a Ray task (``payload`` / ``Job.from_payload``), as a step's inputs do into its
process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from quantlab.artifacts import artifact_key
from quantlab.evaluate.fidelity import FidelitySettings
from quantlab.evaluate.harness import HarnessSettings, PreparedTasks
from quantlab.evaluate.text import TextSource
from quantlab.measure.latency import LatencySettings
from quantlab.home import quantlab_home
from quantlab.models.source import ModelSource
from quantlab.plan.steps import REFUSED, SKIPPED, StepPlan
from quantlab.provenance import library_version
from quantlab.recipe import Recipe


@dataclass(frozen=True)
class Job:
    key: str
    model: ModelSource
    recipe: Recipe
    text: TextSource
    fidelity: FidelitySettings
    latency: LatencySettings
    suite: HarnessSettings | None
    prepared: PreparedTasks | None
    device: str
    threads: int
    data_dir: str | None = None  # where the recipe's calibration or training text is read from
    budget: int | None = None  # the memory budget in bytes (quantlab.plan.steps), or None
    steps: dict[str, StepPlan] | None = None  # each step's plan within the budget; None without one
    refused: str | None = None  # why the job cannot run within the budget; a refused job is planned, never run

    def step(self, name: str) -> StepPlan | None:
        return (self.steps or {}).get(name)

    @property
    def label(self) -> str:
        return f"{self.model.ref}@{self.recipe.name}"

    @property
    def dir(self) -> Path:
        return job_dir(self.key)

    def payload(self) -> dict:
        return {"key": self.key, "model": self.model.to_dict(), "recipe": self.recipe.to_dict(),
                "text": self.text.to_dict(), "fidelity": self.fidelity.to_dict(), "latency": self.latency.to_dict(),
                "suite": self.suite.to_dict() if self.suite else None,
                "prepared": dataclasses.asdict(self.prepared) if self.prepared else None,
                "device": self.device, "threads": self.threads, "data_dir": self.data_dir, "budget": self.budget,
                "steps": self.steps and {name: plan.to_dict() for name, plan in self.steps.items()},
                "refused": self.refused}

    @classmethod
    def from_payload(cls, data: dict) -> "Job":
        return cls(key=data["key"], model=ModelSource.from_dict(data["model"]), recipe=Recipe.from_dict(data["recipe"]),
                   text=TextSource(**data["text"]), fidelity=FidelitySettings.from_dict(data["fidelity"]),
                   latency=LatencySettings.from_dict(data["latency"]),
                   suite=HarnessSettings.from_dict(data["suite"]) if data.get("suite") else None,
                   prepared=PreparedTasks(**data["prepared"]) if data.get("prepared") else None,
                   device=data["device"], threads=data["threads"], data_dir=data.get("data_dir"),
                   budget=data.get("budget"),
                   steps=data["steps"] and {name: StepPlan.from_dict(p) for name, p in data["steps"].items()},
                   refused=data.get("refused"))


def job_dir(key: str) -> Path:
    return quantlab_home() / "jobs" / key[:2] / key


def make_job(source: ModelSource, recipe: Recipe, text: TextSource, fidelity: FidelitySettings,
             latency: LatencySettings, suite: HarnessSettings | None, prepared: PreparedTasks | None, device: str,
             threads: int, data_dir: str | None, steps: dict[str, StepPlan] | None = None,
             budget: int | None = None) -> Job:
    """A job with its content key (see the module docstring). Under a memory budget a skipped step (a bench
    that cannot fit) changes the result, so it is part of the key; how a step runs (in memory or layer by
    layer) does not change what it computes and is not."""
    suite_dict = suite.to_dict() if suite else None
    payload = {
        "artifact": artifact_key(source, recipe, device, data_dir), "recipe_name": recipe.name,
        "text": text.sha256, "fidelity": fidelity.to_dict(), "latency": latency.to_dict(), "threads": threads,
        "suite": suite_dict and {k: v for k, v in suite_dict.items() if k != "data_dir"},
        "suite_data": prepared and {t: d["files"] for t, d in prepared.data.items()},
        "lm_eval": library_version("lm_eval") if suite else None,
    }
    skipped = sorted(name for name, plan in (steps or {}).items() if plan.mode == SKIPPED)
    if skipped:
        payload["skipped_steps"] = skipped
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    refused = [f"{name}: {plan.reason}" for name, plan in (steps or {}).items() if plan.mode == REFUSED]
    return Job(key=key, model=source, recipe=recipe, text=text, fidelity=fidelity, latency=latency, suite=suite,
               prepared=prepared, device=device, threads=threads, data_dir=data_dir, budget=budget, steps=steps,
               refused=refused[0] if refused else None)
