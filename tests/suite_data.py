"""Benchmark files in the public layouts, made by tests from the tiny tokenizer's words."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tiny import WORDS


def _sentence(rng, n) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_arc(path: Path, items: int, seed: int = 0, answers: list[str] | None = None) -> Path:
    """AI2 ARC jsonl: {id, question: {stem, choices: [{text, label}]}, answerKey}."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(items):
            choices = [{"text": _sentence(rng, rng.randint(1, 3)), "label": label} for label in "ABCD"]
            key = rng.choice("ABCD")  # drawn either way, so the same seed writes the same questions
            key = answers[i] if answers else key
            f.write(json.dumps({"id": f"q{i}", "question": {"stem": _sentence(rng, 8), "choices": choices},
                                "answerKey": key}) + "\n")
    return path


def write_winogrande(folder: Path, items: int, seed: int = 0) -> Path:
    """WinoGrande 1.1 dev.jsonl + dev-labels.lst."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    labels = []
    with open(folder / "dev.jsonl", "w") as f:
        for i in range(items):
            answer = rng.choice("12")
            labels.append(answer)
            f.write(json.dumps({"qID": f"w{i}", "sentence": f"{_sentence(rng, 5)} _ {_sentence(rng, 4)} .",
                                "option1": rng.choice(WORDS), "option2": rng.choice(WORDS), "answer": answer}) + "\n")
    (folder / "dev-labels.lst").write_text("\n".join(labels) + "\n")
    return folder


def write_piqa(folder: Path, items: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "valid.jsonl", "w") as f:
        for _ in range(items):
            f.write(json.dumps({"goal": _sentence(rng, 6), "sol1": _sentence(rng, 4), "sol2": _sentence(rng, 4)}) + "\n")
    (folder / "valid-labels.lst").write_text("\n".join(rng.choice("01") for _ in range(items)) + "\n")
    return folder


def write_hellaswag(path: Path, seed: int = 0) -> Path:
    """Two items of llama.cpp's 6-line text: an ActivityNet one (unfinished last sentence) and a WikiHow one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("Roof shingle removal: A man is sitting on a roof. he\n3\nis using wrap.\nis ripping tiles.\n"
                    "is holding a cube.\nstarts pulling up roofing.\n"
                    "Home and Garden: How to fix a door. Check the hinges.\n0\nTighten them.\nPaint it.\n"
                    "Sell it.\nBurn it.\n")
    return path


def write_lambada(path: Path, items: int, seed: int = 0) -> Path:
    """lambada_openai's jsonl: {text}, a passage whose last word is the target."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": _sentence(rng, rng.randint(6, 14))}) + "\n" for _ in range(items)))
    return path


def write_wikitext(path: Path, pages: int, seed: int = 0) -> Path:
    """wiki.test.raw: `` = Title = `` headings, each over a few raw lines (a page per heading)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(pages):
        lines += [" ", f" = {_sentence(rng, 2)} = ", " "]
        lines += [f" {_sentence(rng, rng.randint(5, 30))} . " for _ in range(rng.randint(1, 4))]
    path.write_text("\n".join(lines) + "\n")
    return path
