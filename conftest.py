"""The examples in README.md and docs/ run in the tests.

Python blocks are collected by pytest-markdown-docs; shell blocks (```bash) by :class:`ShellBlocks`
below. Each page runs in a folder of its own (``train.py``, ``sweep.py``, ``conf/`` and
``examples/`` linked in, ``data/`` the test data), its blocks in order, as a user who copies
them into a shell would. A comment just before a block tells the tests how (see
docs/development.md, "Examples that run"):

    <!-- test: with trainer.max_steps=3 data.train_subset=256 -->   appended to each command of the
                                                                       block that runs python
    <!-- test: skip <reason> -->                                      not run, for the reason given
    <!-- test: file my_tasks.py -->                                   (before a python block) the
                                                                       page's shell blocks find it
                                                                       saved as that file
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from pytest_markdown_docs.plugin import parse_superfences_block_info

ROOT = Path(__file__).resolve().parent
LINKED = ("train.py", "sweep.py", "conf", "examples")
MARK = re.compile(r"<!--\s*test:\s*(with|skip|file)\b\s*(.*?)\s*-->", re.S)
RUNS = re.compile(r"^\s*(\S+=\S+\s+)*python\b")   # a command that runs python (after any VAR=value)
_workdirs: dict[Path, Path] = {}


def data_root() -> Path | None:
    """The data sets for the examples: $FPRNN_DATA, else ../shared/data, else data/."""
    for cand in (os.environ.get("FPRNN_DATA"), ROOT.parent / "shared" / "data", ROOT / "data"):
        if cand and (Path(cand) / "MNIST" / "raw").is_dir():
            return Path(cand).resolve()
    return None


def workdir(page: Path) -> Path:
    """The folder a page's examples run in, shared by its python and shell blocks."""
    if page not in _workdirs:
        d = Path(tempfile.mkdtemp(prefix=f"fprnn-docs-{page.stem}-"))
        for name in LINKED:
            (d / name).symlink_to(ROOT / name)
        if data_root():
            (d / "data").symlink_to(data_root())
        for _, lang, code, kind, name in blocks(page):     # the page's files, as its reader saved them
            if lang == "python" and kind == "file":
                (d / name).write_text(code)
        _workdirs[page] = d
    return _workdirs[page]


def pytest_sessionfinish(session):
    for d in _workdirs.values():
        shutil.rmtree(d, ignore_errors=True)


def blocks(page: Path):
    """(line, language, code, marker kind, marker text) of every fenced block of a page."""
    tokens = MarkdownIt("commonmark").parse(page.read_text())
    for i, tok in enumerate(tokens):
        if tok.type != "fence":
            continue
        prev = tokens[i - 1] if i else None
        mark = MARK.search(prev.content) if prev is not None and prev.type == "html_block" else None
        info = parse_superfences_block_info(tok.info)        # ```python or ```{.python continuation}
        yield (tok.map[0] + 1, info[0] if info else "", tok.content,
               mark.group(1) if mark else None, mark.group(2) if mark else "")


def small(code: str, overrides: str) -> str:
    """The block with the marker's overrides appended to each command that trains."""
    lines = []
    for line in code.splitlines():
        command = line.partition(" #")[0]
        if overrides and RUNS.match(command):
            line = f"{command.rstrip()} {overrides}"
        lines.append(line)
    return "\n".join(lines) + "\n"


class ShellBlock(pytest.Item):
    def __init__(self, *, code: str, line: int, **kw):
        super().__init__(**kw)
        self.code, self.line = code, line

    def runtest(self):
        page = self.path
        cwd = workdir(page)
        env = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true",      # W&B: a second a run, nothing to check
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", self.code], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise AssertionError(f"{page.name}:{self.line} exited {done.returncode}\n$ {self.code}\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}")

    def reportinfo(self):
        return self.path, self.line, f"bash block at line {self.line}"


class ShellBlocks(pytest.File):
    def collect(self):
        for line, lang, code, kind, text in blocks(self.path):
            if lang != "bash":
                continue
            item = ShellBlock.from_parent(self, name=f"bash[line {line}]", code=small(code, text if kind == "with" else ""),
                                          line=line)
            if kind == "skip":
                item.add_marker(pytest.mark.skip(reason=text or "marked skip without a reason"))
            yield item


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix == ".md" and parent.config.option.markdowndocs:
        return ShellBlocks.from_parent(parent, path=file_path)
    return None


#: what a test does that makes it an integration test: it trains, draws a run's figures, starts
#: processes or devices; ``make test-fast`` (``-m "not integration"``) leaves these out
INTEGRATION = re.compile(r"\b(train|make_figures|plot_trials|run_ddp|maze_report|fit)\(|subprocess|"
                         r"\bTrainer\(|mkdocs|sweep\.py|train\.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: trains, draws a run's figures or starts processes "
                                       "(left out by make test-fast)")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        # pytest -n k: the cores shared out, so that k workers (and the processes they start, which
        # inherit the environment) do not each run a pool of threads as large as the machine's —
        # on 2 cores two full pools slow each other far more than twice
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = str(max(1, cores // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = threads
        import torch
        torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(items):
    """A page's python and shell blocks run in the page's order (two collectors find them); the
    docs' blocks and the tests that train or start processes are marked ``integration``."""
    slots = [i for i, item in enumerate(items) if item.path.suffix == ".md"]
    ordered = sorted((items[i] for i in slots), key=lambda it: (str(it.path), _line(it)))
    for i, item in zip(slots, ordered):
        items[i] = item
    for item in items:
        fn = getattr(item, "function", None)
        source = _source(fn) if fn is not None else ""
        if item.path.suffix == ".md" or INTEGRATION.search(source):
            item.add_marker(pytest.mark.integration)


def _source(fn) -> str:
    """The test's source and that of the module-level helpers it calls by name (one level)."""
    import inspect
    try:
        own = inspect.getsource(fn)
    except (OSError, TypeError):
        return ""
    module = sys.modules.get(fn.__module__)
    helpers = [getattr(module, n, None) for n in re.findall(r"\b(\w+)\(", own)]
    return own + "".join(inspect.getsource(h) for h in helpers
                         if inspect.isfunction(h) and h is not fn and h.__module__ == fn.__module__)


def _line(item) -> int:
    return getattr(item, "line", None) or getattr(item, "start_line", 0)


@pytest.fixture(autouse=True)
def _page_folder(request, monkeypatch):
    """Python blocks of a page run in the page's folder, with W&B off."""
    if request.node.path.suffix == ".md":
        monkeypatch.chdir(workdir(request.node.path))
        monkeypatch.setenv("WANDB_MODE", "disabled")
    yield
