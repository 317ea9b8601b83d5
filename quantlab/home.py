"""QUANTLAB_HOME: the one folder quantlab keeps its caches and store in (default ~/.cache/quantlab).

What lives there, and the module that writes it: ``gguf/`` fetched named models (quantlab.models.named),
``models/`` GGUF files converted to HF directories (quantlab.models.convert), ``sha256-cache.json``
(quantlab.models.fingerprint), ``artifacts/`` (quantlab.artifacts), ``jobs/`` (quantlab.sweep.jobs), ``text/``
(quantlab.evaluate.text), ``lmeval/`` and ``hf_datasets/`` (quantlab.evaluate.harness), ``sensitivity/``
(quantlab.steps.fit), ``overflow/`` (quantlab.steps.overflow), ``locks/`` (quantlab.sweep.publish) and
``quantlab.db`` (quantlab.store). Tests point it at a temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def quantlab_home() -> Path:
    return Path(os.environ.get("QUANTLAB_HOME") or Path.home() / ".cache" / "quantlab").expanduser()
