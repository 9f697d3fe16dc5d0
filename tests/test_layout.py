"""The arrows go one way: cli / components / pipelines -> craft; craft never imports kfp or them."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("kfp", "components", "pipelines")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_craft_never_imports_orchestration():
    offenders = []
    for path in (ROOT / "craft").rglob("*.py"):
        if path.name == "cli.py" and path.parent.name == "craft":
            continue  # the CLI sits on top (DESIGN.md) and imports pipelines lazily
        bad = _imports(path) & set(FORBIDDEN)
        if bad:
            offenders.append(f"{path.relative_to(ROOT)}: {sorted(bad)}")
    assert not offenders, offenders


def test_components_have_no_packages_to_install_and_future_annotations():
    for path in list((ROOT / "components").glob("*.py")) + list((ROOT / "pipelines").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"packages_to_install\s*=", text), path
        if "@dsl." in text:
            assert not re.search(r"^from __future__ import annotations", text, re.M), (
                f"{path}: KFP needs real annotations"
            )
