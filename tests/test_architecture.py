"""The package layout keeps its promises (issue #13): no import circles, a small package root, no
private aiohttp imports nor private members of aiohttp objects (but the few listed with the reason
no public API does it), a pure ``routing/``, and each protocol header name defined in one module.

The import graph is read from the source with ``ast`` (nothing is imported), and counts every import:
module level, inside functions, and under ``if TYPE_CHECKING:`` (a type-only import still ties two
modules together for a reader). ``tests/routing/test_purity.py`` checks ``routing/`` by importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "affinity_proxy"
ROOT_MODULES_MAX = 5
#: Header names (and the idempotent-methods set) that must have exactly one defining module.
SINGLE_DEFINITION_LITERALS = (
    "fly-replay", "fly-replay-src", "fly-replay-failed", "fly-preferred-instance-unavailable",
    "fly-force-instance-id", "fly-prefer-instance-id", "x-fly-instance",
    "fly-client-ip", "fly-forwarded-proto", "fly-request-id",
    "x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip",
)
SINGLE_DEFINITION_NAMES = ("IDEMPOTENT_METHODS",)


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    """Every ``affinity_proxy`` module ``module`` imports (``from pkg import submodule`` counts the submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(r for a in node.names if (r := _resolve(a.name)) and a.name.startswith("affinity_proxy"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("affinity_proxy"):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                target = sub if sub in MODULES else _resolve(source)
                if target:
                    found.add(target)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module: _imports(module, path) for module, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_reports_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_type_checking_imports_are_edges(tmp_path: Path) -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from affinity_proxy.routing import model\n"
    path = tmp_path / "x.py"
    path.write_text(source)
    assert _imports("affinity_proxy.x", path) == {"affinity_proxy.routing.model"}


def test_no_import_circles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or ())


def test_no_import_circles_outside_the_fast_engine() -> None:
    graph = {m: {t for t in deps if not t.startswith("affinity_proxy.engines.fast.")}
             for m, deps in import_graph().items() if not m.startswith("affinity_proxy.engines.fast.")}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or ())


#: Engine-neutral layers: the request-handling rules both engines share and what they stand on.
NEUTRAL_LAYERS = ("proxy", "routing", "pins", "membership", "observability")
#: The one product module that may import ``devtools/``: the ``demo`` CLI command (a lazy import).
DEVTOOLS_USERS = ("affinity_proxy.cli.main",)


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("layer", NEUTRAL_LAYERS)
def test_neutral_layers_name_no_engine_and_no_devtools(layer: str) -> None:
    bad = {m: sorted(t for t in deps if _under(t, "affinity_proxy.engines") or _under(t, "affinity_proxy.devtools"))
           for m, deps in import_graph().items() if _under(m, f"affinity_proxy.{layer}")}
    assert {m: t for m, t in bad.items() if t} == {}


@pytest.mark.parametrize(("engine", "other"), [("fast", "aiohttp"), ("aiohttp", "fast")])
def test_engines_do_not_import_each_other(engine: str, other: str) -> None:
    bad = {m: sorted(t for t in deps if _under(t, f"affinity_proxy.engines.{other}"))
           for m, deps in import_graph().items() if _under(m, f"affinity_proxy.engines.{engine}")}
    assert {m: t for m, t in bad.items() if t} == {}


def test_the_product_never_imports_devtools() -> None:
    bad = {m: sorted(t for t in deps if _under(t, "affinity_proxy.devtools"))
           for m, deps in import_graph().items()
           if not _under(m, "affinity_proxy.devtools") and m not in DEVTOOLS_USERS}
    assert {m: t for m, t in bad.items() if t} == {}


def test_the_layer_checks_see_a_forbidden_import(tmp_path: Path) -> None:
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from affinity_proxy.engines.aiohttp import client\n")
    assert _imports("affinity_proxy.proxy.x", path) == {"affinity_proxy.engines.aiohttp.client"}


def test_package_root_is_small() -> None:
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= ROOT_MODULES_MAX, root


def _imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_private_aiohttp_imports() -> None:
    private = {m: sorted(n for n in _imported_names(p) if n.startswith("aiohttp.") and "._" in n[len("aiohttp"):])
               for m, p in MODULES.items()}
    assert {m: n for m, n in private.items() if n} == {}


#: aiohttp internals read on purpose: (module, member) -> why no public API does it. Every other
#: ``._name`` of an aiohttp object (an instance of an aiohttp class, or ``self``/``super()`` in a
#: subclass of one) fails ``test_no_private_aiohttp_members``.
AIOHTTP_PRIVATE_ALLOWED = {
    ("affinity_proxy.engines.aiohttp.server", "_messages"):
        "no public signal that the parser gave up mid-body (tests/engines/aiohttp/test_private_seams.py)",
    ("affinity_proxy.engines.aiohttp.server", "_reading_paused"):
        "BaseProtocol's flow-control state has no public reader (test_private_seams.py)",
    ("affinity_proxy.engines.aiohttp.server", "_buffer_paused"):
        "BaseProtocol's flow-control state has no public reader (test_private_seams.py)",
    ("affinity_proxy.engines.aiohttp.server", "_make_server"):
        "AppRunner takes no protocol class; the guarded protocol is swapped in where the server is made",
    ("affinity_proxy.engines.aiohttp.server", "_loop"): "Server.__call__, overridden to make the guarded protocol",
    ("affinity_proxy.engines.aiohttp.server", "_kwargs"): "Server.__call__, overridden to make the guarded protocol",
}
_NAMEDTUPLE_API = frozenset({"_replace", "_asdict", "_fields", "_make"})


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in _NAMEDTUPLE_API


def _aiohttp_private_names() -> frozenset[str]:
    """Private member names aiohttp's own source defines: methods, class attributes, ``__slots__``
    entries and ``self._x = ...`` attributes."""
    import aiohttp

    names: set[str] = set()
    for path in Path(aiohttp.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(node.name):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
                names.add(node.attr)
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__"
                                                      for t in node.targets):
                names.update(c.value for c in ast.walk(node.value)
                             if isinstance(c, ast.Constant) and isinstance(c.value, str) and _private(c.value))
    return frozenset(names)


def _aiohttp_bound(tree: ast.Module) -> set[str]:
    """Names this module binds to aiohttp objects by import (``web``, ``RequestHandler``, ...)."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "aiohttp":
            bound.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            bound.update(a.asname or a.name for a in node.names if a.name.split(".")[0] == "aiohttp")
    return bound


def _root(expr: ast.expr) -> str | None:
    while isinstance(expr, ast.Attribute):
        expr = expr.value
    return expr.id if isinstance(expr, ast.Name) else None


def _class_own(cls: ast.ClassDef) -> set[str]:
    """What a class defines itself: methods, class attributes, ``__slots__`` and ``self._x = ...``."""
    own: set[str] = {node.attr for node in ast.walk(cls) if isinstance(node, ast.Attribute) and isinstance(
        node.ctx, ast.Store) and isinstance(node.value, ast.Name) and node.value.id == "self"}
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            own.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            for target in targets:
                if isinstance(target, ast.Name):
                    own.add(target.id)
                    if target.id == "__slots__" and node.value is not None:
                        own.update(c.value for c in ast.walk(node.value)
                                   if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return own


def private_aiohttp_members(tree: ast.Module, aiohttp_names: frozenset[str]) -> set[str]:
    """``._name`` members of aiohttp objects this module touches: ``self._x``/``super()._x`` in a
    subclass of an aiohttp class when the subclass does not define ``_x`` itself (so a subclass that
    assigns one of aiohttp's own private attributes escapes: reads are what break on an upgrade),
    and ``obj._x`` on any other object when ``_x`` is a private member aiohttp defines."""
    bound = _aiohttp_bound(tree)
    found: set[str] = set()
    in_subclass: set[int] = set()
    for cls in ast.walk(tree):
        if isinstance(cls, ast.ClassDef) and any(_root(b) in bound for b in cls.bases):
            own = _class_own(cls)
            for node in ast.walk(cls):
                if not isinstance(node, ast.Attribute) or not _private(node.attr):
                    continue
                value = node.value
                is_self = isinstance(value, ast.Name) and value.id in ("self", "cls")
                is_super = (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                            and value.func.id == "super")
                if is_self or is_super:
                    in_subclass.add(id(node))
                    if is_super or node.attr not in own:  # super() always reaches aiohttp's
                        found.add(node.attr)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in in_subclass and _private(node.attr):
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if node.attr in aiohttp_names:
                found.add(node.attr)
    return found


def test_no_private_aiohttp_members() -> None:
    aiohttp_names = _aiohttp_private_names()
    found = {(module, name) for module, path in MODULES.items()
             for name in private_aiohttp_members(ast.parse(path.read_text()), aiohttp_names)}
    assert found - AIOHTTP_PRIVATE_ALLOWED.keys() == set(), "new private aiohttp members read"
    assert AIOHTTP_PRIVATE_ALLOWED.keys() - found == set(), "no longer read: drop from AIOHTTP_PRIVATE_ALLOWED"


def test_the_private_member_check_sees_both_kinds() -> None:
    source = (
        "from aiohttp.web_protocol import RequestHandler\n"
        "class H(RequestHandler):\n"
        "    __slots__ = ('_mine',)\n"
        "    def f(self, request):\n"
        "        self._mine = 1\n"
        "        return self._messages, super()._make_server(), request._payload, request._replace\n"
    )
    assert private_aiohttp_members(ast.parse(source), _aiohttp_private_names()) == {
        "_messages", "_make_server", "_payload"}


def test_routing_imports_no_io() -> None:
    for module, path in MODULES.items():
        if not module.startswith("affinity_proxy.routing"):
            continue
        roots = {name.split(".")[0] for name in _imported_names(path)}
        assert not roots & {"aiohttp", "asyncio", "redis", "socket", "httptools"}, (module, roots)
        ours = {n for n in _imported_names(path) if n.startswith("affinity_proxy.")}
        assert all(n.startswith("affinity_proxy.routing") for n in ours), (module, ours)


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _literal_modules() -> dict[str, set[str]]:
    """For each watched header name: the modules whose code (not docstrings) spells it out, alone or
    as the start of a header line."""
    where: dict[str, set[str]] = {name: set() for name in SINGLE_DEFINITION_LITERALS}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and id(node) not in skip and isinstance(node.value, (str, bytes)):
                value = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
                name = value.lower().split(":", 1)[0]  # a header line ("X-Request-Id: ") names it too
                if name in where:
                    where[name].add(module)
    return where


def test_each_header_name_is_spelled_out_once() -> None:
    spread = {name: sorted(mods) for name, mods in _literal_modules().items() if len(mods) != 1}
    assert spread == {}, spread


def test_each_shared_constant_is_defined_once() -> None:
    for name in SINGLE_DEFINITION_NAMES:
        defined = set()
        for module, path in MODULES.items():
            for node in ast.parse(path.read_text()).body:
                targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
                if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
                        isinstance(t, ast.Name) and t.id == name for t in targets):
                    defined.add(module)
        assert len(defined) == 1, (name, sorted(defined))
