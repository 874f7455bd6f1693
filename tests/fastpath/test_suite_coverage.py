"""Every functional test module also runs on the fast engine (a twin module here re-exports it)."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_functional_module_has_a_fast_engine_twin() -> None:
    functional = {p.stem.removeprefix("test_") for p in (TESTS / "functional").glob("test_*.py")}
    twins = {p.stem.removeprefix("test_functional_") for p in (TESTS / "fastpath").glob("test_functional_*.py")}
    assert functional <= twins, f"add tests/fastpath/test_functional_<name>.py for: {sorted(functional - twins)}"
    for name in functional:
        text = (TESTS / "fastpath" / f"test_functional_{name}.py").read_text()
        assert f"from tests.functional.test_{name} import *" in text
