#!/usr/bin/env python
"""Run the code blocks of README.md and docs/*.md, so the documentation cannot rot.

Usage::

    python scripts/check_docs.py                 # every fast block of README.md and docs/*.md
    python scripts/check_docs.py docs/methods.md # the blocks of some files
    python scripts/check_docs.py --slow          # the slow blocks too (real models, minutes each)
    python scripts/check_docs.py --list          # what would run, what is slow, what is skipped and why
    python scripts/check_docs.py --show-prelude  # the prelude of ``fragment`` blocks

What runs:

* fenced ```` ```python ```` blocks: each in a fresh interpreter (``sys.executable``), with a timeout;
* fenced ```` ```bash ```` blocks: the whole block as one ``bash -e -o pipefail`` script, with the interpreter's
  ``bin`` directory first on ``PATH`` (so ``flatpeft`` and ``python`` are the ones of this environment).

Both run in a scratch directory that links the repository's top-level files and folders (``scripts/``,
``benchmarks/``, ``.venv``, ...), so relative paths work as in the repository root while outputs such as ``runs/``
land in the scratch directory. ``configs/`` is left out: an example names a built-in config by name
(``flatpeft train finefoods_fewshot``), as it must from a pip install. Other blocks (``text``, ``yaml``, ``json``, no language) are not run.

An HTML comment on the line before a block (invisible on rendered pages) changes what happens to it:

* ``<!-- docs-check: skip (reason) -->``: never run; the reason is required (GPU, hours, network, ...);
* ``<!-- docs-check: slow -->``: run only with ``--slow``;
* ``<!-- docs-check: continue -->``: a Python block that continues the previous Python block of the same file:
  they run as one script (like one interactive session);
* ``<!-- docs-check: fragment -->``: a Python block that uses the names ``model``, ``batch``, ``loss_fn`` and
  ``closure``; it runs after the prelude shown by ``--show-prelude`` (a tiny peft LoRA model and one batch).

Exit status: 0 when every block that ran succeeded, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
DIRECTIVE = re.compile(r"^\s*<!--\s*docs-check:\s*(?P<body>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")

#: what a ``fragment`` block may assume: a tiny peft LoRA model, a batch, its loss and a closure
PRELUDE = '''\
import torch
from torch import nn
from peft import LoraConfig, get_peft_model

torch.manual_seed(0)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        self.lin1 = nn.Linear(16, 3)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


model = get_peft_model(TinyNet(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]))
batch = {"x": torch.randn(16, 8), "y": torch.randint(0, 3, (16,))}


def loss_fn(batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def closure():
    loss = loss_fn(batch)
    loss.backward()
    return loss
'''


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str  # "python", "bash" or the info string of a block that is not run
    code: str
    mode: str = "run"  # run | slow | skip
    reason: str = ""
    kind: str = "plain"  # plain | continue | fragment
    chain: list["Block"] = field(default_factory=list)  # for python: the blocks run together with this one

    @property
    def where(self) -> str:
        try:
            rel = self.path.resolve().relative_to(REPO)
        except ValueError:
            rel = self.path
        return f"{rel}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.lang in ("python", "bash")


def parse_directive(body: str, where: str) -> tuple[str, str, str]:
    """``(mode, reason, kind)`` of a ``docs-check:`` comment; ``ValueError`` for anything unknown."""
    mode, reason, kind = "run", "", "plain"
    m = re.search(r"\bskip\s*\((?P<reason>.*)\)", body)  # the reason may contain ';' and parentheses
    if m:
        mode, reason = "skip", m.group("reason").strip()
        body = body[:m.start()] + body[m.end():]
    for part in [p.strip() for p in re.split(r"[;,]", body) if p.strip()]:
        if part == "skip":
            raise ValueError(f"{where}: 'docs-check: skip' needs a reason: <!-- docs-check: skip (reason) -->")
        elif part == "slow":
            mode = "slow"
        elif part in ("continue", "fragment"):
            kind = part
        else:
            raise ValueError(f"{where}: unknown docs-check directive {part!r} (skip (reason), slow, continue, fragment)")
    return mode, reason, kind


def parse(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, with their directives."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, indent = m.group("fence"), m.group("info").lower(), len(m.group("indent"))
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1  # closing fence
        # the directive: the last non-blank line before the fence
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        mode, reason, kind = "run", "", "plain"
        where = f"{path}:{start + 1}"
        if j >= 0 and (d := DIRECTIVE.match(lines[j])):
            mode, reason, kind = parse_directive(d.group("body"), where)
        lang = RUN_LANGS.get(info, info or "")
        if kind != "plain" and lang != "python":
            raise ValueError(f"{where}: 'docs-check: {kind}' applies to python blocks only")
        blocks.append(Block(path, start + 1, lang, "\n".join(body) + "\n", mode, reason, kind))
    # python chains: a `continue` block runs with the blocks it continues
    previous: Block | None = None
    for b in blocks:
        if b.lang != "python":
            continue
        if b.kind == "continue":
            if previous is None:
                raise ValueError(f"{b.where}: 'docs-check: continue' but no python block before it")
            b.chain = previous.chain + [b]
            if b.mode == "run" and previous.mode != "run":
                b.mode, b.reason = previous.mode, previous.reason or b.reason
        else:
            b.chain = [b]
        previous = b
    return blocks


def source_of(block: Block) -> str:
    """The script a python block runs as: its chain, after the prelude for fragments."""
    parts = []
    if block.chain and block.chain[0].kind == "fragment":
        parts.append(PRELUDE)
    for b in block.chain:
        parts.append(f"# --- {b.where}\n{b.code}")
    return "\n".join(parts)


def scratch_dir() -> Path:
    """A temporary directory whose top-level entries link to the repository's."""
    d = Path(tempfile.mkdtemp(prefix="flatpeft-docs-"))
    for entry in REPO.iterdir():
        if entry.name in ("runs", "configs") or (entry.name.startswith(".") and entry.name != ".venv"):
            continue
        (d / entry.name).symlink_to(entry)
    return d


