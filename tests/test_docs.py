"""The docs: the site builds with `mkdocs build --strict` (every link and anchor resolves, every API
page imports), the README stays short with links that resolve, and every python or shell block of
the README and the docs is run by the suite (conftest.py) or says why not."""
import importlib.util
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

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_the_site_builds_strict_with_at_least_ten_pages(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    pages = [p for p in (tmp_path / "site").rglob("index.html")]
    assert len(pages) >= 10, pages
    api = (tmp_path / "site" / "reference" / "core" / "index.html").read_text()
    assert 'id="fprnn.core.rules.w3"' in api and 'id="fprnn.core.solvers.anderson"' in api


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
