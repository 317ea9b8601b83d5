"""Accuracy suites through lm-evaluation-harness, offline, on local copies of the data.

Each requested built-in task gets an override YAML (in the quantlab cache) that ``include:``s lm-eval's own
task YAML by path and replaces only the dataset source with a JSONL converted from the data dir, so lm-eval's
prompts, targets and metrics apply unchanged. Tasks from ``--include-path`` are the user's own YAMLs. The model
is handed to lm-eval in memory (HFLM with a model object): a quantized model is evaluated as quantlab loaded
it. Batch size, max length, dtype and threads are pinned and recorded: log-probs move ~1e-5 across batch sizes.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from quantlab.errors import DataError, MissingExtraError, UsageError
from quantlab.evaluate.tasks import TASKS, convert
from quantlab.evaluate.text import data_dir
from quantlab.fsutil import cached_entry, yaml_problem
from quantlab.home import quantlab_home
from quantlab.models.fingerprint import cached_sha256
from quantlab.provenance import git_sha, library_version
from quantlab.quiet import quiet_libraries
from quantlab.engines import EngineModel
from quantlab.engines.harness import engine_lm

LM_EVAL_SEEDS = {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234}  # lm-eval's own defaults
# What each weighted perplexity of a loglikelihood_rolling task is normalised by, per document (lm-eval's
# (loglikelihood, count) items): a sample row keeps the count under this name beside its ``ll``.
COUNTS = {"word_perplexity": "words", "byte_perplexity": "bytes", "bits_per_byte": "bytes"}


@dataclass(frozen=True)
class HarnessSettings:
    tasks: tuple[str, ...]
    limit: int | None = None  # first N documents of each task (lm-eval's --limit)
    batch_size: int = 8  # the CPU sweet spot; lm-eval's "auto" probes for minutes
    max_length: int = 2048  # context for rolling perplexity windows and truncation
    num_fewshot: int | None = None  # None: each task's own (0 for the built-ins quantlab maps)
    bootstrap_iters: int = 1000  # lm-eval's stderr: closed form for means, bootstrap for perplexity
    data_dir: str | None = None
    include_path: str | None = None
    shard: tuple[int, int] | None = None  # (i, n): documents i, i+n, i+2n, ... of each task (lm-eval's samples=)

    def __post_init__(self):
        if not self.tasks:
            raise UsageError("No tasks given — e.g. --tasks hellaswag,arc_easy,piqa")
        for name in ("limit", "batch_size", "max_length", "num_fewshot"):  # a suite YAML's `limit: true` is not 1
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise UsageError(f"{name} must be an integer (got {value!r}) — e.g. {name}: 100")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be ≥ 1 (got {self.limit})")
        if self.batch_size < 1 or self.max_length < 16 or (self.num_fewshot or 0) < 0:
            raise UsageError("batch size must be ≥ 1, max length ≥ 16 and num_fewshot ≥ 0")
        if self.shard is not None:
            i, n = self.shard
            if not (n >= 2 and 0 <= i < n):
                raise UsageError(f"--shard {i}/{n} is not a shard — give I/N with 0 ≤ I < N and N ≥ 2, e.g. 0/2")
            if self.limit is not None:
                raise UsageError("--shard and --limit exclude each other — shard the full task or limit it")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HarnessSettings":
        shard = data.get("shard")
        return cls(**{**data, "tasks": tuple(data["tasks"]), "shard": tuple(shard) if shard else None})


@dataclass
class PreparedTasks:
    include_paths: list[str]
    names: list[str]
    data: dict[str, dict] = field(default_factory=dict)  # task -> {files: {path: sha256}, items, note}

    def file_hashes(self) -> dict[str, str]:
        """path -> sha256 of every local data file the tasks read (for provenance)."""
        return {f: sha for task in self.data.values() for f, sha in task["files"].items()}


def offline_env() -> None:
    """No hub access for datasets or models; the datasets cache under QUANTLAB_HOME. Before importing datasets."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(quantlab_home() / "hf_datasets"))
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's perplexity bootstrap: no process pool


def user_tasks(include_path: str | None) -> dict[str, Path]:
    """Task names defined by YAMLs under ``include_path`` (``task:`` keys), without indexing lm-eval's tasks."""
    if not include_path:
        return {}
    root = Path(include_path)
    if not root.is_dir():
        raise UsageError(f"--include-path {root} is not a directory — give the folder holding your task YAMLs")
    found = {}
    for path in sorted(root.rglob("*.yaml")):
        try:
            text = path.read_text(encoding="utf-8")
            doc = yaml.load(text, Loader=_IgnoreTags)
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise UsageError(f"{path} is not readable UTF-8 text ({exc.__class__.__name__}) — fix or remove it") from None
        except yaml.YAMLError as exc:
            raise UsageError(f"Task file {path}: {yaml_problem(exc)}") from None
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            found[doc["task"]] = path
    return found


def _ignore_tag(loader, suffix, node):
    return None


class _IgnoreTags(yaml.SafeLoader):
    """Reads task YAMLs that use lm-eval's ``!function`` tags, without importing anything."""


