"""The README fits a screen and the docs stay true: named files exist and every page is in the site's nav.

Links between docs pages are checked by CI's `mkdocs build --strict`; this file needs no mkdocs.
"""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SETUP_COMMANDS = ["bash scripts/setup.sh", ".venv/bin/quantlab quantize-and-compare"]
TEST_COMMAND = ".venv/bin/python -m pytest -q"
# A repository path in prose or a code span; a path that continues into `<recipe>`, `*` or `{` is a pattern.
REPO_PATH = re.compile(r"(?<![\w./-])((?:reports|scripts|experiments)/[\w./-]*)(?![\w./-])([<*{]?)")
# Names that stand for a value in usage lines (`reports/NAME.html`, `experiments/FILE.yaml`), not files.
PLACEHOLDERS = {"NAME", "FILE", "ID", "DIR", "MODEL", "RECIPE"}


def _first_code_block(text: str) -> list[str]:
    match = re.search(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    assert match, "README.md has no code block"
    return [line.split("#")[0].strip() for line in match.group(1).splitlines() if line.split("#")[0].strip()]


def named_paths(text: str) -> set[str]:
    """The reports/, scripts/ and experiments/ paths a page names, less patterns and placeholders."""
    paths = set()
    for path, pattern in REPO_PATH.findall(text):
        path = path.rstrip(".")
        if pattern or any(part.split(".")[0] in PLACEHOLDERS for part in path.split("/")):
            continue
        paths.add(path)
    return paths


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_readme_fits_a_screen():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200): move a topic to docs/"


def test_readme_opens_with_the_setup_and_test_commands():
    assert _first_code_block(README.read_text(encoding="utf-8")) == SETUP_COMMANDS + [TEST_COMMAND]


@pytest.mark.parametrize("page", [README, ROOT / "reports" / "README.md", *_pages()], ids=lambda p: p.name)
def test_every_named_file_exists(page):
    missing = sorted(p for p in named_paths(page.read_text(encoding="utf-8")) if not (ROOT / p).exists())
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


def test_named_paths_skip_patterns_only():
    text = "`reports/bench/gate.txt`, `reports/<model>-<date>/`, `scripts/bench_*.py`, `reports/NAME.html`, reports/x."
    assert named_paths(text) == {"reports/bench/gate.txt", "reports/x"}


def test_every_page_is_in_the_nav_and_linked_from_the_readme():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["strict"] is True and config["docs_dir"] == "docs"
    nav = _nav_pages(config["nav"])
    pages = [p.name for p in _pages()]
    assert sorted(nav) == pages, f"mkdocs.yml nav {sorted(nav)} != docs/ pages {pages}"
    readme = README.read_text(encoding="utf-8")
    unlinked = [page for page in pages if f"](docs/{page})" not in readme]
    assert not unlinked, f"README.md links no docs page {unlinked}"


def test_reports_index_names_every_folder_and_the_example_output():
    index = (ROOT / "reports" / "README.md").read_text(encoding="utf-8")
    entries = [p.name for p in (ROOT / "reports").iterdir() if p.name != "README.md"]
    unindexed = [name for name in entries if f"`{name}/" not in index and f"`{name}`" not in index]
    assert not unindexed, f"reports/README.md does not index {unindexed}"
    readme = README.read_text(encoding="utf-8")
    assert "`reports/README.md`" in readme and "`reports/smollm2-135m-suites/quick/table.txt`" in readme
