"""The docs' maps of the tree are checked against the tree, so they cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support import ROOT

PACKAGE = ROOT / "proxy"


def _modules_in_tree() -> set[str]:
    return {
        str(path.relative_to(ROOT))
        for path in PACKAGE.rglob("*.py")
        if path.name not in {"__init__.py", "__main__.py"} and "__pycache__" not in path.parts
    }


def _map_in(markdown: Path, heading: str) -> list[tuple[int, str]]:
    """(indent, name) of each entry in the first code block after `heading` that draws `proxy/`."""
    text = markdown.read_text()
    blocks = text[text.index(heading) :].split("```")[1::2]
    block = next(block for block in blocks if block.lstrip("\n").startswith("proxy/"))
    entries = []
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if match and (match.group(2).endswith((".py", "/"))):
            entries.append((len(match.group(1)), match.group(2)))
    return entries


def _paths(entries: list[tuple[int, str]]) -> set[str]:
    stack: list[tuple[int, str]] = []
    paths = set()
    for indent, name in entries:
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(part for _, part in stack) + name
        if name.endswith("/"):
            stack.append((indent, name))
        else:
            paths.add(path)
    return paths


def test_the_design_module_map_lists_every_module_and_nothing_else() -> None:
    listed = _paths(_map_in(ROOT / "docs" / "DESIGN.md", "## Module map"))
    tree = _modules_in_tree()
    assert sorted(tree - listed) == [], "modules missing from docs/DESIGN.md's module map"
    assert sorted(listed - tree) == [], "docs/DESIGN.md's module map lists modules that do not exist"


def test_the_readme_draws_every_package_and_nothing_else() -> None:
    drawn = {name for indent, name in _map_in(ROOT / "README.md", "## Architecture") if name.endswith("/")}
    packages = {f"{path.name}/" for path in PACKAGE.iterdir() if (path / "__init__.py").exists()} | {"proxy/"}
    assert drawn == packages


def test_every_package_says_what_it_is_for() -> None:
    for init in PACKAGE.rglob("__init__.py"):
        assert init.read_text().startswith('"""'), f"{init.relative_to(ROOT)} has no docstring"
