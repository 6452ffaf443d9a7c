"""The package's shape: the core imports no Lightning or Hydra, and no module imports itself
back through others (lazy imports inside functions count: they close circles too)."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fprnn"
CORE = ["activations", "dynamics", "solvers", "rules", "implicit", "model", "reference", "nn", "ctrnn", "analysis", "operators", "conv"]


def imports() -> dict[str, set[str]]:
    graph = {}
    for f in PKG.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        graph[f.stem] = deps
    return graph


def cycle(graph) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path + [d]
            if d in graph and not state.get(d):
                found = visit(d, path + [d])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if not state.get(m):
            found = visit(m, [m])
            if found:
                return found
    return None


def test_no_import_circle():
    graph = imports()
    assert {"callbacks", "figures", "run", "model", "implicit"} <= set(graph)
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_core_imports_no_lightning_or_hydra():
    code = (f"import sys; import {', '.join('fprnn.' + m for m in CORE)}; "
            "bad = [m for m in ('pytorch_lightning', 'lightning', 'hydra', 'omegaconf') if m in sys.modules]; "
            "print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
