"""The routing core stays pure: importing it loads no I/O frameworks, and its source imports no clocks."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import affinity_proxy.routing

MODULES = ["model", "ring", "cookie", "userkey", "decide", "placement", "rebalance"]
FORBIDDEN_LOADED = ["aiohttp", "redis", "asyncio", "yaml", "prometheus_client", "click"]
# I/O, clocks and randomness must come in as arguments, never be imported by the pure core.
FORBIDDEN_IMPORTS = {
    "aiohttp", "redis", "asyncio", "yaml", "prometheus_client", "click", "socket", "ssl", "select",
    "selectors", "subprocess", "threading", "os", "time", "datetime", "random", "secrets", "logging",
}  # fmt: skip
ROUTING_DIR = Path(affinity_proxy.routing.__file__).parent


def test_importing_the_routing_core_loads_no_io_frameworks() -> None:
    imports = "; ".join(f"import affinity_proxy.routing.{m}" for m in MODULES)
    script = f"import sys, json; {imports}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    loaded = set(json.loads(out.stdout))
    for name in FORBIDDEN_LOADED:
        assert not any(m == name or m.startswith(name + ".") for m in loaded), f"{name} was imported"
    ours = {m for m in loaded if m.startswith("affinity_proxy")}
    assert ours <= {"affinity_proxy", "affinity_proxy.routing"} | {f"affinity_proxy.routing.{m}" for m in MODULES}


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_routing_sources_import_no_io_clocks_or_randomness() -> None:
    files = sorted(ROUTING_DIR.glob("*.py"))
    assert {f"{m}.py" for m in MODULES} <= {f.name for f in files}
    for path in files:
        for name in _imported_modules(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN_IMPORTS, f"{path.name} imports {name}"
            if top == "affinity_proxy":
                assert name.startswith("affinity_proxy.routing"), f"{path.name} imports {name} outside routing"
