"""Every functional and robustness test module also runs on the aiohttp engine (a twin module here
re-exports its tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
TWINS = [
    ("functional", TESTS / "aiohttp_engine", "test_functional_"),
    ("robustness", TESTS / "aiohttp_engine" / "robustness", "test_robustness_"),
]


@pytest.mark.parametrize(("suite", "where", "prefix"), TWINS, ids=[t[0] for t in TWINS])
def test_every_module_has_a_fast_engine_twin(suite: str, where: Path, prefix: str) -> None:
    originals = {p.stem.removeprefix("test_") for p in (TESTS / suite).glob("test_*.py")}
    twins = {p.stem.removeprefix(prefix) for p in where.glob(f"{prefix}*.py")}
    assert originals <= twins, f"add {where.relative_to(TESTS)}/{prefix}<name>.py for: {sorted(originals - twins)}"
    for name in originals:
        assert f"from tests.{suite}.test_{name} import *" in (where / f"{prefix}{name}.py").read_text()
