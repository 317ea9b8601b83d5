"""quantlab's JSON outputs read back as input: results.json, ``eval --output`` files, shard outputs.

A file someone hands to ``report``, ``gate`` or ``merge-shards`` may be damaged, hand-edited or not quantlab's at
all. It is refused with one line naming the file, the field (``runs[2].fidelity.kld_mean``) and the fix when it
is not JSON, is empty, is not a mapping, holds NaN or Infinity anywhere (a value that is not a number is never a
result), or when a field its reader uses holds the wrong type. A schema lists only the fields its reader uses:
the others are not checked, so records may grow.

A schema is built from ``Kind`` (one value), ``Opt`` (or null), ``Each`` (a list of), ``Values`` (a mapping
of names to) and ``Fields`` (a mapping with these keys, some required).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantlab.errors import UsageError


@dataclass(frozen=True)
class Kind:
    what: str  # "a number": completes "where ... belongs"
    test: Callable[[Any], bool]


@dataclass(frozen=True)
class Opt:
    spec: Any


@dataclass(frozen=True)
class Each:
    spec: Any
    size: int | None = None  # exactly this many items (a [low, high] interval: 2)


@dataclass(frozen=True)
class Values:
    spec: Any


@dataclass(frozen=True)
class Fields:
    fields: dict
    required: tuple[str, ...] = ()
    rest: Any = None  # the spec of keys not listed; None: not checked


@dataclass(frozen=True)
class AnyOf:
    specs: tuple
    what: str


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


NUMBER = Kind("a number", _real)
INT = Kind("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))
TEXT = Kind("text", lambda v: isinstance(v, str))
FLAG = Kind("true or false", lambda v: isinstance(v, bool))
MAPPING = Kind("a mapping", lambda v: isinstance(v, dict))
INTERVAL = Opt(Each(Opt(NUMBER), size=2))  # a 95 % interval: [low, high]

#: how to fix a field, unless the reader says otherwise
FIX = "regenerate the file with quantlab, or correct that field"


class Problem(Exception):
    """A field that does not fit its schema: where, and what is wrong ("is a string ('0.1'), where a number
    belongs")."""

    def __init__(self, where: str, text: str):
        super().__init__(where, text)
        self.where, self.text = where, text


def read_json(path: str | Path, what: str, fix: str = "regenerate it with quantlab"):
    """The parsed content of ``path`` (a mapping), or a one-line UsageError: missing, unreadable, empty, not JSON,
    not a mapping, or holding NaN/Infinity (named by its field path)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist — give {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path} cannot be read ({exc.strerror}) — check its permissions") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text (byte {exc.start}), so not {what} — give {what}, or "
                         f"{fix}") from None
    if not text.strip():
        raise UsageError(f"{path} is empty, so not {what} — give {what}, or {fix}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}), so not {what} — "
                         f"give {what}, or {fix}") from None
    except RecursionError:
        raise UsageError(f"{path} nests too deeply to be {what} — give {what}, or {fix}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds {_shown(data)}, not the mapping {what} is — give {what}, or {fix}")
    bad = first_non_finite(data)
    if bad is not None:
        raise UsageError(f"{path}: {bad[0]} is {bad[1]}, not a number — a value that is not a number is no result: "
                         "rerun what produced it, or remove that run from the file")
    return data


def first_non_finite(data) -> tuple[str, str] | None:
    """(field path, 'NaN' or 'Infinity') of the first NaN or infinite value anywhere in ``data``, else None.
    Iterative: a deeply nested file must not exhaust the stack here either."""
    stack = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return where or "the file", "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
        if isinstance(value, dict):
            stack.extend((_key(where, k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None


def check(value, spec, path: str | Path, where: str = "", fix: str = FIX) -> None:
    """Raise a one-line UsageError naming ``path``, the field and ``fix`` where ``value`` does not fit ``spec``."""
    try:
        _check(value, spec, where)
    except Problem as bad:
        raise UsageError(f"{path}: {bad.where or 'the file'} {bad.text} — {fix}") from None


def _check(value, spec, where: str) -> None:
    if isinstance(spec, Opt):
        if value is None:
            return
        spec = spec.spec
    if isinstance(spec, Kind):
        if not spec.test(value):
            raise Problem(where, f"is {_shown(value)}, where {spec.what} belongs")
    elif isinstance(spec, AnyOf):
        if not any(_fits(value, s, where) for s in spec.specs):
            raise Problem(where, f"is {_shown(value)}, where {spec.what} belongs")
    elif isinstance(spec, Each):
        _check(value, Kind("a list", lambda v: isinstance(v, list)), where)
        if spec.size is not None and len(value) != spec.size:
            raise Problem(where, f"holds {len(value)} items, where {spec.size} belong")
        for i, item in enumerate(value):
            _check(item, spec.spec, f"{where}[{i}]")
    elif isinstance(spec, Values):
        _check(value, MAPPING, where)
        for key, item in value.items():
            _check(item, spec.spec, _key(where, key))
    elif isinstance(spec, Fields):
        _fields(value, spec, where)
    else:  # pragma: no cover - a schema bug, not bad input
        raise TypeError(f"not a schema: {spec!r}")


def _fields(value, spec: Fields, where: str) -> None:
    _check(value, MAPPING, where)
    for key in spec.required:
        if key not in value:
            raise Problem(_key(where, key), "is missing")
    for key, item in value.items():
        sub = spec.fields.get(key, spec.rest)
        if sub is not None:
            _check(item, sub, _key(where, key))


def _fits(value, spec, where: str) -> bool:
    try:
        _check(value, spec, where)
    except Problem:
        return False
    return True


def _key(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _shown(value) -> str:
    """What a JSON value is, for an error line: a string ('0.1'), a list, null, true."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        text = value if len(value) <= 30 else value[:27] + "..."
        return f"a string ({text!r})"
    if isinstance(value, list):
        return f"a list of {len(value)}" if value else "an empty list"
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    return f"the number {value!r}"


# The fields quantlab's readers of suite accuracy use (gate, report, merge-shards).
SAMPLE_ROW = Fields({"doc_id": INT, "ll": AnyOf((NUMBER, Each(NUMBER)), "a number or a list of numbers"),
                     "gold": Opt(INT), "choice_len": Each(INT), "greedy": FLAG, "words": NUMBER, "bytes": NUMBER},
                    required=("doc_id",), rest=Kind("a number", lambda v: isinstance(v, (int, float))))
SAMPLES = Values(Each(SAMPLE_ROW))
TASK = Fields({"metrics": Values(Opt(NUMBER)), "stderr": Values(Opt(NUMBER)), "n": INT, "n_total": Opt(INT),
               "files": Values(TEXT), "output_type": TEXT, "aggregation": Values(TEXT), "num_fewshot": Opt(INT)})
SUITE_SETTINGS = Fields({"tasks": Each(TEXT), "limit": Opt(INT), "shard": Opt(Each(INT, size=2)),
                         "num_fewshot": Opt(INT), "batch_size": INT, "max_length": INT, "bootstrap_iters": INT})
ACCURACY = Fields({"tasks": Values(TASK), "samples": SAMPLES, "samples_path": TEXT, "settings": SUITE_SETTINGS,
                   "lm_eval": Opt(MAPPING)})
TEXT_SOURCE = Fields({"name": Opt(TEXT), "sha256": Opt(TEXT)})
PROVENANCE = Fields({"text": Opt(TEXT_SOURCE), "fidelity_settings": Opt(Fields({"chunk_tokens": INT}))})
FIDELITY = Fields({"kld_per_window": Opt(Each(NUMBER)), "nll_per_window": Opt(Each(NUMBER)), "chunks": INT,
                   "tokens": INT})
RUN = Fields({"recipe": TEXT, "accuracy": Opt(ACCURACY), "fidelity": Opt(FIDELITY), "provenance": Opt(PROVENANCE)},
             required=("recipe",))
MODEL = AnyOf((TEXT, Fields({"ref": Opt(TEXT), "fingerprint": Opt(TEXT)})), "a model reference or {ref, fingerprint}")
RESULTS = Fields({"model": Opt(MODEL), "runs": Each(RUN), "text": Opt(TEXT_SOURCE),
                  "fidelity_baseline": Opt(Fields({"ref": Opt(TEXT), "fingerprint": Opt(TEXT)}))}, required=("runs",))
