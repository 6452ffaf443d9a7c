"""The package's shape: its parts are subpackages, the core (core/, models/) imports no Lightning,
Hydra, W&B or matplotlib, no module imports itself back through others (lazy imports inside
functions count: they close circles too), and run directories of the flat layout still load."""
import ast
import subprocess
import sys
from pathlib import Path

import hydra
import torch

from fprnn.models.dense import FixedPointRNN
from fprnn.training.checkpoint import MOVED, saved_config

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fprnn"
FLAT_RUN = Path(__file__).parent / "data" / "flat_layout_run"   # written by fprnn 0.1 (train.py experiment=paper_linear)
HEAVY = ("pytorch_lightning", "lightning", "hydra", "omegaconf", "wandb", "matplotlib")


def module_name(f: Path) -> str:
    parts = f.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module of fprnn → the fprnn modules it imports (absolute or relative, at any depth)."""
    graph = {}
    for f in PKG.rglob("*.py"):
        me = module_name(f)
        package = me if f.name == "__init__.py" else me.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                mod = ".".join(x for x in (base, node.module) if x)
                deps.update([mod] + [f"{mod}.{a.name}" for a in node.names])
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[me] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


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
    assert {"fprnn.training.callbacks", "fprnn.analysis.figures", "fprnn.training.run", "fprnn.models.dense",
            "fprnn.core.implicit"} <= set(graph)
    assert "fprnn.core.rules" in graph["fprnn.core.implicit"]        # the parser sees relative and absolute imports
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_root_holds_the_public_surface_and_at_most_six_modules():
    assert len(list(PKG.glob("*.py"))) <= 6
    subs = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert subs == {"core", "models", "data", "training", "analysis", "tools"}
    import fprnn
    from fprnn.core import rules, solvers
    from fprnn.models.conv import ConvFixedPointLayer
    assert fprnn.rules is rules and fprnn.solvers is solvers and fprnn.ConvFixedPointLayer is ConvFixedPointLayer
    assert fprnn.FixedPointLayer.__module__ == "fprnn.models.layer" and fprnn.TrialRNN.__module__ == "fprnn.models.ctrnn"


def test_core_and_models_import_only_each_other():
    graph = imports()
    for m, deps in graph.items():
        part = m.split(".")[1] if "." in m else None
        allowed = {"core": ("fprnn.core",), "models": ("fprnn.core", "fprnn.models")}.get(part)
        if allowed:
            assert all(d.startswith(allowed) for d in deps), (m, deps)


def test_the_core_imports_no_lightning_hydra_wandb_or_matplotlib():
    core = sorted(m for m in imports() if m.startswith(("fprnn.core", "fprnn.models")))
    assert len(core) >= 15
    code = (f"import sys; import fprnn, {', '.join(core)}; "
            f"bad = [m for m in {HEAVY!r} if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    # the check itself can fail: the training layer does import Lightning
    done = subprocess.run([sys.executable, "-c", code.replace("import fprnn,", "import fprnn.training.run,")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and "pytorch_lightning" in done.stdout


def test_a_run_directory_of_the_flat_layout_still_loads(tmp_path):
    """Its config names fprnn.model.FixedPointRNN, fprnn.data.LinearRegressionDataModule and
    fprnn.checkpoint.ResumableCSVLogger; model.json and weights.pt rebuild the network."""
    raw = (FLAT_RUN / ".hydra" / "config.yaml").read_text()
    assert "fprnn.model.FixedPointRNN" in raw and "fprnn.data.LinearRegressionDataModule" in raw
    cfg = saved_config(FLAT_RUN)
    for node in (cfg.model, cfg.data, cfg.logger.csv):
        assert hydra.utils.get_class(node._target_)          # each found at its new place
    net = FixedPointRNN.load(FLAT_RUN)
    W = torch.load(FLAT_RUN / "weights.pt")["layers.0.W"]
    assert torch.equal(net.layers[0].W.detach(), W)
    data = hydra.utils.instantiate(cfg.data)
    assert type(data).__module__ == "fprnn.data.datamodules"
    # every module of the flat layout has a place, and every place exists
    assert len(MOVED) == 33 and all((PKG / (new.replace(".", "/") + ".py")).exists()
                                    or (PKG / new.replace(".", "/") / "__init__.py").exists() for new in MOVED.values())


def test_no_private_name_is_imported_from_another_module(tmp_path):
    import doclint
    assert doclint.private_imports() == []
    planted = tmp_path / "fprnn" / "planted.py"
    planted.parent.mkdir()
    planted.write_text("from fprnn.models.dense import _hidden, public\nfrom os import _exit\n")
    assert doclint.private_imports(tmp_path / "fprnn") == ["fprnn/planted.py:1 _hidden"]
