"""The docs: the site builds with `mkdocs build --strict` (every link and anchor resolves, every API
page imports), the README stays short with links that resolve, and every python or shell block of
the README and the docs is run by the suite (conftest.py) or says why not."""
import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the root conftest.py: how the docs' blocks are found and run (tests/conftest.py has the same name)
_spec = importlib.util.spec_from_file_location("docs_conftest", ROOT / "conftest.py")
_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_docs)
blocks, small = _docs.blocks, _docs.small

import doclint  # noqa: E402  (tests/doclint.py: how the Markdown reads once rendered)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_the_site_builds_strict_with_at_least_ten_pages(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    pages = [p for p in (tmp_path / "site").rglob("index.html")]
    assert len(pages) >= 10, pages
    api = (tmp_path / "site" / "reference" / "core" / "index.html").read_text()
    assert 'id="fprnn.core.rules.w3"' in api and 'id="fprnn.core.solvers.anderson"' in api
    site = {p: p.read_text() for p in (tmp_path / "site").rglob("*.html")}
    roles = [str(p) for p, t in site.items() if re.search(r":(class|mod|func|meth):`", t)]
    assert roles == [], roles                                 # cross-references, not Sphinx roles
    models = (tmp_path / "site" / "reference" / "models" / "index.html").read_text()
    from fprnn import ConvFixedPointLayer, FixedPointLayer, TrialRNN
    from fprnn.models.dense import FixedPointRNN
    for cls in (FixedPointLayer, ConvFixedPointLayer, TrialRNN, FixedPointRNN):
        at = models.index(f'id="{cls.__module__}.{cls.__name__}"')
        shown = re.sub(r"<[^>]+>", "", models[at:at + 20000])
        assert all(f"{a}" in shown for a in inspect.signature(cls).parameters), cls   # its constructor's arguments
    figures = {m for t in site.values() for m in re.findall(r'<img[^>]+src="([^"]+\.png)"', t)}
    assert len(figures) >= 4, figures                          # figures from real runs, committed


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert first[0].startswith("make train") and first[1].startswith("make test")
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 10
    assert [l for l in links if not l.startswith("http") and not (ROOT / l).exists()] == []


def test_every_block_runs_or_says_why_not():
    run = skipped = 0
    for page in PAGES:
        for line, lang, code, kind, text in blocks(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            assert lang in ("python", "bash", "text", "yaml"), f"{where}: a block in {lang or 'no language'}"
            if lang in ("python", "bash"):
                assert kind != "skip" or len(text.split()) >= 3, f"{where}: skipped without a reason"
                assert kind != "skip" or lang == "bash", f"{where}: python blocks all run"
                skipped += kind == "skip"
                run += kind != "skip"
    print(f"{run} blocks run, {skipped} skipped with a reason")
    assert run >= 30 and skipped <= 5


def test_the_small_switch_appends_to_python_commands_only():
    code = "python train.py rule=w3   # a comment\n# python not this\nmake train\nFOO=1 python -m fprnn.figures runs/x\n"
    assert small(code, "trainer.max_steps=2") == ("python train.py rule=w3 trainer.max_steps=2\n# python not this\n"
                                                   "make train\nFOO=1 python -m fprnn.figures runs/x trainer.max_steps=2\n")
    assert small(code, "") == code


def _everything():
    """(where, text) of every docs page and every docstring of fprnn."""
    yield from ((str(p.relative_to(ROOT)), p.read_text()) for p in PAGES)
    yield from doclint.docstrings()


def test_every_list_starts_after_a_blank_line():
    assert [(w, n) for w, t in _everything() for n in doclint.collapsed_lists(t)] == []
    planted = "What it promises:\n- one\n- two\n\nA list after a blank line:\n\n- fine\n  continued\n- fine\n"
    assert doclint.collapsed_lists(planted) == [2]
    assert doclint.collapsed_lists("```\ncode\n- not a list\n```\n# Heading\n- after a heading\n") == []


def test_no_star_is_taken_for_italics_by_mistake():
    assert [(w, n) for w, t in _everything() for n in doclint.stray_stars(t)] == []
    assert doclint.stray_stars("the fixed point r*, and a loss on r* trains W") == [1]
    assert doclint.stray_stars("*Learning fixed\npoints* and **bold**, r\\* and `r*`") == []


def test_every_docs_pointer_in_the_code_names_a_file_that_exists():
    missing = {str(p.relative_to(ROOT)): doclint.missing_docs_pointers(p.read_text())
               for p in (ROOT / "fprnn").rglob("*.py")}
    assert {k: v for k, v in missing.items() if v} == {}
    assert doclint.missing_docs_pointers("see docs/stack.md and docs/concepts/stacks.md") == ["docs/stack.md"]


def test_docstrings_cross_reference_without_sphinx_roles():
    roles = [w for w, t in doclint.docstrings() if doclint.SPHINX_ROLE.search(t)]
    assert roles == [] and doclint.SPHINX_ROLE.search("see :class:`fprnn.TrialRNN`")


def test_tables_are_at_most_seven_columns_wide():
    wide = [(w, n) for w, t in _everything() for n in doclint.wide_tables(t, 7)]
    assert wide == []
    assert doclint.wide_tables("| a | b | c |\n|---|---|---|\n| 1 | 2 \\| 2 | 3 |\n", 2) == [1]


def test_the_layer_arguments_table_is_the_constructor():
    from fprnn import FixedPointLayer
    page = (ROOT / "docs" / "guides" / "own-model.md").read_text()
    table = page[page.index("## The layer's arguments"):page.index("## What the layer promises")]
    rows = re.findall(r"^\| `(\w+)` \| `?([^|`]*)`? \|", table, re.M)
    sig = inspect.signature(FixedPointLayer).parameters
    assert [name for name, _ in rows] == list(sig)
    for name, default in rows:
        expect = sig[name].default
        assert (default == "—") if expect is inspect.Parameter.empty else default == repr(expect).replace("'", '"'), name
