"""quantlab: which 8-bit or 4-bit version of a causal LM keeps its quality, and what it costs."""

__version__ = "0.1.0"
