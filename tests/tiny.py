"""Tiny random-init models and tokenizers built in code, so tests run in seconds without the hub."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the of and to in is was for on that with as by at from his an were are which this be has "
         "or had not first one their its new after but who they have two been her she also year into "
         "more other all time over some up only city when can most many would later these there between "
         "both under new world during season film game part three while made").split()


#: (out, in) of the quantized linears of ``build_llama_dir``'s default model: in-features 64 and 128.
TINY_SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
               "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
               "mlp.down_proj": (64, 128)}


def build_tokenizer():
    """A word-level tokenizer over a fixed vocabulary, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS + [",", ".", "=", "@-@", "(", ")"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def build_llama_dir(path: Path, hidden: int = 64, intermediate: int = 128, layers: int = 2, seed: int = 0,
                    init_std: float = 0.02, tied: bool = True) -> Path:
    """Save a random-init Llama (hidden and intermediate divisible by 32 and 64) plus its tokenizer; ``tied``
    False gives it an output head of its own.

    A larger ``init_std`` gives peaked next-token distributions, so 4-bit quantization visibly hurts.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                         max_position_embeddings=512, tie_word_embeddings=tied, initializer_range=init_std,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_text(path: Path, words: int = 6000, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(words)) + "\n")
    return path


def build_qwen2_dir(path: Path, hidden: int = 64, intermediate: int = 128, layers: int = 3, seed: int = 0,
                    max_shard_size: str | None = None) -> Path:
    """A random-init Qwen2 (untied head, qkv biases: the second real model's architecture) plus its tokenizer;
    ``max_shard_size`` saves it in several safetensors shards."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                         max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.05,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = Qwen2ForCausalLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok.save_pretrained(path)
    return path


def with_own_code(tiny_dir: Path, path: Path, model_type: str, configuration: str, modeling: str,
                  config_class: str, model_class: str) -> Path:
    """The tiny Llama's weights and tokenizer under a config whose model type only its own code knows
    (``auto_map``: configuration_<x>.py and modeling_<x>.py beside the weights, run only with trust_remote_code)."""
    import json
    import shutil

    stem = model_type.rsplit("-", 2)[-2]  # quantlab-remote-llama -> remote
    shutil.copytree(tiny_dir, path)
    (path / f"configuration_{stem}.py").write_text(configuration)
    (path / f"modeling_{stem}.py").write_text(modeling)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=model_type, architectures=[model_class],
                  auto_map={"AutoConfig": f"configuration_{stem}.{config_class}",
                            "AutoModelForCausalLM": f"modeling_{stem}.{model_class}"})
    (path / "config.json").write_text(json.dumps(config))
    return path

