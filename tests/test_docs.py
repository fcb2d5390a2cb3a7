"""The code blocks of README.md and docs/*.md run as written (scripts/check_docs.py).

The default run executes the fast blocks of every file; ``-m slow`` runs the blocks marked slow (real models,
minutes each). Blocks marked ``skip`` need a GPU or hours; each says why.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "check_docs.py"
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _checker():
    spec = importlib.util.spec_from_file_location("check_docs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_docs"] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_fast_blocks_run(doc):
    res = _run(str(doc), timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_slow_blocks_run(doc):
    res = _run(str(doc), "--only-slow", "--timeout", "3600", timeout=4 * 3600)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_doc_parses_and_skips_are_few_and_justified():
    check = _checker()
    blocks = [b for f in DOC_FILES for b in check.parse(f)]
    runnable = [b for b in blocks if b.runnable]
    assert runnable, "no python or bash blocks found"
    skipped = [b for b in runnable if b.mode == "skip"]
    assert all(len(b.reason) >= 10 for b in skipped), [(b.where, b.reason) for b in skipped]
    # most runnable blocks run (fast or slow); skips are for GPUs and hours
    assert len(skipped) <= max(3, len(runnable) // 3), [b.where for b in skipped]


def test_parser_directives(tmp_path):
    check = _checker()
    md = tmp_path / "x.md"
    md.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- docs-check: continue -->\n```python\nassert x == 1\n```\n\n"
        "<!-- docs-check: skip (needs a GPU) -->\n```bash\nnvidia-smi\n```\n\n"
        "<!-- docs-check: slow -->\n\n```bash\necho slow\n```\n\n"
        "<!-- docs-check: fragment -->\n```python\nloss = loss_fn(batch)\n```\n\n"
        "```yaml\na: 1\n```\n",
        encoding="utf-8",
    )
    blocks = check.parse(md)
    assert [b.lang for b in blocks] == ["python", "python", "bash", "bash", "python", "yaml"]
    assert [b.mode for b in blocks] == ["run", "run", "skip", "slow", "run", "run"]
    assert blocks[1].chain == [blocks[0], blocks[1]] and blocks[2].reason == "needs a GPU"
    assert check.source_of(blocks[4]).startswith(check.PRELUDE)
    assert check.main([str(md)]) == 0  # runs the chain once, the fragment with its prelude; skips the rest

    bad = tmp_path / "bad.md"
    bad.write_text("<!-- docs-check: skip -->\n```bash\ntrue\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs a reason"):
        check.parse(bad)
    bad.write_text("```python\nraise SystemExit(3)\n```\n", encoding="utf-8")
    assert check.main([str(bad)]) == 1
