"""Files that ship inside the package: the built-in configs and the Markdown docs.

The wheel carries ``flatpeft/configs/`` (the experiment configs, the ``suite`` plan and the ``accelerate/``
launch configs) and ``flatpeft/docs/`` (the Markdown pages). In a checkout both are the repository's ``configs/``
and ``docs/`` (``src/flatpeft/configs`` and ``src/flatpeft/docs`` link to them: one copy of each), so a reference
such as ``docs/algorithms.md`` or ``configs/suite.yaml`` in a docstring names the same file in a checkout and in
an installed package (relative to ``flatpeft.__path__[0]``; ``flatpeft docs`` and ``flatpeft configs --path``
print where).

A built-in config runs by name (``flatpeft train finefoods_fewshot``); a path to a file keeps working and always
wins over a name (:func:`resolve_config_path`). ``flatpeft configs`` lists the names.
"""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["configs_dir", "docs_dir", "builtin_configs", "config_summary", "resolve_config_path",
           "missing_config_hint", "doc_pages"]

_SUFFIXES = (".yaml", ".yml")


def configs_dir() -> Path:
    """The directory of the built-in configs inside the installed package (``flatpeft/configs``)."""
    return Path(__file__).parent / "configs"


def docs_dir() -> Path:
    """The directory of the Markdown docs inside the installed package (``flatpeft/docs``)."""
    return Path(__file__).parent / "docs"


def builtin_configs() -> dict[str, Path]:
    """``{name: path}`` of every built-in config, sorted: ``finefoods_fewshot`` for ``configs/finefoods_fewshot.yaml``,
    ``accelerate/ddp`` for ``configs/accelerate/ddp.yaml``. Empty when the package ships none."""
    root = configs_dir()
    if not root.is_dir():
        return {}
    found = [p for p in root.rglob("*") if p.suffix in _SUFFIXES and p.is_file()]
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(found)}


def config_summary(path: Path) -> tuple[str, str]:
    """``(kind, description)`` of a built-in config file, read as text (no YAML needed): kind is ``experiment``,
    ``suite plan`` (a top-level ``tasks:`` key) or the sub-directory (``accelerate``); the description is the
    first comment line."""
    text = path.read_text(encoding="utf-8")
    first = next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), "")
    if path.parent != configs_dir():
        kind = path.parent.name
    elif re.search(r"^tasks:", text, re.M):
        kind = "suite plan"
    else:
        kind = "experiment"
    return kind, first


def resolve_config_path(ref: str | Path) -> Path:
    """The file a config argument names: ``ref`` itself when that file exists (a path always wins), else the
    built-in config named ``ref`` (a bare name such as ``finefoods_fewshot`` or ``accelerate/ddp``, no suffix),
    else ``ref`` unchanged (the caller reports it missing, with :func:`missing_config_hint`)."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    return builtin_configs().get(str(ref), path)


def missing_config_hint(ref: str | Path) -> str:
    """Words to add to "config file REF does not exist": the built-in name to use instead, or the names there are."""
    names = builtin_configs()
    stem = Path(ref).with_suffix("").name if Path(ref).suffix in _SUFFIXES else Path(ref).name
    if stem in names and str(ref) != stem:
        return f"; the built-in config of that name runs by name: {stem!r} (e.g. `flatpeft train {stem}`)"
    shown = [n for n in names if "/" not in n]
    if not shown:
        return ""
    return f"; built-in configs run by name: {', '.join(shown)} (`flatpeft configs` lists them)"


def doc_pages() -> dict[str, Path]:
    """``{page: path}`` of the shipped Markdown docs (``cli`` for ``docs/cli.md``)."""
    root = docs_dir()
    return {p.stem: p for p in sorted(root.glob("*.md"))} if root.is_dir() else {}
