#!/usr/bin/env python
"""Rewrite the methods table of docs/methods.md from the registry (``python scripts/methods_table.py``)."""
from pathlib import Path

import flatpeft
from flatpeft.optim.registry import methods_table

DOC = Path(__file__).resolve().parent.parent / "docs" / "methods.md"
BEGIN, END = "<!-- methods-table: begin -->", "<!-- methods-table: end -->"

text = DOC.read_text(encoding="utf-8")
head, rest = text.split(BEGIN, 1)
_, tail = rest.split(END, 1)
DOC.write_text(f"{head}{BEGIN}\n{methods_table(flatpeft.METHODS)}\n{END}{tail}", encoding="utf-8")
print(f"wrote {DOC}")