_IgnoreTags.add_multi_constructor("!", _ignore_tag)


def check_tasks(settings: HarnessSettings) -> tuple[list[str], dict[str, Path]]:
    """Known task names and their local files exist — before any model is loaded. Returns (names, user YAMLs)."""
    lm_eval_tasks_dir()
    own = user_tasks(settings.include_path)
    known = sorted(set(TASKS) | set(own))
    base = None
    for name in settings.tasks:
        if name in own:
            continue
        if name not in TASKS:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"Did you mean '{close[0]}'? " if close else ""
            raise UsageError(f"Unknown task '{name}'. {hint}Available: {', '.join(known)} "
                             "(your own task YAMLs: --include-path DIR)")
        base = base or data_dir(settings.data_dir)
        if base is None:
            raise DataError(f"No data dir for task '{name}' — pass --data-dir or set QUANTLAB_DATA_DIR")
        for rel in TASKS[name].files:
            if not (base / rel).is_file():
                raise DataError(f"Task '{name}' needs {base / rel}, which does not exist in the data dir {base} — "
                                f"put the file there or pass --data-dir")
    return list(settings.tasks), own


def prepare_tasks(settings: HarnessSettings) -> PreparedTasks:
    """Convert local data and write override YAMLs into the cache (once per data hash and lm-eval version)."""
    names, own = check_tasks(settings)
    local = [n for n in names if n not in own]
    prepared = PreparedTasks(include_paths=[], names=names)
    for name in local:
        folder, info = _write_override(TASKS[name], data_dir(settings.data_dir))
        prepared.include_paths.append(str(folder))
        prepared.data[name] = info
    if own:
        prepared.include_paths.append(str(Path(settings.include_path).resolve()))
        for n in names:
            if n in own:
                prepared.data[n] = {"files": {str(own[n].resolve()): _sha(own[n])}, "note": "user task YAML"}
    return prepared


def _sha(path: Path) -> str:
    return cached_sha256(path)


def _write_override(task, base: Path) -> tuple[Path, dict]:
    """Convert one task's local files and write its override YAML, once per (files, lm-eval version)."""
    import hashlib
    import json

    files = {str((base / rel).resolve()): _sha(base / rel) for rel in task.files}
    # the converters' own source is in the key: a changed converter rebuilds the cached data
    key = json.dumps([task.name, task.builtin, task.converter, library_version("lm_eval"), sorted(files.values()),
                      hashlib.sha256(Path(convert.__file__).read_bytes()).hexdigest()])
    folder = quantlab_home() / "lmeval" / f"{task.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    def build(tmp: Path) -> None:
        records = task.convert([base / rel for rel in task.files])
        (tmp / "data").mkdir()
        with open(tmp / "data" / f"{task.name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (tmp / "tasks").mkdir()
        override = _override(task, lm_eval_tasks_dir(), folder / "data" / f"{task.name}.jsonl",
                             quantlab_home() / "hf_datasets")
        (tmp / "tasks" / f"{task.name}.yaml").write_text(yaml.safe_dump(override, sort_keys=False))
        (tmp / "meta.json").write_text(json.dumps({"converted_items": len(records)}))

    cached_entry(folder, build, is_complete=lambda d: (d / "meta.json").is_file())
    meta = json.loads((folder / "meta.json").read_text())
    return folder / "tasks", {"files": files, "items": task.items, "note": task.note, **meta}


def _override(task, builtin: Path, jsonl: Path, cache: Path) -> dict:
    splits = {"training_split": None, "validation_split": None, "test_split": None}
    splits[f"{task.split}_split"] = task.split
    return {"include": str(builtin / task.builtin), "task": task.name, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {task.split: str(jsonl)}, "cache_dir": str(cache)}, **splits}


def lm_eval_tasks_dir() -> Path:
    from importlib.util import find_spec

    if find_spec("lm_eval") is None:
        raise MissingExtraError("Accuracy tasks need lm-eval, which is not installed — "
                                "pip install -c scripts/constraints.txt -e '.[eval]'")
    return Path(find_spec("lm_eval").submodule_search_locations[0]) / "tasks"


