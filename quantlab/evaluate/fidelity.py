"""Fidelity of a quantized model against its fp baseline on one reference text.

Definitions (per predicted token t of the reference text, chunked into fixed windows):
- KL(fp || quant) = sum_v p_fp(v|ctx) * (log p_fp(v|ctx) - log p_q(v|ctx)), over the full vocabulary, in nats.
- top-1 agreement: argmax_v p_q == argmax_v p_fp.
- token-level perplexity: exp(mean negative log-likelihood of the actual next token), per model.
Each summary carries a bootstrap 95 % interval that resamples text chunks (not tokens), since tokens
within a chunk are correlated. Baseline log-probabilities are computed once per (model, text, window)
and cached as a float32 memmap; per-token values are kept for later paired tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from quantlab.errors import DataError
from quantlab.fsutil import atomic_dir
from quantlab.provenance import library_version

DEFINITIONS = {
    "kld_mean": "mean over predicted tokens of KL(fp || quant) over the full vocabulary, nats/token",
    "kld_p99": "99th percentile of per-token KL(fp || quant), nats",
    "top1_agreement": "fraction of tokens where quant's argmax equals fp's argmax",
    "ppl": "token-level perplexity exp(mean NLL) of the quantized model on the reference text",
    "ppl_baseline": "token-level perplexity of the fp baseline on the same tokens",
    "ci95": "bootstrap 95% interval resampling text chunks",
}


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

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = min(settings.max_chunks, ids.numel() // settings.chunk_tokens)
    if n < 1:
        raise DataError(
            f"Reference text has {ids.numel()} tokens, fewer than one window of {settings.chunk_tokens} — "
            "use a longer text or a smaller chunk size"
        )
    return ids[: n * settings.chunk_tokens].reshape(n, settings.chunk_tokens).to(torch.long)


def _log_probs(model, batch):
    """log p(next token) for every position but the last: (batch, chunk_tokens - 1, vocab), float32."""
    import torch

    with torch.inference_mode():
        logits = model(batch.to(model.device)).logits[:, :-1, :]
        return torch.log_softmax(logits.float(), dim=-1).cpu()


def baseline_cache(model, ids, cache_path: Path, settings: FidelitySettings):
    """Write the baseline log-probs memmap (chunks, chunk_tokens - 1, vocab) atomically."""
    import numpy as np

    n, length = ids.shape
    with atomic_dir(cache_path) as tmp:
        vocab = None
        arr = None
        for start in range(0, n, settings.batch_size):
            lp = _log_probs(model, ids[start:start + settings.batch_size])
            if arr is None:
                vocab = lp.shape[-1]
                arr = np.lib.format.open_memmap(tmp / "logprobs.npy", mode="w+", dtype=np.float32,
                                                shape=(n, length - 1, vocab))
            arr[start:start + lp.shape[0]] = lp.numpy()
        arr.flush()
        del arr
        np.save(tmp / "ids.npy", ids.numpy())


def load_baseline(cache_path: Path):
    import numpy as np

    return np.load(cache_path / "logprobs.npy", mmap_mode="r"), np.load(cache_path / "ids.npy")


def _readonly_tensor(array):
    """A tensor view of a read-only memmap slice, without copying it; it is only ever read."""
    import warnings

    import numpy as np
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(np.asarray(array))


def compare(model, ids, baseline) -> dict:
    """Per-token KL, top-1 agreement and NLL of both models; arrays of shape (chunks, chunk_tokens - 1)."""
    import torch

    n = ids.shape[0]
    out = {k: [] for k in ("kl", "agree", "nll", "nll_baseline")}
    targets = ids[:, 1:]
    step = 4
    for start in range(0, n, step):
        lq = _log_probs(model, ids[start:start + step])
        lp = _readonly_tensor(baseline[start:start + lq.shape[0]])
        if lp.shape[-1] != lq.shape[-1]:
            raise DataError(f"Vocabulary sizes differ ({lp.shape[-1]} vs {lq.shape[-1]}) — compare models of one tokenizer")
        tgt = targets[start:start + lq.shape[0]].unsqueeze(-1)
        out["kl"].append((lp.exp() * (lp - lq)).sum(-1).clamp(min=0))
        out["agree"].append((lp.argmax(-1) == lq.argmax(-1)).float())
        out["nll"].append(-lq.gather(-1, tgt).squeeze(-1))
        out["nll_baseline"].append(-lp.gather(-1, tgt).squeeze(-1))
    return {k: torch.cat(v).double().numpy() for k, v in out.items()}


def compare_baseline_to_itself(ids, baseline) -> dict:
    """The fp run against its own cached log-probs: KL 0 and agreement 1 by definition, no forward pass."""
    import numpy as np

    targets = ids[:, 1:].numpy()
    nll = np.stack([-np.take_along_axis(np.asarray(baseline[i]), targets[i][:, None], axis=-1)[:, 0]
                    for i in range(targets.shape[0])]).astype(np.float64)
    return {"kl": np.zeros_like(nll), "agree": np.ones_like(nll), "nll": nll, "nll_baseline": nll.copy()}


def _stats(per_token: dict, rows) -> dict:
    import numpy as np

    kl = per_token["kl"][rows]
    return {
        "kld_mean": float(kl.mean()),
        "kld_p99": float(np.percentile(kl, 99)),
        "top1_agreement": float(per_token["agree"][rows].mean()),
        "ppl": float(np.exp(per_token["nll"][rows].mean())),
        "ppl_baseline": float(np.exp(per_token["nll_baseline"][rows].mean())),
    }


def summarize(per_token: dict, settings: FidelitySettings) -> dict:
    """Point estimates plus chunk-bootstrap 95 % intervals (percentile method)."""
    import numpy as np

    n = per_token["kl"].shape[0]
    point = _stats(per_token, np.arange(n))
    rng = np.random.default_rng(settings.seed)
    samples = [_stats(per_token, rng.integers(0, n, size=n)) for _ in range(settings.bootstrap)]
    ci = {k: [float(np.percentile([s[k] for s in samples], 2.5)), float(np.percentile([s[k] for s in samples], 97.5))]
          for k in point}
    return {**point, "tokens": int(per_token["kl"].size), "chunks": int(n), "ci95": ci,
            "ppl_kind": "token-level", "kld_unit": "nats/token",
            "ci_method": f"bootstrap over {n} text chunks, {settings.bootstrap} resamples, seed {settings.seed}"}


def save_per_token(path: Path, per_token: dict) -> None:
    import io

    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: v.astype("float32") for k, v in per_token.items()})
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def cache_key(model_fingerprint: str, text_sha: str, settings: FidelitySettings, dtype: str, device: str) -> str:
    import hashlib

    payload = {"model": model_fingerprint, "text": text_sha, "chunk_tokens": settings.chunk_tokens,
               "max_chunks": settings.max_chunks, "dtype": dtype, "device": device.split(":")[0],
               "transformers": library_version("transformers"), "torch": library_version("torch")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