def run_block(block: Block, cwd: Path, timeout: float) -> tuple[bool, str, float]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("MPLBACKEND", "Agg")
    if block.lang == "python":
        cmd = [sys.executable, "-c", source_of(block)]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return False, f"timed out after {timeout:.0f} s\n{out[-3000:]}", time.perf_counter() - t0
    ok = res.returncode == 0
    return ok, (res.stdout + res.stderr)[-6000:], time.perf_counter() - t0


def default_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md and docs/*.md)")
    ap.add_argument("--slow", action="store_true", help="also run the blocks marked slow")
    ap.add_argument("--only-slow", action="store_true", help="run only the blocks marked slow")
    ap.add_argument("--list", action="store_true", help="list the blocks and what would happen to them")
    ap.add_argument("--show-prelude", action="store_true", help="print the prelude of fragment blocks")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per block (default 900)")
    args = ap.parse_args(argv)
    if args.show_prelude:
        print(PRELUDE)
        return 0
    files = args.files or default_files()
    try:
        blocks = [b for f in files for b in parse(f) if b.runnable]
    except ValueError as err:
        print(f"check_docs: error: {err}", file=sys.stderr)
        return 1
    want = {"run"} if not (args.slow or args.only_slow) else ({"slow"} if args.only_slow else {"run", "slow"})
    # a block continued later in the same mode runs as part of its last continuation only
    continued = {id(c) for b in blocks for c in b.chain[:-1] if b.mode == c.mode}
    if args.list:
        for b in blocks:
            note = f" ({b.reason})" if b.reason else ""
            part = " [runs with the next block]" if id(b) in continued else ""
            print(f"{b.mode:4s} {b.lang:6s} {b.kind:8s} {b.where}{note}{part}")
        return 0
    cwd = scratch_dir()
    failures = 0
    for b in blocks:
        if b.mode == "skip":
            print(f"SKIP {b.where} ({b.reason})")
            continue
        if b.mode not in want:
            print(f"SLOW {b.where} (not run; use --slow)")
            continue
        if id(b) in continued:
            continue
        ok, out, dt = run_block(b, cwd, args.timeout)
        print(f"{'ok  ' if ok else 'FAIL'} {b.where} {b.lang} ({dt:.1f} s)", flush=True)
        if not ok:
            failures += 1
            print(textwrap.indent(out.rstrip(), "    | "), flush=True)
    if failures:
        print(f"check_docs: {failures} failed; scratch directory kept: {cwd}")
        return 1
    shutil.rmtree(cwd, ignore_errors=True)
    print("check_docs: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
