"""The code that trains a run: what every run records, and when two runs count as trained by the same code.

:func:`code_record` (computed once per process) holds

* ``flatpeft``: the package version;
* ``source_sha256``: sha256 over the package's own ``.py`` files (relative path and content of each, sorted),
  so it works without git, from a checkout, a wheel or an edited install;
* ``git_commit`` / ``git_dirty``: the commit of the checkout the package was imported from and whether its
  tracked files differ from that commit; ``None`` when git is absent, the package is not inside a git work tree
  that tracks it (an installed wheel), or git does not answer within a few seconds;
* ``torch``, ``transformers``, ``peft``: the versions of the libraries that compute every number.

Two runs count as trained by the same code when :func:`code_key` agrees: the source hash and the three library
versions (the git fields only name the code for a reader; the source hash already covers them). A run that
recorded no code (trained before flatpeft recorded it) matches no code.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["code_record", "source_sha256", "git_state", "code_key", "same_code", "code_label", "NOT_RECORDED",
           "LIBRARIES", "group_by_code"]

#: Libraries whose versions are part of the code of a run.
LIBRARIES = ("torch", "transformers", "peft")
#: How a run without a code record is named in tables and on the page.
NOT_RECORDED = "code not recorded (trained before flatpeft recorded the code of each run)"
_PACKAGE = Path(__file__).resolve().parents[1]
_GIT_TIMEOUT_S = 5.0


@functools.lru_cache(maxsize=1)
def source_sha256() -> str:
    """sha256 over the relative path and sha256 of every ``.py`` file of the flatpeft package (sorted)."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(_PACKAGE).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def _git(*args: str) -> str | None:
    """Output of ``git -C <package dir> ARGS`` (stripped), or ``None`` on any failure or timeout."""
    git = shutil.which("git")
    if git is None:
        return None
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        done = subprocess.run([git, "-C", str(_PACKAGE), *args], capture_output=True, text=True,
                              timeout=_GIT_TIMEOUT_S, env=env, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """``{"git_commit": sha or None, "git_dirty": bool or None}`` of the checkout the package comes from.

    Only a work tree that tracks the package's ``__init__.py`` counts (an installed package inside some other
    repository, e.g. a virtual environment in a project, has no commit of its own)."""
    none = {"git_commit": None, "git_dirty": None}
    if _git("ls-files", "--error-unmatch", "--", "__init__.py") is None:
        return none
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return none
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _version(module: str) -> str | None:
    """``module.__version__`` (``None`` when it does not import)."""
    import importlib

    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # noqa: BLE001 - an absent or broken library is recorded as None
        return None


@functools.lru_cache(maxsize=1)
def _record() -> tuple[tuple[str, Any], ...]:
    import flatpeft

    rec: dict[str, Any] = {"flatpeft": flatpeft.__version__, "source_sha256": source_sha256(), **git_state()}
    rec.update({lib: _version(lib) for lib in LIBRARIES})
    return tuple(rec.items())


def code_record() -> dict[str, Any]:
    """The code of this process (see the module docstring); a fresh dict each call, computed once."""
    return dict(_record())


def code_key(record: Mapping[str, Any] | None) -> tuple | None:
    """What must agree for two runs to count as trained by the same code (``None``: not recorded)."""
    if not isinstance(record, Mapping) or not record.get("source_sha256"):
        return None
    return (record.get("source_sha256"), *(record.get(lib) for lib in LIBRARIES))


def same_code(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two code records name the same code (a missing record never does)."""
    ka = code_key(a)
    return ka is not None and ka == code_key(b)


def code_label(record: Mapping[str, Any] | None) -> str:
    """A short name of the code for tables: ``flatpeft 0.1.0, git 35223b6 (dirty), source 1a2b3c4d5e6f;
    torch 2.13.0, transformers 5.0.0, peft 0.21.0``."""
    if code_key(record) is None:
        return NOT_RECORDED
    assert record is not None
    git = ""
    if record.get("git_commit"):
        git = f", git {str(record['git_commit'])[:7]}" + (" (dirty)" if record.get("git_dirty") else "")
    libs = ", ".join(f"{lib} {record.get(lib)}" for lib in LIBRARIES)
    return f"flatpeft {record.get('flatpeft')}{git}, source {str(record['source_sha256'])[:12]}; {libs}"


def group_by_code(records: Iterable[tuple[str, Mapping[str, Any] | None]]) -> dict[str, list[str]]:
    """``{code label: [run names]}`` of ``(run name, code record)`` pairs, in first-seen order."""
    out: dict[str, list[str]] = {}
    for name, record in records:
        out.setdefault(code_label(record), []).append(name)
    return out
