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


def test_every_guard_mode_has_its_memory_documented():
    """Issue 11: every way to guard a step states its memory as a multiple of the parameter bytes, in the user's docs
    and in the Guard's docstring."""
    import gradguard as gg

    text = (DOCS / "guard.md").read_text()
    table = text[text.index("## Memory: what each mode holds"):text.index("## Deciding on the device")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    for mode in ('param_check="auto"', "check_params_every=None", 'param_check="backup"', 'on_nonfinite="rollback"',
                 "host_sync=False` with a fused", "host_sync=False` with any other"):
        (row,) = [r for r in rows if mode in r]
        cost = row.strip("|").split("|")[1]
        assert re.search(r"\d|none|only", cost), row  # a figure, not a blank
    doc = gg.Guard.__init__.__doc__ or gg.Guard.__doc__ or ""
    for mode, cost in (('"preflight"', "1% of the parameter bytes"), ('"backup"', "3x the parameter bytes")):
        assert mode in doc and cost in doc, (mode, cost)
