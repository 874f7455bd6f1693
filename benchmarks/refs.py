"""Earlier commits as benchmark targets (``--compare-ref REF``): a git worktree per ref, run in place.

Issue #13 asks that a redesign keep the benchmark ratio within 5 % of the figure before it, measured
in the same run: a figure from another day on another load says nothing at 5 %. So the harness checks
REF out into a temporary worktree (``git worktree add --detach``) and runs that tree's proxy beside
the current one, in the same interleaved rounds, as extra targets named ``<target>@<label>``.

The ref runs with the current interpreter and ``PYTHONPATH=<worktree>``: its dependencies are the
current venv's (a ref that needs another dependency fails at start, with its log). The editable
install of the current tree hooks in after ``sys.path`` (setuptools' editable finder is appended to
``sys.meta_path``), so the worktree's package is the one imported; ``check_imports_from`` confirms
it before anything is measured. Worktrees are removed (``git worktree remove --force``) at the end,
on error too, and from ``atexit`` should the normal path be skipped.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The targets that have an ``@REF`` twin when a ref is compared (each only when it is selected).
COMPARABLE = ("affinity-proxy", "affinity-aiohttp", "affinity-fly", "affinity-fly-aiohttp", "affinity-new")
#: What a ref may be called on the command line (a branch, a tag, a commit, ``HEAD~3``); the label in
#: target names, file names and Markdown tables keeps to the same characters.
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/~^-]{0,99}")
_SHA = re.compile(r"[0-9a-f]{40}")
SEPARATOR = "@"


class RefError(RuntimeError):
    """A ref that is not a commit here, or a worktree that git would not add."""


def check_ref_syntax(ref: str) -> str:
    """``ref`` when it is a plausible git revision (no spaces, no ``@`` or ``,`` that would confuse
    target names and --targets, no leading ``-`` that git would read as an option)."""
    if not _REF.fullmatch(ref):
        raise ValueError(f"--compare-ref {ref!r}: a branch, tag or commit (letters, digits, . _ / ~ ^ -)")
    return ref


def ref_label(ref: str, sha: str) -> str:
    """The name a ref goes by in the tables: as given, but a full commit id shortened to 12."""
    return sha[:12] if _SHA.fullmatch(ref.lower()) else ref


def ref_target_name(base: str, label: str) -> str:
    """``affinity-proxy`` at ``pre-redesign`` is ``affinity-proxy@pre-redesign``."""
    if base not in COMPARABLE:
        raise ValueError(f"{base} has no @REF twin (only {', '.join(COMPARABLE)})")
    return f"{base}{SEPARATOR}{label}"


def split_target_name(name: str) -> tuple[str, str | None]:
    """``(base, label)``; ``label`` is None for a target of the current tree."""
    base, sep, label = name.partition(SEPARATOR)
    return (base, label) if sep else (name, None)


def mirrored(selected: Iterable[str]) -> list[str]:
    """The selected targets that get an ``@REF`` twin, in ``COMPARABLE`` order."""
    chosen = set(selected)
    return [name for name in COMPARABLE if name in chosen]


@dataclass(frozen=True)
class RefTree:
    """A ref checked out for the run: what was asked, the commit it is, and where it lies."""

    ref: str
    sha: str
    label: str
    path: Path

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment its processes run in: its tree first on ``sys.path``, nothing of ours."""
        env = dict(os.environ if base is None else base)
        env["PYTHONPATH"] = str(self.path)
        return env


def _git(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def resolve(ref: str) -> str:
    """The full commit id of ``ref`` in this repository."""
    proc = _git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{check_ref_syntax(ref)}^{{commit}}")
    if proc.returncode != 0 or not _SHA.fullmatch(proc.stdout.strip()):
        raise RefError(f"--compare-ref {ref}: not a commit in {ROOT} ({proc.stderr.strip() or 'unknown revision'})")
    return proc.stdout.strip()


class Worktrees:
    """The worktrees of one run. ``add`` checks a ref out; ``remove_all`` (called in a ``finally``, and
    registered with ``atexit`` in case that is skipped) removes every one of them, once."""

    def __init__(self) -> None:
        self.trees: list[RefTree] = []
        self._dirs: list[Path] = []
        atexit.register(self.remove_all)

    def add(self, ref: str) -> RefTree:
        sha = resolve(ref)
        label = ref_label(ref, sha)
        if any(t.label == label for t in self.trees):
            raise RefError(f"--compare-ref {ref} is given twice")
        parent = Path(tempfile.mkdtemp(prefix="affinity-bench-ref-"))
        self._dirs.append(parent)
        path = parent / sha[:12]
        proc = _git("worktree", "add", "--detach", str(path), sha)
        if proc.returncode != 0:
            raise RefError(f"git worktree add {path} {sha[:12]} failed: {proc.stderr.strip()}")
        tree = RefTree(ref, sha, label, path)
        self.trees.append(tree)
        return tree

    def remove_all(self) -> list[str]:
        """Remove the worktrees and their temp dirs; returns what could not be removed (also
        printed: a leftover is worth knowing about, never a reason to hide the run's result)."""
        problems: list[str] = []
        while self.trees:
            tree = self.trees.pop()
            proc = _git("worktree", "remove", "--force", str(tree.path))
            if proc.returncode != 0:
                problems.append(f"git worktree remove {tree.path}: {proc.stderr.strip()}")
        if problems:
            _git("worktree", "prune")
        while self._dirs:
            parent = self._dirs.pop()
            try:
                shutil.rmtree(parent)
            except FileNotFoundError:
                pass  # already gone with its worktree: nothing left to remove
            except OSError as exc:
                problems.append(f"rm -r {parent}: {exc}")
        for problem in problems:
            print(f"warning: {problem}", file=sys.stderr)
        return problems


def check_imports_from(tree: RefTree, python: str = sys.executable) -> Path:
    """Where ``affinity_proxy`` is imported from in ``tree``'s environment; a ``RefError`` unless it
    is the worktree (else the comparison would measure the current code twice)."""
    proc = subprocess.run([python, "-c", "import affinity_proxy; print(affinity_proxy.__file__)"],
                          capture_output=True, text=True, timeout=60, check=False, env=tree.env(), cwd=tree.path.parent)
    where = Path(proc.stdout.strip()) if proc.returncode == 0 else None
    if where is None or not where.resolve().is_relative_to(tree.path.resolve()):
        raise RefError(f"{tree.label}: affinity_proxy is imported from {where or proc.stderr.strip()}, "
                       f"not from its worktree {tree.path}")
    return where


def describe(trees: Sequence[RefTree]) -> str:
    """``label = sha`` for the report (the sha alone when it is the label)."""
    return ", ".join(t.label if t.label == t.sha[:12] else f"{t.label} = {t.sha[:12]}" for t in trees)
