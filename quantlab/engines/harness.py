"""lm-eval on an engine of its own: an lm-eval ``TemplateLM`` whose scores come from the engine's log-probs.

lm-eval's own llama.cpp backend (``gguf``) talks to a llama.cpp server over HTTP and reads the top log-probs it
returns; here the same GGUF is scored in process, on every position, from ``LlamaCppModel.log_probs``, with the fp
model's tokenizer encoding the text the way lm-eval's HFLM does (no special tokens added, context and continuation
encoded whole then split). So a GGUF recipe's suite accuracy is llama.cpp's, on the very requests HFLM scores.
"""

from __future__ import annotations


def engine_lm(model, tokenizer, max_length: int | None = None):
    """An lm-eval LM over ``model`` (an engine's loaded model with ``log_probs`` and ``greedy``)."""
    import torch
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class EngineLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.tokenizer = tokenizer
            self.max_length = max_length or 2048

        @property
        def eot_token_id(self) -> int:
            return tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:  # HFLM's: the BOS token where the tokenizer has one
            return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            out = []
            for _, context, continuation in requests:
                whole = (context + continuation)[-(self.max_length + 1):]
                lp = model.log_probs(torch.tensor([whole]))[0]  # (len - 1, vocab): position i predicts whole[i + 1]
                rows = lp[-len(continuation):]
                target = torch.tensor(continuation)
                out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(1) == target).all())))
                self.cache_hook.add_partial("loglikelihood", None, out[-1])
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for (string,) in (r.args for r in requests):
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                totals.append(sum(ll for ll, _ in self._loglikelihood_tokens([(None, *w) for w in windows])))
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            texts = []
            for context, options in (r.args for r in requests):
                until = [u for u in (options.get("until") or []) if u]
                tokens = model.greedy(self.tok_encode(context)[-self.max_length:], options.get("max_gen_toks", 256))
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                cut = min((text.find(u) for u in until if u in text), default=len(text))
                texts.append(text[:cut])
            return texts

    return EngineLM()
