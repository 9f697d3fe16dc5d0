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


def _full_imports(path: Path) -> set[str]:
    """Dotted module names ``path`` imports anywhere (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


MEASURING = ["craft/evaluate", "craft/sample.py", "craft/models", "craft/data", "craft/promote.py", "craft/losses.py"]


def test_measuring_and_generation_never_import_training():
    """STYLE 11 / DESIGN: how a model is sampled and scored never depends on how it was trained."""
    offenders = []
    for where in MEASURING:
        p = ROOT / where
        for path in [p] if p.is_file() else sorted(p.rglob("*.py")):
            bad = sorted(m for m in _full_imports(path) if m == "craft.train" or m.startswith("craft.train."))
            if bad:
                offenders.append(f"{path.relative_to(ROOT)}: {bad}")
    assert not offenders, offenders


def test_importing_evaluate_and_sample_loads_no_training_module():
    """The same at run time, every lazy import executed: evaluate's entry points and sampling, in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import sys, craft.evaluate, craft.evaluate.run, craft.evaluate.controlnet_eval, craft.sample, craft.promote\n"
        "bad = sorted(m for m in sys.modules if m.startswith('craft.train'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", out.stdout
