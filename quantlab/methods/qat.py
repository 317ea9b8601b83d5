"""Quantization-aware training with distillation from the full-precision teacher (torchao QAT).

``quantize_(student, QATConfig(base, step="prepare"))`` swaps each quantized linear for a fake-quantized
one; the student is trained to match the fp teacher's next-token distribution (KL(teacher ‖ student)
over the full vocabulary, optionally plus next-token cross-entropy); then ``QATConfig(step="convert")``
without a base config puts the trained weights back into plain ``nn.Linear`` and the scheme's torchao
PTQ config (``quantlab.methods.torchao_ptq``, the recipe's PTQ twin) quantizes them on save. Saving the
converted torchao model directly fails in torchao 0.18; this route reproduces the fake-quant numerics.

Training text is ``c4_calibration`` from the data dir by default (web text, not the evaluation text);
``self`` is text the teacher writes from quantlab's prompts (data-free, as in LLM-QAT), generated once
and cached; any data-dir dataset or a file also works. Teacher logits are
recomputed each step (one no-grad forward) rather than cached: full-vocabulary logits for a run's
tokens would take gigabytes. The tied/output embedding stays unquantized and frozen.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from quantlab.device import CPU
from quantlab.errors import DataError, RecipeError
from quantlab.evaluate.text import resolve_text, self_text
from quantlab.fsutil import scratch_dir
from quantlab.conv1d import conv1d_to_linear, linear_to_conv1d
from quantlab.layouts.intx import IntxLayout
from quantlab.methods.base import Method, check_group_size
from quantlab.layouts.loading import load_recipe_model
from quantlab.methods.torchao_ptq import base_config, check_scheme, save_quantized, scheme_name
from quantlab.models.load import load_tokenizer
from quantlab.models.source import resolve_model
from quantlab.recipe import parse_recipe

QAT_TEXT_SEED = 4321  # self-generated training text: a different seed from the evaluation `self` text


@dataclass(frozen=True)
class QatConfig:
    scheme: str = "w4"
    group_size: int = 32
    steps: int = 130  # ~8 CPU-s a step on one thread for SmolLM2: under 20 CPU-minutes
    batch: int = 4
    seq_len: int = 128
    lr: float = 1e-4  # best of 2e-5, 1e-4, 3e-4 (self text) and 2e-4 (c4) in SmolLM2 pilots
    ce_weight: float = 0.0
    train_text: str = "c4_calibration"  # recovered more wikitext KLD/ppl than self text (reports/bench/qat.txt)
    self_rounds: int = 6
    heldout_windows: int = 8
    curve_points: int = 5
    seed: int = 0

    def __post_init__(self):
        check_scheme(self.scheme, self.group_size, "qat")
        if self.steps < 1:
            raise RecipeError(f"qat steps must be ≥ 1 (got {self.steps}) — e.g. steps: 100")
        if self.batch < 1 or self.seq_len < 8:
            raise RecipeError("qat needs batch ≥ 1 and seq_len ≥ 8 — e.g. batch: 4, seq_len: 128")
        if not 0 < self.lr < 1:
            raise RecipeError(f"qat lr must be in (0, 1) (got {self.lr})")
        if self.ce_weight < 0:
            raise RecipeError(f"qat ce_weight must be ≥ 0 (got {self.ce_weight})")
        if self.self_rounds < 1 or self.heldout_windows < 1 or self.curve_points < 1:
            raise RecipeError("qat self_rounds, heldout_windows and curve_points must be ≥ 1")

    @property
    def bits(self) -> int:
        return 4


class QatMethod(Method):
    name = "qat"
    config_cls = QatConfig
    short_pattern = re.compile(r"qat-(w4|a8w4)(?:-g(\d+))?")
    example_names = ("qat-w4-g32", "qat-a8w4-g32")
    libraries = ("torchao",)

    def config_from_match(self, match):
        return QatConfig(scheme=match.group(1), group_size=int(match.group(2)) if match.group(2) else -1)

    def short_name(self, config):
        return scheme_name("qat", config.scheme, config.group_size)

    def check_model(self, config, linear_shapes):
        check_group_size(config.group_size, linear_shapes)

    def quantize_peak(self, config, sizes, device):
        """Distillation holds the fp teacher, the fake-quantized student, its gradients and Adam's two moments
        (each the fp model's size), the teacher's and student's logits (batch x seq_len x vocab, fp32, with
        their log-softmax and gradient) and the students' activations kept for the backward pass."""
        shapes, fp = sizes["shapes"], sizes["fp_weights"]
        logits = config.batch * config.seq_len * shapes.vocab * 4
        per_token = shapes.layers * (4 * shapes.hidden + 3 * shapes.intermediate) * 4
        return {"teacher": fp, "student": fp, "gradients": fp, "optimizer state (Adam)": 2 * fp,
                "logits": 4 * logits, "activations for backward": config.batch * config.seq_len * per_token}

    def layout(self, config):
        return IntxLayout(4, config.group_size)

    def ptq_twin(self, config):
        return scheme_name("torchao", config.scheme, config.group_size)

    def cache_inputs(self, config, source_dir, *, data_dir=None, trust_remote_code=False):
        if config.train_text == "self":
            return {"train_text": "self", "seed": QAT_TEXT_SEED}  # a function of the model, already in the key
        return {"train_text_sha256": _train_text(config, Path(source_dir), CPU, data_dir, trust_remote_code).sha256}

    def quantize(self, config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                 trust_remote_code=False) -> dict:
        text = _train_text(config, Path(source_dir), device, data_dir, trust_remote_code)
        ids = load_tokenizer(source_dir, trust_remote_code)(text.read(), add_special_tokens=False)["input_ids"]
        train, heldout = split_windows(ids, config)
        student, notes = train_student(Path(source_dir), train, heldout, config, device, trust_remote_code)
        notes["train_text"] = {"source": text.name, "origin": text.origin, "sha256": text.sha256,
                               "tokens": len(ids), "train_windows": len(train), "heldout_windows": len(heldout)}
        with scratch_dir("quantlab-qat-") as scratch:
            student.save_pretrained(scratch)  # trained fp weights in plain nn.Linear
            del student
            notes.update(save_quantized(Path(scratch), Path(source_dir), out_dir, config.scheme, config.group_size,
                                        trust_remote_code))
        notes.update({"library": "torchao", "scheme": config.scheme,
                      "layout": "IntxUnpackedToInt8Tensor (one int4 value per int8 byte on CPU)"})
        return notes


