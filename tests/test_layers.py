"""The house's shape, checked on the source: five floors whose imports only go down, the library floor's packages
in one order (so no two form a loop), no import cycle, small modules and functions, and quantlab imports at module
level (function-local imports only for heavy optional libraries). Every import statement counts, function-local
ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "quantlab"

#: Floors, top to bottom: a module may import its own floor or lower ones.
FLOORS = ("cli", "orchestration", "steps", "library", "foundations")
FOUNDATIONS = {"quantlab", "quantlab.home", "quantlab.models", "quantlab.models.source", "quantlab.models.named",
               "quantlab.models.convert", "quantlab.models.fingerprint", "quantlab.models.load",
               "quantlab.models.shapes", "quantlab.recipe", "quantlab.device", "quantlab.fsutil",
               "quantlab.outputs", "quantlab.interrupts", "quantlab.provenance", "quantlab.errors", "quantlab.gguf_file", "quantlab.quiet",
               "quantlab.catalog", "quantlab.methods"}  # the method registry (lazy "module:Class" strings), not the methods
#: The library floor's packages, bottom to top: a module of one may import the packages below it, never one above it
#: or beside it, so no two can form a loop. The order is what each imports:
#: - measure (memory, latency, cost) needs only the foundations;
#: - engines (what runs an artifact: llama.cpp's log-probs, timings and buffers) time it as measure does;
#: - layouts (how an artifact's bytes are stored and loaded; a GGUF loads into its engine) and layerwise (a model
#:   a decoder layer at a time);
#: - evaluate (reference text, fidelity, lm-eval suites) loads a recipe's model the way its layout says;
#: - plan (shapes, memory terms, each step's peak) reads the layouts' bytes and the fidelity step's working set;
#: - fit (units, sensitivity, allocation) prices its units with the planner's terms and measures them as fidelity does;
#: - methods save into layouts, calibrate on evaluate's text, plan their shapes, and the fit method runs fit's units;
#: - gate reads evaluated results; report shows results, the gate's references and the plan.
LIBRARY_ORDER = (("measure",), ("engines",), ("layouts", "layerwise"), ("evaluate",), ("plan",), ("fit",), ("methods",), ("gate",),
                 ("report",))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def floor(module: str) -> str:
    if module == "quantlab.cli":
        return "cli"
    if module == "quantlab.sweep" or module.startswith("quantlab.sweep."):
        return "orchestration"
    if module == "quantlab.steps" or module.startswith("quantlab.steps."):
        return "steps"
    return "foundations" if module in FOUNDATIONS else "library"


def library_part(module: str) -> str | None:
    """The library package (``quantlab.fit.units`` -> ``fit``) or top-level library module (``quantlab.table`` ->
    ``table``) a module belongs to; None outside the library floor."""
    return module.split(".")[1] if floor(module) == "library" else None


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


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan): each holds a loop."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, cycles


def _upward_in_library(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a library package to one beside or above it in LIBRARY_ORDER."""
    rank = {package: i for i, level in enumerate(LIBRARY_ORDER) for package in level}
    return [f"{m} ({library_part(m)}) imports {t} ({library_part(t)})" for m, targets in sorted(graph.items())
            for t in sorted(targets) if library_part(m) in rank and library_part(t) in rank
            and library_part(t) != library_part(m) and rank[library_part(t)] >= rank[library_part(m)]]


def test_library_packages_import_downward():
    upward = _upward_in_library(GRAPH)
    assert not upward, "\n".join(upward)


def test_every_library_package_is_ordered():
    packages = {library_part(m) for m in MODULES if library_part(m) and MODULES[m].parent != ROOT}
    assert packages == {p for level in LIBRARY_ORDER for p in level}, "add the package to LIBRARY_ORDER"


def test_no_loop_between_library_parts():
    """No loop through the library's top-level modules either (table, store, records...), which LIBRARY_ORDER
    leaves unranked."""
    parts = {}
    for m, targets in GRAPH.items():
        if library_part(m):
            parts.setdefault(library_part(m), set()).update(
                library_part(t) for t in targets if library_part(t) and library_part(t) != library_part(m))
    cycles = _cycles(parts)
    assert not cycles, cycles


def test_the_library_order_is_real():
    """A loop between two library packages fails the order (this one was in the code: the mixed GPTQ layout imported
    fit's formats while fit's sensitivity imported the GPTQ layout), and a loop fails the cycle check."""
    loop = {"quantlab.layouts.gptq_mixed": {"quantlab.fit.units"},
            "quantlab.fit.sensitivity": {"quantlab.layouts.gptq"}}
    assert _upward_in_library(loop) == ["quantlab.layouts.gptq_mixed (layouts) imports quantlab.fit.units (fit)"]
    assert _cycles({"fit": {"layouts"}, "layouts": {"fit"}, "plan": {"layouts"}}) == [["fit", "layouts"]]


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
