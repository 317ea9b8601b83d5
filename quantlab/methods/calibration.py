"""Calibration text for calibrated methods (GPTQ): a data-dir dataset, a user file, or ``self``."""

from __future__ import annotations

from pathlib import Path

from quantlab.errors import DataError
from quantlab.evaluate.text import resolve_text
from quantlab.models.load import load_tokenizer
from quantlab.models.source import resolve_model


def resolve_calibration(config, source_dir: Path, data_dir: str | None = None, trust_remote_code: bool = False):
    """The TextSource behind ``config.calibration`` (a data-dir dataset read from ``data_dir``, a file, or ``self``:
    text the fp model writes, cached)."""
    model = resolve_model(str(source_dir), trust_remote_code) if config.calibration == "self" else None
    try:
        return resolve_text(config.calibration, data_dir, model=model)
    except DataError as exc:
        raise DataError(f"Calibration: {exc}") from None


def calibration_inputs(config, source_dir: Path, data_dir: str | None = None, trust_remote_code: bool = False) -> dict:
    """What a calibrated method's artifact key takes from its calibration text (``Method.cache_inputs``)."""
    return {"calibration_sha256": resolve_calibration(config, Path(source_dir), data_dir, trust_remote_code).sha256}


def calibration_windows(config, source_dir: Path, device: str, data_dir: str | None = None,
                        trust_remote_code: bool = False) -> tuple[list[list[int]], dict]:
    """``config.samples`` windows of ``config.tokens`` token ids at seeded random offsets of the text."""
    import random

    text = resolve_calibration(config, source_dir, data_dir, trust_remote_code)
    ids = load_tokenizer(source_dir, trust_remote_code)(text.read(), add_special_tokens=False)["input_ids"]
    if len(ids) < 2 * config.tokens:
        raise DataError(
            f"Calibration text {text.name} has {len(ids)} tokens, fewer than two windows of {config.tokens} — "
            "give a longer text or lower 'tokens'"
        )
    rng = random.Random(config.seed)
    starts = [rng.randrange(0, len(ids) - config.tokens + 1) for _ in range(config.samples)]
    windows = [ids[s:s + config.tokens] for s in starts]
    info = {"source": text.name, "origin": text.origin, "sha256": text.sha256, "samples": config.samples,
            "tokens": config.tokens, "seed": config.seed, "text_tokens": len(ids),
            "distinct_fraction": len(set(starts)) / len(starts)}
    return windows, info
