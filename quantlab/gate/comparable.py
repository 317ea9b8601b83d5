"""Before any test: a baseline and a candidate the gate pairs must be comparable, or the verdict says nothing.

Refused, each with one line naming both sides and the fix: runs of two different models (by the model fingerprint
each record names, where both name one; ``allow_other_model`` permits it on purpose), a task the policy tests
scored on different data (the sha256 of its files), with a different --limit, --shard or few-shot count, or by a
different lm-eval task version; and fidelity measured on a different reference text (its sha256) or on different
windows. A fact one side does not record is not compared: it cannot be shown to differ.
"""

from __future__ import annotations

from quantlab.errors import UsageError

# suite settings that change which documents are scored or how: (settings key, the option that sets it)
_SETTINGS = (("limit", "--limit"), ("shard", "--shard"), ("num_fewshot", "num_fewshot"), ("max_length", "max_length"))


def check_comparable(pairs: list[tuple[dict, dict]], rules, allow_other_model: bool = False) -> None:
    """Every (baseline, candidate) pair, on the tasks ``rules`` test (``fidelity`` for the fidelity metrics)."""
    tasks = sorted({rule.task for rule in rules})
    for base, cand in pairs:
        if not allow_other_model:
            same_model(base, cand)
        for task in tasks:
            if task == "fidelity":
                same_text(base, cand)
            else:
                same_task(base, cand, task)


def same_model(base: dict, cand: dict) -> None:
    b, c = base.get("fingerprint"), cand.get("fingerprint")
    if b and c and b != c:
        raise UsageError(f"Baseline {base['label']} is of model {base.get('model')} (fingerprint {b[:12]}), candidate "
                         f"{cand['label']} of model {cand.get('model')} (fingerprint {c[:12]}) — gate a candidate "
                         "against a baseline of its own model, or pass --allow-other-model to compare two models on "
                         "purpose")


def same_task(base: dict, cand: dict, task: str) -> None:
    b_info, c_info = _task(base, task), _task(cand, task)
    b_data, c_data = _data(b_info), _data(c_info)
    if b_data and c_data and b_data != c_data:
        raise UsageError(f"{task}: baseline {base['label']} was scored on data sha256 {_short(b_data)}, candidate "
                         f"{cand['label']} on {_short(c_data)} — evaluate both on the same data files (--data-dir)")
    b_set, c_set = _settings(base), _settings(cand)
    for key, option in _SETTINGS:
        if key in b_set and key in c_set and _norm(b_set[key]) != _norm(c_set[key]):
            raise UsageError(f"{task}: baseline {base['label']} was evaluated with {option} {_shown(b_set[key])}, "
                             f"candidate {cand['label']} with {option} {_shown(c_set[key])} — evaluate both with the "
                             f"same {option}")
    for key, what in (("version", "lm-eval task version"), ("num_fewshot", "few-shot count")):
        b, c = b_info.get(key), c_info.get(key)
        if b is not None and c is not None and b != c:
            raise UsageError(f"{task}: baseline {base['label']} has {what} {b}, candidate {cand['label']} {c} — the "
                             "prompts differ; evaluate both with the same lm-eval and task settings")


def same_text(base: dict, cand: dict) -> None:
    b_text, c_text = base.get("text") or {}, cand.get("text") or {}
    b, c = b_text.get("sha256"), c_text.get("sha256")
    if b and c and b != c:
        raise UsageError(f"fidelity: baseline {base['label']} was measured on text {b_text.get('name')} (sha256 "
                         f"{b[:12]}), candidate {cand['label']} on {c_text.get('name')} (sha256 {c[:12]}) — measure "
                         "both on the same --text")
    b_win, c_win = base.get("windows") or {}, cand.get("windows") or {}
    for key, option in (("chunk_tokens", "--chunk-tokens"), ("chunks", "--chunks"), ("tokens", "--chunk-tokens")):
        b, c = b_win.get(key), c_win.get(key)
        if b is not None and c is not None and b != c:
            raise UsageError(f"fidelity: baseline {base['label']} was measured on {_windows(b_win)}, candidate "
                             f"{cand['label']} on {_windows(c_win)} — measure both with the same --chunks and "
                             f"--chunk-tokens (here {option} differs)")


def _task(run: dict, task: str) -> dict:
    return ((run.get("accuracy") or {}).get("tasks") or {}).get(task) or {}


def _settings(run: dict) -> dict:
    return (run.get("accuracy") or {}).get("settings") or {}


def _data(info: dict) -> tuple[str, ...]:
    """The sha256 of the task's data files, without their paths (another machine keeps them elsewhere)."""
    return tuple(sorted((info.get("files") or {}).values()))


def _norm(value):
    return tuple(value) if isinstance(value, list) else value


def _short(shas: tuple[str, ...]) -> str:
    return ", ".join(s[:12] for s in shas)


def _shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{value[0]}/{value[1]}"
    return str(value)


def _windows(win: dict) -> str:
    size = f" of {win['chunk_tokens']} tokens" if win.get("chunk_tokens") else ""
    return f"{win.get('chunks')} windows{size} ({win.get('tokens')} tokens scored)"
