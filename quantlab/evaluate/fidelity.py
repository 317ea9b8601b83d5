"""Fidelity of a quantized model against its fp baseline on one reference text.

Definitions (per predicted token t of the reference text, chunked into fixed windows):
- KL(fp || quant) = sum_v p_fp(v|ctx) * (log p_fp(v|ctx) - log p_q(v|ctx)), over the full vocabulary, in nats.
- top-1 agreement: argmax_v p_q == argmax_v p_fp.
- token-level perplexity: exp(mean negative log-likelihood of the actual next token), per model.
Each summary carries a bootstrap 95 % interval that resamples text chunks (not tokens), since tokens
within a chunk are correlated. Baseline log-probabilities are computed once per (model, text, window)
and cached as a float32 .npy; per-token values are kept for later paired tests.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from quantlab import metrics
from quantlab.engines import EngineModel
from quantlab.errors import DataError, MeasurementError
from quantlab.evaluate import guard
from quantlab.fsutil import atomic_write_bytes, ensure_dir
from quantlab.layerwise.model import LayerwiseModel
from quantlab.provenance import library_version

@dataclass(frozen=True)
class FidelitySettings:
    chunk_tokens: int = 256
    max_chunks: int = 16
    batch_size: int = 4
    bootstrap: int = 1000
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FidelitySettings":
        return cls(**data)


def chunk_ids(tokenizer, text: str, settings: FidelitySettings):
    """Non-overlapping windows of ``chunk_tokens`` tokens from the start of the text: (chunks, chunk_tokens)."""
    import torch

    ids = prefix_ids(tokenizer, text, settings.max_chunks * settings.chunk_tokens)
    n = min(settings.max_chunks, ids.numel() // settings.chunk_tokens)
    if n < 1:
        raise DataError(
            f"Reference text has {ids.numel()} tokens, fewer than one window of {settings.chunk_tokens} — "
            "use a longer text or a smaller chunk size"
        )
    return ids[: n * settings.chunk_tokens].reshape(n, settings.chunk_tokens).to(torch.long)


def prefix_ids(tokenizer, text: str, need: int, margin: int = 256):
    """The first ``need`` tokens of ``text`` (all of them if it has fewer), tokenizing only a prefix of it.

    The prefix is cut at a line break, and at least ``margin`` tokens past ``need`` are tokenized, so the
    tokens kept are those of the whole text; tokenizing all of WikiText-2 test would cost ~200 MB for 4096 tokens.
    """
    chars = 8 * (need + margin)
    while True:
        cut = len(text) if chars >= len(text) else (text.rfind("\n", 0, chars) + 1 or chars)
        ids = tokenizer(text[:cut], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        if cut >= len(text) or ids.numel() >= need + margin:
            return ids[:need] if cut < len(text) else ids
        chars *= 2


def _log_probs(model, batch):
    """log p(next token) for every position but the last: (batch, chunk_tokens - 1, vocab), float32. A model run
    layer by layer (``quantlab.layerwise.model.LayerwiseModel``) or by an engine of its own computes them its way."""
    import torch

    if isinstance(model, (EngineModel, LayerwiseModel)):
        return model.log_probs(batch)
    with torch.inference_mode():
        logits = model(batch.to(model.device)).logits[:, :-1, :]
        return torch.log_softmax(logits.float(), dim=-1).cpu()


def baseline_cache(model, ids, folder: Path, settings: FidelitySettings) -> None:
    """Write the baseline log-probs (chunks, chunk_tokens - 1, vocab) as a float32 .npy into ``folder`` (the
    cache entry's temp dir: ``steps.fidelity.ensure_baseline`` renames it into place whole).

    Written with plain file writes, window by window, not through a memory map: a mapped file's dirty pages
    would count as this process's memory and a 151k-vocabulary cache is 2.5 GB. ``model`` is a loaded model
    or a ``LayerwiseModel``'s; either gives the same file. Log-probs that are not finite are refused (raised)
    before the entry is in place: a NaN baseline would make every candidate's KLD NaN.
    """
    import numpy as np

    folder = ensure_dir(folder)
    n, length = ids.shape
    with open(folder / "logprobs.npy", "wb") as fh:
        for start in range(0, n, settings.batch_size):
            lp = _log_probs(model, ids[start:start + settings.batch_size])
            require_finite_logprobs(lp, model, "The fp baseline", "evaluate it in bfloat16 or float32")
            lp = lp.numpy()
            if start == 0:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                          "shape": (n, length - 1, lp.shape[-1])}
                np.lib.format.write_array_header_1_0(fh, header)
            lp.astype(np.float32, copy=False).tofile(fh)
            del lp
    np.save(folder / "ids.npy", ids.numpy())


def require_finite_logprobs(lp, model, who: str, fix16: str) -> None:
    """Raise when the log-probs ``lp`` (batch, positions, vocab) of ``model`` hold a NaN or inf (``guard``)."""
    import torch

    bad = ~torch.isfinite(lp).all(dim=-1)
    if bad.any():
        raise MeasurementError(guard.nonfinite_message(who, int(bad.sum()), bad.numel(), guard.held_dtype(model),
                                                       fix16))


class LogprobFile:
    """The cached baseline log-probs, read window by window with plain reads (no memory map)."""

    def __init__(self, path: Path):
        import numpy as np

        with open(path, "rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            self.shape, _, dtype = read_header(fh)
            self.offset = fh.tell()
        self.path, self.dtype = path, np.dtype(dtype)
        self.window_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        import numpy as np

        start, stop = (index, index + 1) if isinstance(index, int) else (index.start or 0, min(index.stop, len(self)))
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * self.window_bytes)
            out = np.fromfile(fh, dtype=self.dtype, count=(stop - start) * self.shape[1] * self.shape[2])
        out = out.reshape(stop - start, *self.shape[1:])
        return out[0] if isinstance(index, int) else out


def load_baseline(cache_path: Path):
    import numpy as np

    return LogprobFile(cache_path / "logprobs.npy"), np.load(cache_path / "ids.npy")


ROWS = 64  # positions whose KL is computed at once: the temporaries are ROWS x vocab, not a window's


def compare(model, ids, baseline, batch_size: int = 4) -> dict:
    """Per-token KL, top-1 agreement and NLL of both models; arrays of shape (chunks, chunk_tokens - 1).

    The candidate runs ``batch_size`` windows per forward; the comparison then goes one window at a time and
    ``ROWS`` positions at a time, so its temporaries are one window's reference log-probs and a few blocks.
    """
    import torch

    n = ids.shape[0]
    out = {k: [] for k in ("kl", "agree", "nll", "nll_baseline")}
    targets = ids[:, 1:]
    for start in range(0, n, batch_size):
        lq_batch = _log_probs(model, ids[start:start + batch_size])
        for j in range(lq_batch.shape[0]):
            compare_window(lq_batch[j], torch.from_numpy(baseline[start + j]), targets[start + j], out)
        del lq_batch  # the windows' views lived in compare_window, so the batch is freed before the next forward
    return {k: torch.stack(v).double().numpy() for k, v in out.items()}


def compare_window(lq, lp, target, out: dict) -> None:
    """One window's per-token KL, agreement and NLLs appended to ``out``. A function of its own so that no
    view of the candidate's batch (``lq``) or the reference window (``lp``) outlives it: the next batch's
    forward then runs with neither held (one batch of log-probs plus a window, 0.78 GB on a 152k vocabulary)."""
    import torch

    if lp.shape[-1] != lq.shape[-1]:
        raise DataError(f"Vocabulary sizes differ ({lp.shape[-1]} vs {lq.shape[-1]}) — compare models of one tokenizer")
    tgt = target.unsqueeze(-1)
    out["kl"].append(torch.cat([(p.exp() * (p - q)).sum(-1) for p, q in zip(lp.split(ROWS), lq.split(ROWS))])
                     .clamp(min=0))
    out["agree"].append((lp.argmax(-1) == lq.argmax(-1)).float())
    out["nll"].append(-lq.gather(-1, tgt).squeeze(-1))
    out["nll_baseline"].append(-lp.gather(-1, tgt).squeeze(-1))


def compare_baseline_to_itself(ids, baseline) -> dict:
    """The fp run against its own cached log-probs: KL 0 and agreement 1 by definition, no forward pass."""
    import numpy as np

    targets = ids[:, 1:].numpy()
    nll = np.stack([-np.take_along_axis(np.asarray(baseline[i]), targets[i][:, None], axis=-1)[:, 0]
                    for i in range(targets.shape[0])]).astype(np.float64)
    return {"kl": np.zeros_like(nll), "agree": np.ones_like(nll), "nll": nll, "nll_baseline": nll.copy()}


def tokens(per_token: dict, rows=None) -> metrics.Tokens:
    """The per-token values a metric is computed from (``metrics.Tokens``): of the chunks ``rows`` (an index array,
    repeated chunks allowed) flattened, or every chunk's as (chunks, chunk_tokens) when ``rows`` is None."""
    import numpy as np

    pick = (lambda a: a) if rows is None else (lambda a: a[rows].ravel())
    nll, nll_base = pick(per_token["nll"]), pick(per_token["nll_baseline"])
    return metrics.Tokens(kl=pick(per_token["kl"]), agree=pick(per_token["agree"]), nll=nll, nll_baseline=nll_base,
                          dp=np.exp(-nll) - np.exp(-nll_base))


def _stats(per_token: dict, rows, chosen: tuple[metrics.Metric, ...]) -> dict:
    """The metrics ``chosen`` over the chunks ``rows``; the quantiles of one array in one call (``_quantiles``)."""
    import numpy as np

    t = tokens(per_token, rows)
    found = {}
    for of, (names, qs) in _quantiles(chosen).items():
        found.update(zip(names, np.percentile(getattr(t, of), qs)))
    return {m.name: float(found[m.name] if m.name in found else m.compute(t)) for m in chosen}


@functools.lru_cache(maxsize=8)
def _quantiles(chosen: tuple[metrics.Metric, ...]) -> dict[str, tuple[list[str], list[float]]]:
    """The ``metrics.Quantile`` metrics among ``chosen`` by the array they are of: {of: (names, percentiles)}."""
    out: dict[str, tuple[list[str], list[float]]] = {}
    for m in chosen:
        if isinstance(m.compute, metrics.Quantile):
            names, qs = out.setdefault(m.compute.of, ([], []))
            names.append(m.name)
            qs.append(m.compute.q)
    return out


def summarize(per_token: dict, settings: FidelitySettings) -> dict:
    """Every registered metric (``quantlab.metrics``): its point estimate, its chunk-bootstrap 95 % interval
    (percentile method) where it declares one, and a gated metric's per-window values."""
    import numpy as np

    n = per_token["kl"].shape[0]
    point = _stats(per_token, np.arange(n), metrics.metrics())
    drawn = tuple(m for m in metrics.metrics() if m.interval == metrics.BOOTSTRAP)
    rng = np.random.default_rng(settings.seed)
    samples = [_stats(per_token, rng.integers(0, n, size=n), drawn) for _ in range(settings.bootstrap)]
    ci = {m.name: [float(np.percentile([s[m.name] for s in samples], 2.5)),
                   float(np.percentile([s[m.name] for s in samples], 97.5))] for m in drawn}
    windows = tokens(per_token)
    return {**point, "tokens": int(per_token["kl"].size), "chunks": int(n), "ci95": ci,
            **{m.windows.key: [float(x) for x in m.windows.compute(windows)] for m in metrics.gated()},
            "ppl_kind": "token-level", "kld_unit": "nats/token",
            "ci_method": f"bootstrap over {n} text chunks, {settings.bootstrap} resamples, seed {settings.seed}"}


def save_per_token(path: Path, per_token: dict) -> None:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: v.astype("float32") for k, v in per_token.items()})
    atomic_write_bytes(path, buf.getvalue())


def cache_key(model_fingerprint: str, text_sha: str, settings: FidelitySettings, dtype: str, device: str) -> str:
    import hashlib

    payload = {"model": model_fingerprint, "text": text_sha, "chunk_tokens": settings.chunk_tokens,
               "max_chunks": settings.max_chunks, "dtype": dtype, "device": device.split(":")[0],
               "transformers": library_version("transformers"), "torch": library_version("torch")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