@contextlib.contextmanager
def _own_git_sha():
    """lm-eval's simple_evaluate records ``git describe`` of the current folder, running git with the terminal's
    stderr: outside a checkout the user sees git's "fatal: not a git repository". The sha that belongs in a
    quantlab result is quantlab's own (provenance.git_sha, quiet), so lm-eval is given that for this call."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:  # a later lm-eval without it: nothing to replace
        yield
        return
    evaluator.get_git_commit_hash = git_sha
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def run_tasks(model, tokenizer, settings: HarnessSettings, prepared: PreparedTasks) -> dict:
    """lm-eval's simple_evaluate on an in-memory model; per task: metrics, stderrs and per-sample scores."""
    offline_env()
    quiet_libraries()
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=prepared.include_paths, include_defaults=False)
    leaves = leaf_tasks(get_task_dict(prepared.names, manager))
    if isinstance(model, EngineModel):  # an engine of its own (llama.cpp) scores the same requests
        lm = engine_lm(model, tokenizer, settings.max_length)
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, max_length=settings.max_length)
    picked = shard_indices(leaves, settings.shard)
    with _own_git_sha():
        out = simple_evaluate(model=lm, tasks=list(leaves.values()), num_fewshot=settings.num_fewshot,
                              limit=settings.limit, samples=picked, log_samples=True,
                              bootstrap_iters=settings.bootstrap_iters, task_manager=manager,
                              random_seed=LM_EVAL_SEEDS["random"], numpy_random_seed=LM_EVAL_SEEDS["numpy"],
                              torch_random_seed=LM_EVAL_SEEDS["torch"], fewshot_random_seed=LM_EVAL_SEEDS["fewshot"])
    order = {n: i for i, n in enumerate(prepared.names)}
    tasks = {}
    for name, task in sorted(leaves.items(), key=lambda kv: order.get(kv[0], len(order))):
        res = out["results"][name]
        tasks[name] = {
            "metrics": {k.split(",")[0]: v for k, v in res.items() if "," in k and "_stderr" not in k},
            "stderr": {k.split(",")[0].removesuffix("_stderr"): (v if isinstance(v, float) else None)
                       for k, v in res.items() if "_stderr," in k},
            "higher_is_better": out["higher_is_better"].get(name, {}),
            "aggregation": aggregations(task),
            "n": out["n-samples"][name]["effective"], "n_total": out["n-samples"][name]["original"],
            "version": out["versions"].get(name), "num_fewshot": out["n-shot"].get(name),
            "output_type": task.OUTPUT_TYPE, **prepared.data.get(name, {}),
            "samples": compact_samples(task, out["samples"][name]),
        }
    return {"tasks": tasks, "lm_eval": {"version": out.get("lm_eval_version"), "max_length": out.get("max_length"),
                                        "batch_size": settings.batch_size, "seeds": LM_EVAL_SEEDS,
                                        "bootstrap_iters": settings.bootstrap_iters}}


def aggregations(task) -> dict[str, str]:
    """Metric -> the name of the lm-eval function that aggregates its per-document values (``mean``,
    ``perplexity``, ``weighted_perplexity``, ``bits_per_byte`` ...: lm_eval/api/metrics.py), so shards merge
    the way lm-eval aggregates."""
    return {metric: getattr(fn, "__name__", str(fn)) for metric, fn in task.aggregation().items()}


def leaf_tasks(task_dict: dict) -> dict:
    """Task name -> Task object, groups flattened (quantlab reports per task)."""
    from lm_eval.api.task import Task

    out = {}
    for key, value in task_dict.items():
        if isinstance(value, Task):
            out[value.config.task] = value
        elif isinstance(value, dict):
            out.update(leaf_tasks(value))
    return out


def shard_indices(leaves: dict, shard: tuple[int, int] | None) -> dict[str, list[int]] | None:
    """Task -> document indices i, i+n, ... of shard (i, n), ascending (lm-eval maps its own numbering of the
    selected documents back through this list); None without a shard."""
    if shard is None:
        return None
    i, n = shard
    return {name: list(range(i, len(task.eval_docs), n)) for name, task in leaves.items()}


def compact_samples(task, samples: list[dict]) -> list[dict]:
    """Per document, sorted by doc_id: scalar metric values, the model's log-likelihoods and the gold index.
    (With a shard lm-eval logs each document's index in the full task, so shards merge and pair.)

    multiple_choice: ``ll`` per choice (in choice order), ``gold`` and ``choice_len`` (each choice's length in
    characters, as lm-eval's acc_norm counts it); loglikelihood: ``ll`` of the target and
    ``greedy``; loglikelihood_rolling: ``ll`` of the document plus the word/byte counts it is scored over.
    """
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        row = {"doc_id": s["doc_id"]}
        for metric in s["metrics"]:
            value = s.get(metric)
            if isinstance(value, (int, float)):
                row[metric] = value
        if task.OUTPUT_TYPE == "multiple_choice":
            row["ll"] = [float(r[0]) for r in s["filtered_resps"]]
            row["gold"] = gold_index(task, s["doc"])
            row["choice_len"] = [len(c) for c in task.doc_to_choice(s["doc"])]  # what acc_norm divides by
        elif task.OUTPUT_TYPE == "loglikelihood":
            ll, greedy = s["filtered_resps"][0]
            row.update(ll=float(ll), greedy=bool(greedy))
        elif task.OUTPUT_TYPE == "loglikelihood_rolling":
            row["ll"] = float(s["filtered_resps"][0])
            for metric, count in COUNTS.items():
                if isinstance(s.get(metric), (list, tuple)):
                    row[count] = s[metric][1]
        out.append(row)
    return out


def gold_index(task, doc: dict) -> int | None:
    """The gold choice as lm-eval's multiple_choice scoring finds it (None for multi-target tasks)."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        choices = task.doc_to_choice(doc)
        gold = choices.index(gold) if gold in choices else None
    return gold if isinstance(gold, int) else None