def _train_text(config, source_dir: Path, device: str, data_dir: str | None, trust_remote_code: bool):
    """The training text: ``self`` (the teacher writes it), a data-dir dataset read from ``data_dir``, or a file."""
    if config.train_text == "self":
        return self_text(resolve_model(str(source_dir), trust_remote_code), device, max_new_tokens=256,
                         rounds=config.self_rounds, seed=QAT_TEXT_SEED, name="self-train")
    try:
        return resolve_text(config.train_text, data_dir)
    except DataError as exc:
        raise DataError(f"QAT training text: {exc}") from None


def split_windows(ids: list[int], config) -> tuple[list[list[int]], list[list[int]]]:
    """Non-overlapping windows of ``seq_len`` tokens: the last ``heldout_windows`` are held out."""
    n = len(ids) // config.seq_len
    if n < config.heldout_windows + config.batch:
        raise DataError(
            f"QAT training text has {len(ids)} tokens: {n} windows of {config.seq_len}, fewer than one batch "
            f"({config.batch}) plus {config.heldout_windows} held out — give more text or lower batch/seq_len"
        )
    windows = [ids[i * config.seq_len:(i + 1) * config.seq_len] for i in range(n)]
    return windows[:n - config.heldout_windows], windows[n - config.heldout_windows:]


def quantized_linear_filter(model):
    """torchao filter_fn: every nn.Linear except the output embedding (kept in full precision)."""
    import torch

    output = model.get_output_embeddings()
    return lambda module, fqn: isinstance(module, torch.nn.Linear) and module is not output


def prepare(model, config):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(base_config(config.scheme, config.group_size), step="prepare"),
              filter_fn=quantized_linear_filter(model))
    return model


def convert(model):
    """Fake-quantized linears back to plain nn.Linear holding the trained weights."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, _: isinstance(m, FakeQuantizedLinear))
    return model


def distill_loss(student_logits, teacher_logits, input_ids, ce_weight: float):
    """Mean per-token KL(teacher ‖ student) over the full vocabulary, plus ce_weight × next-token CE."""
    import torch.nn.functional as F

    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    if not ce_weight:
        return kl, kl
    ce = F.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1]), input_ids[:, 1:].reshape(-1))
    return kl + ce_weight * ce, kl


def heldout_metrics(model, heldout_ids, teacher_logp) -> dict:
    """KLD(teacher ‖ model) and both token-level perplexities on the held-out windows."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        s = F.log_softmax(model(heldout_ids).logits.float(), dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - s)).sum(-1).mean().item()
    target = heldout_ids[:, 1:].unsqueeze(-1)
    nll = -s[:, :-1].gather(-1, target).mean().item()
    nll_t = -teacher_logp[:, :-1].gather(-1, target).mean().item()
    return {"kld": kl, "ppl": math.exp(nll), "ppl_teacher": math.exp(nll_t)}


