"""The package's import graph: imports flow one way (no cycles, function-level imports included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "lrd_exp"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its body (top level or inside functions).

    ``from a.b import c`` is an import of ``a.b.c`` when that is a module, else of ``a.b``; importing a module
    also runs the ``__init__`` of every package above it, so those count as imports too.
    """
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        for name in names:
            if not name.startswith("lrd_exp"):
                continue
            parts = name.split(".")
            out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        # a module never "imports" the packages it lives in: Python has already started them
        graph[name] = imported_modules(path, set(mods)) - own_packages - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that returns to its start, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_and_parent_package_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from lrd_exp.timing.steps import time_fn\n")
    assert imported_modules(f, set(modules())) == {"lrd_exp", "lrd_exp.timing", "lrd_exp.timing.steps"}


def test_no_import_cycles_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_subpackages_import_each_other_one_way():
    """Between subpackages too: config and results use nothing else of the package (but the lazy namespaces,
    which use nothing themselves); cli uses tasks."""
    graph = import_graph()
    sub = {}
    for name, deps in graph.items():
        top = name.split(".")[1] if "." in name else "__init__"
        sub.setdefault(top, set()).update(d.split(".")[1] for d in deps if "." in d and d.split(".")[1] != top)
    assert find_cycle(sub) is None, find_cycle(sub)
    assert sub["lazy"] == set()
    assert sub["config"] <= {"lazy"} and sub["results"] <= {"lazy"}
    assert "tasks" in sub["cli"]


def test_the_decomposition_library_imports_with_torch_alone():
    """``lrd_exp.decompose`` (and ``decompose_model`` through the package) loads no Hydra, OmegaConf, pandas,
    Lightning or transformers (its ``Conv1D`` is matched only once the user's model has loaded it); importing the
    package registers no Hydra schema."""
    code = ("import sys\n"
            "import lrd_exp.decompose, lrd_exp.decompose.search, lrd_exp.decompose.calibration\n"
            "from lrd_exp import decompose_model\n"
            "heavy = ('hydra', 'omegaconf', 'pandas', 'pytorch_lightning', 'lightning', 'transformers')\n"
            "print('LOADED', sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "LOADED []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_help_does_not_import_the_job():
    """``python run.py --help`` stays fast: torch, Lightning and the job's modules load only when a job runs."""
    code = ("import runpy, sys; sys.argv = ['run.py', '--help']\n"
            "try:\n    runpy.run_path('run.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('LOADED', 'lrd_exp.tasks' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "LOADED False False" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_the_public_api_is_importable_by_name():
    import lrd_exp

    for name in lrd_exp.__all__:
        assert getattr(lrd_exp, name) is not None, name
    from lrd_exp import FreezingCallback, decompose_model, load_decomposed  # noqa: F401


def test_no_function_in_the_library_is_over_60_lines():
    """Short functions over named steps (a task reads top to bottom)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "lrd_exp"
    long = [f"{path.relative_to(root)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in root.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, long


def test_every_package_docstring_names_its_modules():
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "lrd_exp"
    missing = {init.parent.name: [p.stem for p in init.parent.glob("*.py")
                                  if p.stem != "__init__" and p.stem not in (ast.get_docstring(
                                      ast.parse(init.read_text())) or "")]
               for init in root.glob("*/__init__.py")}
    assert not {k: v for k, v in missing.items() if v}, missing
