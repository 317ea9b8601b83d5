"""Running GPTQModel: imported quietly with its CPU worker pool sized for this machine, then a quantize in its
offload mode with scratch files kept out of the user's directories. GPTQ and RTN's GPTQ format both use it."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from quantlab.device import as_device
from quantlab.fsutil import atomic_write_text, scratch_dir


def import_gptqmodel():
    """Import GPTQModel with its CPU worker pool sized for this machine and its logging quietened."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a ten-line banner on import
        import gptqmodel
    _quiet_gptqmodel()
    return gptqmodel


def run_gptqmodel(config_cls, settings: dict, source_dir: Path, out_dir: Path, device: str,
                  windows: list[list[int]] | None, trust_remote_code: bool = False, *, dtype=None,
                  backend=None) -> None:
    """Quantize ``source_dir`` with ``config_cls(**settings)`` and save the GPTQ directory to ``out_dir``.

    GPTQModel's offload mode keeps memory near one model's size: it reads source weights layer by layer
    from the checkpoint and parks finished layers on disk (reports/bench/gptq.txt gives the peak). Its
    scratch files and logs go to a temp dir that is removed, and the
    path it records in the saved config is dropped. ``windows`` (calibration token ids) is None for weight-only
    configs (RTN). ``dtype``
    (default: the device's) is the dtype the source loads in; ``backend`` (a GPTQModel ``BACKEND``, default its
    own choice) the kernel its quantize packs with: AWQ needs fp16 or bf16 and, on CPU, ``BACKEND.AWQ_TORCH``.
    """
    from gptqmodel import GPTQModel

    dtype = dtype or as_device(device).default_dtype
    extra = {} if backend is None else {"backend": backend}
    with scratch_dir("quantlab-gptq-") as scratch:
        offload = str(Path(scratch) / "offload")
        qconfig = config_cls(**settings, offload_to_disk=True, offload_to_disk_path=offload)
        model = GPTQModel.load(str(source_dir), qconfig, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        restore_sequential_offload(model)
        # GPTQModel writes per-layer logs into ./logs of the working directory: keep them out of the user's.
        with contextlib.chdir(scratch):
            if windows is None:
                model.quantize(None)
            else:
                calib = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
                model.quantize(calib, batch_size=8 if as_device(device).is_cpu else 16, calibration_sort=None,
                               **extra)
            release_stop_forward()
            model.save(str(out_dir))
        del model
    (Path(out_dir) / "quant_log.csv").unlink(missing_ok=True)
    for name in ("config.json", "quantize_config.json"):
        _drop_path(Path(out_dir) / name, offload)


def restore_sequential_offload(model) -> None:
    """Let GPTQModel 7.6 move back a disk-offloaded module that carries two accelerate hooks.

    Its ``post_quantize`` moves a module with ``move_to``, which restores a module whose weights are parked on disk
    (meta tensors) only when accelerate's ``has_offloaded_params`` sees its offload hook, and that looks for one
    ``AlignDevicesHook``. A module that got a second hook carries a ``SequentialHook`` instead and is refused
    ("Cannot move a module that still contains meta tensors without offload hooks"): with ``lm_head=True`` that is
    the final norm, which the head's calibration inputs go through (its hooks: one aligning, one offloading). Such
    a module is restored the way ``move_to`` restores an offloaded one (``undo_offload_to_disk``); every other
    module goes through GPTQModel's own ``post_quantize``."""
    from gptqmodel.utils.model import _module_has_meta_tensors
    from gptqmodel.utils.offload import undo_offload_to_disk
    from gptqmodel.utils.torch import CPU

    post_quantize = model.post_quantize

    def post_quantize_restoring(module):
        hooks = getattr(getattr(module, "_hf_hook", None), "hooks", None)
        if hooks and any(getattr(h, "offload", False) for h in hooks) and _module_has_meta_tensors(module):
            return undo_offload_to_disk(module, device=CPU)
        return post_quantize(module)

    model.post_quantize = post_quantize_restoring


def release_stop_forward() -> None:
    """Drop the traceback GPTQModel 7.6's shared stop-forward exception keeps after a quantize.

    Its hooked linears end each calibration forward by raising one module-level ``StopForward`` instance, and the
    looper catches it without clearing it, so the traceback of the last raise stays alive, and with it that forward's
    frames: the last layer's input cache and one batch's hidden states and MLP activations (0.16 GB at 32 windows
    of 256 tokens on qwen2.5-coder-1.5b), held through the save."""
    try:
        from gptqmodel.nn_modules import hooked_linear
    except ImportError:
        return
    stop = getattr(hooked_linear, "STOP_FORWARD_EXCEPTION", None)
    if isinstance(stop, BaseException):
        stop.__traceback__ = None


def _drop_path(path: Path, prefix: str) -> None:
    """Rewrite a saved JSON file with every string under ``prefix`` (a deleted scratch dir) set to null."""
    import json

    if not path.exists():
        return

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return None if isinstance(value, str) and value.startswith(prefix) else value

    data = json.loads(path.read_text())
    cleaned = clean(data)
    if cleaned != data:
        atomic_write_text(path, json.dumps(cleaned, indent=2, sort_keys=True) + "\n")


def _quiet_gptqmodel() -> None:
    import logging

    try:
        from logbar import LogBar

        LogBar.shared().setLevel(logging.WARNING)
    except ImportError:
        pass