def train_student(source_dir: Path, train: list[list[int]], heldout: list[list[int]], config, device: str,
                  trust_remote_code: bool = False):
    """Prepare, distil and convert; returns the student (plain linears, trained weights) and notes."""
    import torch
    import torch.nn.functional as F

    teacher, student, conv1d = _teacher_and_student(source_dir, config, device, trust_remote_code)
    held = torch.tensor(heldout, device=teacher.device)
    with torch.no_grad():
        teacher_held = F.log_softmax(teacher(held).logits.float(), dim=-1)
    student.eval()  # no dropout; gradients flow regardless
    losses, curve, timing = _distil(teacher, student, train, config, lambda: heldout_metrics(student, held, teacher_held))
    del teacher
    student = convert(student)
    linear_to_conv1d(student, conv1d)  # saved as the model's own class, quantized again on save like any model
    notes = {
        "training": {
            "steps": config.steps, "batch": config.batch, "seq_len": config.seq_len, "lr": config.lr,
            "schedule": "AdamW, cosine decay to 0, no warm-up", "ce_weight": config.ce_weight,
            "loss": "mean per-token KL(teacher || student), full vocabulary" + (
                f" + {config.ce_weight} x next-token CE" if config.ce_weight else ""),
            "trainable": "all parameters except the input and output embeddings",
            "tokens_seen": config.steps * config.batch * config.seq_len, **timing,
            "threads": torch.get_num_threads(), "seed": config.seed,
        },
        "loss_curve": losses,
        "heldout_curve": _with_recovered(curve),
        "heldout_definition": (f"{len(heldout)} held-out windows of the training text: KLD(teacher || student) "
                               "mean per token, token-level perplexities; step 0 is the PTQ twin (fake-quant "
                               "before training); recovered = (PTQ - now) / (PTQ - teacher)"),
    }
    return student, notes


def _teacher_and_student(source_dir: Path, config, device: str, trust_remote_code: bool):
    """The frozen fp teacher, the prepared (fake-quantized) student with frozen embeddings, and the names of the
    student's Conv1D layers, turned into ``nn.Linear`` (torchao fake-quantizes ``nn.Linear`` only)."""
    fp = parse_recipe("fp")
    teacher = load_recipe_model(source_dir, fp, device, trust_remote_code)
    teacher.requires_grad_(False)
    student = load_recipe_model(source_dir, fp, device, trust_remote_code)
    conv1d = conv1d_to_linear(student)
    student = prepare(student, config)
    student.get_input_embeddings().requires_grad_(False)
    student.get_output_embeddings().requires_grad_(False)
    return teacher, student, conv1d


def _distil(teacher, student, train: list[list[int]], config, evaluate) -> tuple[list, list, dict]:
    """AdamW with cosine decay on KL(teacher || student); ``evaluate()`` gives held-out metrics at the
    curve's checkpoints. Returns the loss curve, the held-out curve and the training time."""
    import resource

    import torch

    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps)))
    checkpoints = sorted({round(config.steps * k / config.curve_points) for k in range(1, config.curve_points + 1)})
    curve = [{"step": 0, "train_s": 0.0, "train_cpu_s": 0.0, "tokens_seen": 0, **evaluate()}]
    losses, teacher_s = [], 0.0
    gen = torch.Generator().manual_seed(config.seed)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for step in range(1, config.steps + 1):
        pick = torch.randint(len(train), (config.batch,), generator=gen)
        ids = torch.tensor([train[i] for i in pick], device=teacher.device)
        tt = time.perf_counter()
        with torch.no_grad():
            teacher_logits = teacher(ids).logits
        teacher_s += time.perf_counter() - tt
        loss, kl = distill_loss(student(ids).logits, teacher_logits, ids, config.ce_weight)
        if not torch.isfinite(loss):
            raise RuntimeError(f"QAT loss became {loss.item()} at step {step} — lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append({"step": step, "loss": loss.item(), "kl": kl.item(), "lr": sched.get_last_lr()[0]})
        if step in checkpoints:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            curve.append({"step": step, "train_s": time.perf_counter() - t0,
                          "train_cpu_s": (usage.ru_utime - usage0.ru_utime) + (usage.ru_stime - usage0.ru_stime),
                          "tokens_seen": step * config.batch * config.seq_len, **evaluate()})
    return losses, curve, {"train_wall_s": time.perf_counter() - t0, "teacher_forward_s": teacher_s}


def _with_recovered(curve: list[dict]) -> list[dict]:
    """Each point's recovered fraction of the step-0 (= PTQ) degradation, torchao's definition."""
    ptq = curve[0]
    for point in curve:
        point["recovered_kld"] = (ptq["kld"] - point["kld"]) / ptq["kld"] if ptq["kld"] > 0 else None
        rise = ptq["ppl"] - ptq["ppl_teacher"]
        point["recovered_ppl"] = (ptq["ppl"] - point["ppl"]) / rise if rise > 0 else None
    return curve
