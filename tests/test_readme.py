"""README and docs stand alone: they reference nothing outside the repository, and the install and quick start they
give use things that exist (extras, constraints, the CI command, the lines the demo prints)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gradguard.demo import YOUR_LOOP

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SOURCES = sorted((ROOT / "src").rglob("*.py"))

# Material a user of the repository does not have: developer notes outside it, and their jargon.
FORBIDDEN = {
    "a path outside the repository": re.compile(r"(?<![\w.])\.\./"),
    "the developers' shared folder": re.compile(r"\bshared/", re.I),
    "the developers' guide": re.compile(r"\bGUIDE\.md\b", re.I),
    "a developer seed document": re.compile(r"\bseed 0\d+", re.I),
    "the seeds' notes": re.compile(r"\bseeds'|\bthe seeds\b", re.I),
}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", [README, *DOCS, *SOURCES], ids=_rel)
def test_no_reference_to_material_outside_the_repository(path):
    text = path.read_text(encoding="utf-8")
    found = [f"{what}: {m.group(0)!r} (line {text.count(chr(10), 0, m.start()) + 1})"
             for what, pattern in FORBIDDEN.items() for m in pattern.finditer(text)]
    assert not found, f"{_rel(path)} refers to what a user does not have: {found}"


def test_the_patterns_catch_what_they_are_for():  # the test above can fail
    bad = ["The data flow of `../shared/GUIDE.md`", "(seed 000: max_norm)", "The seeds' troubleshooting ritual"]
    for text in bad:
        assert any(p.search(text) for p in FORBIDDEN.values()), text
    fine = ["gradguard demo --seed 0", "shared by every entry point", "torch.manual_seed(0)", "docs/guard.md"]
    for text in fine:
        assert not any(p.search(text) for p in FORBIDDEN.values()), text


@pytest.mark.parametrize("path", [README, *DOCS], ids=_rel)
def test_relative_links_resolve_inside_the_repository(path):
    for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target):
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{_rel(path)} links to {target!r}"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_install_is_from_source_until_published():
    install = _section("Install")
    assert "not on PyPI yet" in install
    first_pip = install.index("pip install")
    assert install.index("not on PyPI yet") < first_pip and "git clone" in install[:first_pip]
    assert install[first_pip:].startswith('pip install -c constraints.txt -e ".[demo]"')
    # `pip install gradguard` only as the way once it is published
    for m in re.finditer(r"pip install \"?gradguard", install):
        assert "published" in install[max(0, m.start() - 200):m.start()]
    clone = re.search(r"git clone (\S+)", install).group(1)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'Homepage = "{clone}"' in pyproject


def test_the_extras_and_pins_the_readme_names_exist():
    pyproject = (ROOT / "pyproject.toml").read_text()
    extras = set(re.findall(r"^([a-z]+) = \[", pyproject.split("[project.optional-dependencies]", 1)[1], re.M))
    named = set(re.findall(r"\[([a-z]+)\]\"", README.read_text(encoding="utf-8")))
    assert named and named <= extras, named - extras
    assert re.search(r"^torch==2\.13\.0\+cpu$", (ROOT / "constraints.txt").read_text(), re.M)


def test_readme_test_command_is_the_one_ci_runs():
    command = 'pip install -c constraints.txt -e ".[dev]" && python -m pytest'
    assert f"```bash\n{command}\n```" in README.read_text(encoding="utf-8")
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_quick_start_shows_the_lines_the_demo_prints():
    assert f"```python\n{YOUR_LOOP}\n```" in _section("Quick start")


def test_every_exported_name_is_documented_and_every_documented_name_exists():
    import gradguard as gg

    readme = (ROOT / "README.md").read_text()
    exported = set(gg.__all__) - {"__version__"}
    undocumented = sorted(n for n in exported if f"gg.{n}" not in readme)
    assert undocumented == [], f"exported but not in the README's API tables: {undocumented}"
    mentioned = set(re.findall(r"`gg\.([A-Za-z_]\w*)", readme))
    missing = sorted(n for n in mentioned if not hasattr(gg, n))
    assert missing == [], f"the README names gg.{missing} but gradguard does not export them"
    assert all(hasattr(gg, n) for n in gg.__all__)
