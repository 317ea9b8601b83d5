"""lm-eval built-in tasks that quantlab can run from local files: one small entry per task.

An entry names the built-in task YAML (relative to ``lm_eval/tasks``), the split lm-eval evaluates, the local
files under the data dir and the converter that turns them into the hub dataset's schema. quantlab writes one
override YAML per task that ``include:``s the built-in YAML and replaces only the dataset source, so lm-eval's
prompt, target and metric definitions are used unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.evaluate.tasks import convert


@dataclass(frozen=True)
class LocalTask:
    name: str  # lm-eval's task name
    builtin: str  # the built-in YAML, relative to lm_eval/tasks
    split: str  # the split lm-eval evaluates ("test" or "validation")
    files: tuple[str, ...]  # local files, relative to the data dir
    converter: str  # function name in quantlab.evaluate.tasks.convert
    items: int  # documents in the full local set
    note: str = ""  # how the local data differs from the hub version, if it does

    def convert(self, paths):
        return getattr(convert, self.converter)(paths)


TASKS = {t.name: t for t in (
    LocalTask("hellaswag", "hellaswag/hellaswag.yaml", "validation", ("hellaswag/hellaswag_val_full.txt",),
              "hellaswag", 10042, convert.HELLASWAG_NOTE),
    LocalTask("arc_easy", "arc/arc_easy.yaml", "test", ("arc_easy/ARC-Easy-Test.jsonl",), "arc", 2376),
    LocalTask("arc_challenge", "arc/arc_challenge.yaml", "test", ("arc_challenge/ARC-Challenge-Test.jsonl",),
              "arc", 1172),
    LocalTask("piqa", "piqa/piqa.yaml", "validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "piqa", 1838),
    LocalTask("lambada_openai", "lambada/lambada_openai.yaml", "test", ("lambada_openai/lambada_test.jsonl",),
              "passthrough", 5153),
    LocalTask("wikitext", "wikitext/wikitext.yaml", "test", ("wikitext2_raw/wiki.test.raw",), "wikitext", 62),
    LocalTask("boolq", "super_glue/boolq/default.yaml", "validation", ("boolq/val.jsonl",), "boolq", 3270),
    LocalTask("openbookqa", "openbookqa/openbookqa.yaml", "test", ("openbookqa/test.jsonl",), "openbookqa", 500),
    LocalTask("winogrande", "winogrande/default.yaml", "validation",
              ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), "winogrande", 1267),
)}
