"""Structural rules of the architecture page (docs/ARCHITECTURE.md), checked on the source tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "driveengine"
SOURCE_NAMES = ("nuplan", "openscene", "nuscenes")


def _python_files(*skip: str) -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if not any(part in p.parts for part in skip)]


def test_no_source_name_is_tested_outside_sources() -> None:
    """``if source == "nuplan"`` and its kin live in ``sources/`` only (and in ``synth/``, which writes
    those datasets' files): everything else asks the source through its protocol."""
    offenders = []
    for path in _python_files("sources", "synth"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                names = [
                    o.value for o in operands if isinstance(o, ast.Constant) and isinstance(o.value, str)
                ]
                names += [
                    e.value
                    for o in operands
                    if isinstance(o, ast.Tuple | ast.List | ast.Set)
                    for e in o.elts
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)
                ]
                if any(n in SOURCE_NAMES for n in names):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert offenders == []


def test_training_does_not_depend_on_collecting_or_synthesising() -> None:
    """No hidden upward dependency: train/, models/, data/ and evaluation/ import neither collect/,
    synth/ nor the demo."""
    pattern = re.compile(r"^\s*(from|import)\s+driveengine\.(collect|synth|demo)\b", re.M)
    offenders = [
        str(path.relative_to(PACKAGE.parent))
        for folder in ("train", "models", "data", "evaluation")
        for path in sorted((PACKAGE / folder).rglob("*.py"))
        if pattern.search(path.read_text())
    ]
    assert offenders == []
