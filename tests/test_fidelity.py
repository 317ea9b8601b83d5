import numpy as np
import pytest
import torch

from quantlab import metrics
from quantlab.errors import DataError
from quantlab.evaluate import fidelity as fid


def test_kl_against_hand_computed_example(tmp_path):
    """Two tokens, vocab 2: KL, agreement and NLL follow their definitions."""
    p = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])
    q = torch.tensor([[[0.25, 0.75], [0.9, 0.1]]])

    class Fixed(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, ids):
            logits = torch.cat([q.log(), torch.zeros(1, 1, 2)], dim=1)  # (1, 3, 2); last position unused
            return type("Out", (), {"logits": logits})()

    ids = torch.tensor([[0, 1, 0]])
    per_token = fid.compare(Fixed(), ids, p.log().numpy())
    expected_kl0 = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    np.testing.assert_allclose(per_token["kl"][0], [expected_kl0, 0.0], atol=1e-6)
    np.testing.assert_array_equal(per_token["agree"][0], [0.0, 1.0])  # argmax of [.5,.5] is 0, of q is 1
    np.testing.assert_allclose(per_token["nll"][0], [-np.log(0.75), -np.log(0.9)], atol=1e-6)
    np.testing.assert_allclose(per_token["nll_baseline"][0], [-np.log(0.5), -np.log(0.9)], atol=1e-6)


def test_llama_cpp_statistics_against_hand_computed_example():
    """Two windows of two predicted tokens, vocab 4, probabilities in powers of 2 so every statistic is known by hand.

    position  p_fp               p_quant            next  KL        Δp     same top  NLL_fp  NLL_quant
    1         (1/2,1/4,1/8,1/8)  (1/4,1/2,1/8,1/8)  0     ln2/4     -1/4   no        ln2     2 ln2
    2         (1/4,1/4,1/4,1/4)  (1/4,1/4,1/4,1/4)  1     0         0      yes       2 ln2   2 ln2
    3         (1/2,1/4,1/8,1/8)  (1/2,1/8,1/4,1/8)  1     ln2/8     -1/8   yes       2 ln2   3 ln2
    4         (1/8,1/8,1/4,1/2)  (1/8,1/8,1/2,1/4)  2     ln2/4     +1/4   no        2 ln2   ln2
    """
    h, q4, e = 0.5, 0.25, 0.125
    p = torch.tensor([[[h, q4, e, e], [q4, q4, q4, q4]], [[h, q4, e, e], [e, e, q4, h]]])
    q = torch.tensor([[[q4, h, e, e], [q4, q4, q4, q4]], [[h, e, q4, e], [e, e, h, q4]]])

    from quantlab.engines import EngineModel

    class Fixed(EngineModel):  # a model computing its own log-probs, as an engine's (llama.cpp) does
        engine = "fixed"

        def log_probs(self, batch):
            return q.log()[batch[:, 0]]  # each window's first id is its index

    ids = torch.tensor([[0, 0, 1], [1, 1, 2]])
    per_token = fid.compare(Fixed(), ids, p.log().numpy(), batch_size=1)
    ln2 = np.log(2)
    np.testing.assert_allclose(per_token["kl"], [[ln2 / 4, 0], [ln2 / 8, ln2 / 4]], atol=1e-6)
    s = fid.summarize(per_token, fid.FidelitySettings(bootstrap=50))
    kl_sorted, dp_sorted = [0, ln2 / 8, ln2 / 4, ln2 / 4], [-1 / 4, -1 / 8, 0, 1 / 4]

    def pct(values, q):  # linear interpolation between order statistics at rank q/100 * (n - 1)
        rank = q / 100 * (len(values) - 1)
        lo = int(rank)
        return values[lo] + (rank - lo) * (values[min(lo + 1, len(values) - 1)] - values[lo])

    expected = {
        "kld_mean": 5 * ln2 / 32, "kld_median": 3 * ln2 / 16, "kld_p90": ln2 / 4, "kld_p99": ln2 / 4,
        "kld_p999": ln2 / 4, "kld_max": ln2 / 4,
        "dp_mean": -1 / 32, "dp_rms": 3 / 16,  # sqrt((1/16 + 0 + 1/64 + 1/16) / 4)
        "dp_p999": 0.997 / 4, "dp_p99": 0.97 / 4, "dp_p1": -1 / 4 + 0.03 / 8, "dp_p01": -1 / 4 + 0.003 / 8,
        "top1_agreement": 0.5, "ln_ppl_ratio": ln2 / 4,  # (8 ln2 - 7 ln2) / 4
        "ppl": 4.0, "ppl_baseline": 2 ** 1.75,
    }
    assert expected["dp_p999"] == pytest.approx(pct(dp_sorted, 99.9)) and expected["kld_median"] == pytest.approx(pct(kl_sorted, 50))
    for key, value in expected.items():
        assert s[key] == pytest.approx(value, abs=1e-6), key
        lo, hi = s["ci95"][key]
        assert lo <= hi, key
    assert set(expected) <= set(metrics.definitions())


