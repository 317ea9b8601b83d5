"""The house's shape, checked on the source: five floors whose imports only go down, no import cycle, small
modules and functions, and quantlab imports at module level (function-local imports only for heavy
optional libraries). Every import statement counts, function-local ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "quantlab"

#: Floors, top to bottom: a module may import its own floor or lower ones.
FLOORS = ("cli", "orchestration", "steps", "library", "foundations")
FOUNDATIONS = {"quantlab", "quantlab.models", "quantlab.recipe", "quantlab.device", "quantlab.fsutil",
               "quantlab.outputs", "quantlab.provenance", "quantlab.errors", "quantlab.gguf_file", "quantlab.quiet",
               "quantlab.catalog", "quantlab.methods"}  # the method registry (lazy "module:Class" strings), not the methods
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def floor(module: str) -> str:
    if module == "quantlab.cli":
        return "cli"
    if module == "quantlab.sweep" or module.startswith("quantlab.sweep."):
        return "orchestration"
    if module == "quantlab.steps" or module.startswith("quantlab.steps."):
        return "steps"
    return "foundations" if module in FOUNDATIONS else "library"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported quantlab module, line, inside a function) for every import statement of ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    local = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(fn)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                out.append((target, node.lineno, id(node) in local))
    return out


GRAPH = {m: {t for t, _, _ in _imports(m)} for m in MODULES}


def test_imports_only_go_down():
    rank = {name: i for i, name in enumerate(FLOORS)}
    upward = [f"{m} ({floor(m)}) imports {t} ({floor(t)})" for m, targets in GRAPH.items() for t in sorted(targets)
              if rank[floor(t)] < rank[floor(m)]]
    assert not upward, "\n".join(upward)


def test_only_the_cli_imports_orchestration():
    assert {m for m, targets in GRAPH.items() for t in targets
            if floor(t) == "orchestration" and floor(m) != "orchestration"} <= {"quantlab.cli"}


def test_no_import_cycle():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_quantlab_imports_are_at_module_level():
    """Function-local imports are for heavy optional libraries only (see test_heavy_libraries_stay_lazy)."""
    local = [f"{m}:{line} imports {t}" for m in MODULES for t, line, inside in _imports(m) if inside]
    assert not local, "\n".join(local)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_are_small(module):
    text = MODULES[module].read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{module} has {len(text.splitlines())} lines"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{module}: {long}"


def test_the_floors_are_real():
    """A check that cannot fail is no check: the contract sees an upward import when there is one."""
    assert floor("quantlab.sweep.driver") == "orchestration" and floor("quantlab.steps.bench") == "steps"
    assert ("quantlab.steps.launcher" in GRAPH["quantlab.steps.bench"]
            and "quantlab.evaluate.fidelity" in GRAPH["quantlab.steps.fidelity"])


def test_heavy_libraries_stay_lazy():
    """Importing every quantlab module (a fresh interpreter) loads no heavy optional library: they are imported
    inside the functions that need them, so the CLI starts in a fraction of a second."""
    import subprocess
    import sys

    heavy = ("torch", "transformers", "lm_eval", "gptqmodel", "bitsandbytes", "torchao", "matplotlib", "numpy",
             "ray", "datasets")
    code = "; ".join([f"import {m}" for m in sorted(MODULES) if not m.endswith("__main__")]
                     + [f"import sys; print(' '.join(h for h in {heavy!r} if h in sys.modules))"])
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not loaded, loaded
