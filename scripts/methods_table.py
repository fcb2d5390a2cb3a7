#!/usr/bin/env python
"""Rewrite the generated tables of the docs from the code (``python scripts/methods_table.py``): the methods table
of docs/methods.md (from the registry) and the config key table of docs/cli.md (from the config fields' help)."""
from pathlib import Path

import flatpeft
from flatpeft.experiments.config import config_key_table
from flatpeft.optim.registry import methods_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def rewrite(doc: Path, marker: str, table: str) -> None:
    begin, end = f"<!-- {marker}: begin -->", f"<!-- {marker}: end -->"
    text = doc.read_text(encoding="utf-8")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{table}\n{end}{tail}", encoding="utf-8")
    print(f"wrote {doc}")


rewrite(DOCS / "methods.md", "methods-table", methods_table(flatpeft.METHODS))
rewrite(DOCS / "cli.md", "config-keys", config_key_table())