def test_identical_model_has_zero_kl_and_full_agreement(tiny_model, tiny_dir, tiny_text, tmp_path):
    from quantlab.models.load import load_tokenizer

    settings = fid.FidelitySettings(chunk_tokens=32, max_chunks=6, bootstrap=200)
    ids = fid.chunk_ids(load_tokenizer(tiny_dir), tiny_text.read_text(), settings)
    assert ids.shape == (6, 32)
    fid.baseline_cache(tiny_model, ids, tmp_path / "cache", settings)
    logprobs, cached_ids = fid.load_baseline(tmp_path / "cache")
    np.testing.assert_array_equal(cached_ids, ids.numpy())
    per_token = fid.compare(tiny_model, ids, logprobs)
    summary = fid.summarize(per_token, settings)
    assert summary["kld_mean"] == pytest.approx(0.0, abs=1e-6)
    assert summary["top1_agreement"] == 1.0
    assert summary["ppl"] == pytest.approx(summary["ppl_baseline"])
    assert summary["tokens"] == 6 * 31 and summary["ppl_kind"] == "token-level"
    shortcut = fid.compare_baseline_to_itself(ids, logprobs)
    for key in per_token:
        np.testing.assert_allclose(shortcut[key], per_token[key], atol=1e-5)


def test_a_batch_of_log_probs_is_freed_before_the_next_forward(tiny_model, tiny_dir, tiny_text, tmp_path):
    """compare() holds one batch of candidate log-probs at a time: no view of it outlives its windows."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from quantlab.models.load import load_tokenizer

    settings = fid.FidelitySettings(chunk_tokens=32, max_chunks=6, bootstrap=200)
    ids = fid.chunk_ids(load_tokenizer(tiny_dir), tiny_text.read_text(), settings)
    fid.baseline_cache(tiny_model, ids, tmp_path / "cache", settings)
    logprobs, _ = fid.load_baseline(tmp_path / "cache")

    from quantlab.engines import EngineModel

    class Watched(EngineModel):  # a model computing its own log-probs, as an engine's does, noting what is alive
        engine = "watched"

        def __init__(self):
            self.batches, self.alive_at_forward = [], []

        def log_probs(self, batch):
            self.alive_at_forward.append(sum(not ref.expired() for ref in self.batches))
            out = fid._log_probs(tiny_model, batch)
            self.batches.append(StorageWeakRef(out.untyped_storage()))  # a view keeps the storage, not the tensor
            return out

    watched = Watched()
    per_token = fid.compare(watched, ids, logprobs, batch_size=2)
    assert watched.alive_at_forward == [0, 0, 0]  # 6 windows, 2 per forward
    np.testing.assert_allclose(per_token["kl"], 0.0, atol=1e-6)


def test_perturbed_model_has_positive_kl_inside_its_interval(tiny_dir, tiny_text, tmp_path):
    from transformers import AutoModelForCausalLM

    from quantlab.models.load import load_tokenizer

    settings = fid.FidelitySettings(chunk_tokens=32, max_chunks=8, bootstrap=300)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    noisy = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in noisy.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = fid.chunk_ids(load_tokenizer(tiny_dir), tiny_text.read_text(), settings)
    fid.baseline_cache(base, ids, tmp_path / "c", settings)
    per_token = fid.compare(noisy, ids, fid.load_baseline(tmp_path / "c")[0])
    s = fid.summarize(per_token, settings)
    assert s["kld_mean"] > 1e-4
    assert (per_token["kl"] >= 0).all()
    for key in ("kld_mean", "top1_agreement", "ppl"):
        lo, hi = s["ci95"][key]
        assert lo <= s[key] <= hi and lo < hi
    assert s["kld_p99"] >= s["kld_mean"]


def test_text_shorter_than_one_window_is_an_error(tiny_dir):
    from quantlab.models.load import load_tokenizer

    with pytest.raises(DataError, match="fewer than one window"):
        fid.chunk_ids(load_tokenizer(tiny_dir), "the of and", fid.FidelitySettings(chunk_tokens=64))


def test_per_token_values_round_trip(tmp_path):
    per_token = {k: np.random.default_rng(0).random((3, 5)) for k in ("kl", "agree", "nll", "nll_baseline")}
    fid.save_per_token(tmp_path / "p.npz", per_token)
    loaded = np.load(tmp_path / "p.npz")
    np.testing.assert_allclose(loaded["kl"], per_token["kl"], rtol=1e-6)
