"""Local benchmark files -> records in the schema of the hub dataset an lm-eval built-in task reads.

Each converter takes the task's local files (in the order its registry entry lists them) and returns a list
of dicts; lm-eval's own ``process_docs``, ``doc_to_text``, ``doc_to_target`` and ``doc_to_choice`` then run on
them unchanged. Field mappings are checked against the lm-eval 0.4.13 task YAMLs and utils.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from quantlab.errors import DataError


def read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {n} is not JSON ({exc.msg}) — restore the file from its source") from None
    return out


def _field(record: dict, key: str, path: Path, n: int):
    try:
        return record[key]
    except (KeyError, TypeError):
        raise DataError(f"{path} record {n} has no '{key}' — is this the file its SOURCE.md describes?") from None


def _labels(path: Path, count: int) -> list[str]:
    labels = path.read_text(encoding="utf-8").split()
    if len(labels) != count:
        raise DataError(f"{path} has {len(labels)} labels for {count} items — the two files must be line-aligned")
    return labels


def arc(paths: list[Path]) -> list[dict]:
    """AI2 ARC jsonl ``{id, question: {stem, choices: [{text, label}]}, answerKey}`` -> allenai/ai2_arc."""
    out = []
    for n, d in enumerate(read_jsonl(paths[0]), 1):
        q = _field(d, "question", paths[0], n)
        choices = _field(q, "choices", paths[0], n)
        out.append({"id": d.get("id", str(n)), "question": _field(q, "stem", paths[0], n),
                    "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                    "answerKey": _field(d, "answerKey", paths[0], n)})
    return out


def openbookqa(paths: list[Path]) -> list[dict]:
    """OpenBookQA jsonl (ARC layout) -> allenai/openbookqa ``main``: the stem becomes ``question_stem``."""
    return [{"id": d["id"], "question_stem": d.pop("question"), "choices": d["choices"], "answerKey": d["answerKey"]}
            for d in arc(paths)]


def boolq(paths: list[Path]) -> list[dict]:
    """BoolQ jsonl with ``label: "true"|"false"`` -> super_glue/boolq with an int label (False=0, True=1).

    lm-eval reads ``label`` raw as the gold index into ["no", "yes"]: a string label would score every item wrong.
    """
    values = {"false": 0, "true": 1, False: 0, True: 1, 0: 0, 1: 1}
    out = []
    for n, d in enumerate(read_jsonl(paths[0]), 1):
        label = _field(d, "label", paths[0], n)
        if label not in values:
            raise DataError(f"{paths[0]} record {n} has label {label!r} — expected true or false")
        out.append({"question": _field(d, "question", paths[0], n), "passage": _field(d, "passage", paths[0], n),
                    "idx": int(d.get("idx", n - 1)), "label": values[label]})
    return out


def piqa(paths: list[Path]) -> list[dict]:
    """PIQA ``valid.jsonl`` + line-aligned ``valid-labels.lst`` -> baber/piqa with an int label."""
    docs = read_jsonl(paths[0])
    labels = _labels(paths[1], len(docs))
    return [{"goal": _field(d, "goal", paths[0], n), "sol1": d["sol1"], "sol2": d["sol2"], "label": int(label)}
            for n, (d, label) in enumerate(zip(docs, labels), 1)]


def winogrande(paths: list[Path]) -> list[dict]:
    """WinoGrande 1.1 ``dev.jsonl`` + ``dev-labels.lst`` -> winogrande_xl validation (answer "1"/"2" as str)."""
    docs = read_jsonl(paths[0])
    labels = _labels(paths[1], len(docs))
    out = []
    for n, (d, label) in enumerate(zip(docs, labels), 1):
        answer = str(d.get("answer") or label)
        if answer != label or answer not in ("1", "2"):
            raise DataError(f"{paths[0]} record {n} has answer {answer!r} but {paths[1].name} says {label!r}")
        out.append({"sentence": _field(d, "sentence", paths[0], n), "option1": _field(d, "option1", paths[0], n),
                    "option2": _field(d, "option2", paths[0], n), "answer": answer})
    return out


_UNFINISHED = re.compile(r"^(.*[.!?])\s+([^.!?]+)$", re.S)


def hellaswag(paths: list[Path]) -> list[dict]:
    """llama.cpp's 6-line HellaSwag text -> Rowan/hellaswag records, ``ctx_a``/``ctx_b`` reconstructed.

    The text keeps ``ctx`` whole; lm-eval builds its query from ``ctx_a + " " + ctx_b.capitalize()``. A context
    that does not end in "." is an ActivityNet item whose unfinished last sentence is ``ctx_b`` (3,243 of
    10,042 items), so lm-eval's capitalisation ("... on a roof. He") is restored. See HELLASWAG_NOTE.
    """
    lines = paths[0].read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{paths[0]} has {len(lines)} lines, not a multiple of 6 (context, label, 4 endings)")
    out = []
    for k in range(0, len(lines), 6):
        head, label, *endings = lines[k:k + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep or label not in ("0", "1", "2", "3"):
            raise DataError(f"{paths[0]} line {k + 1}: expected 'activity: context' then a label 0-3")
        ctx_a, ctx_b = ctx, ""
        match = None if ctx.endswith(".") else _UNFINISHED.match(ctx)
        if match:
            ctx_a, ctx_b = match.group(1), match.group(2)
        out.append({"ind": k // 6, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                    "endings": endings, "source_id": "", "split": "val", "split_type": "", "label": label})
    return out


HELLASWAG_NOTE = (
    "hellaswag reads llama.cpp's text export of the validation set, which lacks the hub's separate ctx_a/ctx_b: "
    "quantlab splits off the unfinished last sentence of ActivityNet contexts so lm-eval re-capitalises it as on "
    "the hub; about 6 odd contexts may split differently, and endings the exporter stripped of a leading tag lack "
    "the leading space lm-eval keeps, so accuracies are close to but not bit-identical with hub lm-eval")


def wikitext(paths: list[Path]) -> list[dict]:
    """wiki.test.raw -> EleutherAI/wikitext_document_level pages: a page per top-level `` = Title = `` heading.

    Same loop as that dataset's builder (raw lines kept, blank " " lines included): 62 test pages.
    """
    pages, lines = [], []
    for line in paths[0].read_text(encoding="utf-8").split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return [{"page": p} for p in pages]


def passthrough(paths: list[Path]) -> list[dict]:
    """Already in the hub schema (lambada_openai's jsonl is byte-identical to the hub file)."""
    return read_jsonl(paths[0])
