"""Checks on how the docs' Markdown and fprnn's docstrings read once rendered (Python-Markdown, as
MkDocs and mkdocstrings render them), used by tests/test_docs.py."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s+\S")
FENCE = re.compile(r"^\s*(```|~~~)")
SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`")
DOCS_POINTER = re.compile(r"\bdocs/[\w./-]+\.md\b")


def collapsed_lists(text: str) -> list[int]:
    """Line numbers (1-based) of list items that Python-Markdown folds into the paragraph above:
    an item right after a non-blank line that is neither a list item, a continuation of one, nor a
    heading. Python-Markdown starts a list only after a blank line (unlike CommonMark)."""
    hits, in_list, prev_blank, fenced = [], False, True, False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced, prev_blank = not fenced, True
            continue
        if fenced:
            continue
        if not line.strip():
            prev_blank = True
            continue
        item = bool(LIST_ITEM.match(line))
        if item and not prev_blank and not in_list:
            hits.append(n)
        if item:
            in_list = True
        elif prev_blank and not line[:1].isspace():
            in_list = False                     # a new top-level paragraph ends the list
        prev_blank = line.lstrip().startswith("#")   # a heading is a block of its own
    return hits


def docstrings(package: Path = ROOT / "fprnn"):
    """(where, text) of every module, class and function docstring of the package."""
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    line = node.body[0].lineno if node.body else 1
                    yield f"{path.relative_to(ROOT)}:{line}", doc


def missing_docs_pointers(text: str, root: Path = ROOT) -> list[str]:
    """The ``docs/….md`` paths ``text`` names that do not exist under ``root``."""
    return [p for p in DOCS_POINTER.findall(text) if not (root / p).is_file()]


def private_imports(package: Path = ROOT / "fprnn") -> list[str]:
    """``file:line name`` of every ``_name`` imported from another fprnn module: a contract the
    module that owns the name never declared."""
    hits = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fprnn"):
                hits += [f"{path.relative_to(package.parent)}:{node.lineno} {a.name}" for a in node.names
                         if a.name.startswith("_") and not a.name.startswith("__")]
    return hits


EMPHASIS = re.compile(r"(?<![\w*\\])\*(?=[^\s*])[^*\n]*?(?<=[^\s*\\])\*(?![\w*])")
STRAY_STAR = re.compile(r"(?<=[\w)'′])(?<!\\)\*(?!\*)")


def paragraphs(text: str):
    """(first line number, the paragraph's text outside inline code, its lines joined by spaces)
    for each paragraph outside fenced and indented code: Python-Markdown pairs ``*`` across the
    lines of a paragraph."""
    fenced, start, lines = False, 0, []
    for n, line in enumerate([*text.splitlines(), ""], 1):
        if FENCE.match(line):
            fenced = not fenced
        if fenced or FENCE.match(line) or not line.strip() or line.startswith("    "):
            if lines:
                yield start, re.sub(r"`+[^`]*`+", "", " ".join(lines))
            lines = []
            continue
        start = start if lines else n
        lines.append(line.strip())


def stray_stars(text: str) -> list[int]:
    """First lines of paragraphs holding a ``*`` that Python-Markdown may pair into italics though
    it was written as math (r* = f(W r* + x)): one right after a letter or ``)``, not escaped, and
    not the closer of an intended ``*emphasis*``."""
    return [n for n, par in paragraphs(text) if STRAY_STAR.search(EMPHASIS.sub("", par))]


def wide_tables(text: str, most: int) -> list[int]:
    """First lines of the Markdown tables with more than ``most`` columns (a pipe escaped as ``\\|``
    inside a cell does not count): wider ones are cut off on the right of the page."""
    hits, lines = [], text.splitlines()
    for n, line in enumerate(lines, 1):
        is_head = line.startswith("|") and n < len(lines) and re.match(r"^\|[-| :]+\|$", lines[n].strip())
        if is_head and len(re.split(r"(?<!\\)\|", line.strip())) - 2 > most:
            hits.append(n)
    return hits
