"""The Python examples in docs/*.md run (each block in a fresh namespace), and their `# value` comments hold."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCKS = [
    (path.name, i, block)
    for path in (DOCS / "strategies.md", DOCS / "guard.md")
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))
]


@pytest.mark.parametrize(("doc", "index", "code"), BLOCKS, ids=[f"{d}-{i}" for d, i, _ in BLOCKS])
def test_doc_example_runs(doc, index, code):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"{doc}[{index}]", "exec"), {"__name__": "__doc_example__"})
    expected = [m.strip() for m in re.findall(r"print\(.*\)\s+#\s*(.+)", code)]
    assert out.getvalue().split("\n")[: len(expected)] == expected
