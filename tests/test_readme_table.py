"""README's bad-input table names a test for every row, and every test it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _table_rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("| bad input | what happens | tests |")
    block = text[start:text.index("\n\n", start)]
    return block.splitlines()[2:]


def _test_names(module: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / f"{module}.py").read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_bad_input_row_names_existing_tests():
    rows = _table_rows()
    assert len(rows) >= 40
    missing = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        named = re.findall(r"(test_\w+)::(test_\w+)", cells[-1])
        assert named, f"row names no test: {cells[0]}"
        missing += [f"{m}::{t}" for m, t in named if t not in _test_names(m)]
    assert not missing, missing
