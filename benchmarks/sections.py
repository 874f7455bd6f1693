"""Sections of benchmarks/RESULTS.md that other harnesses own, between HTML-comment markers.

``make bench`` (``benchmarks.run``) writes RESULTS.md whole; ``make bench-ws`` and ``make bench-budget``
each own one section of it. A section lies between its two markers, is replaced in place by its own
harness (``write_section``), and is carried over as it stands when ``benchmarks.run`` rewrites the
file (``carry_sections``), so that no run drops another one's last figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

#: ``(begin, end)`` markers of the sections ``benchmarks.run`` carries over, in the order they are
#: appended when the file does not place them already.
WS_BENCH = ("<!-- ws-bench:begin -->", "<!-- ws-bench:end -->")
CPU_BUDGET = ("<!-- cpu-budget:begin -->", "<!-- cpu-budget:end -->")
CARRIED = (WS_BENCH, CPU_BUDGET)


def extract(text: str, markers: tuple[str, str]) -> str | None:
    """The section of ``text`` between ``markers``, markers included; None when it has none."""
    begin, end = markers
    start = text.find(begin)
    stop = text.find(end, start + len(begin)) if start >= 0 else -1
    return None if stop < 0 else text[start:stop + len(end)]


def replace_section(old: str, text: str, markers: tuple[str, str]) -> str:
    """``old`` with its section between ``markers`` replaced by ``text``, or ``text`` appended."""
    current = extract(old, markers)
    if current is not None:
        return old.replace(current, text, 1)
    return old.rstrip("\n") + "\n\n" + text + "\n" if old.strip() else text + "\n"


def write_section(text: str, path: Path, markers: tuple[str, str]) -> None:
    """Replace the section between ``markers`` in the file at ``path`` (or append it)."""
    old = path.read_text() if path.exists() else ""
    path.write_text(replace_section(old, text, markers))


def carry_sections(path: Path, text: str, sections: Sequence[tuple[str, str]] = CARRIED) -> str:
    """``text`` (a whole new RESULTS.md) with each of ``sections`` the file at ``path`` holds
    appended, in the order they appear there; one ``text`` already has is left as ``text`` has it."""
    old = path.read_text() if path.exists() else ""
    kept = [(old.index(found), found) for markers in sections
            if extract(text, markers) is None and (found := extract(old, markers)) is not None]
    for _, found in sorted(kept):
        text = text.rstrip("\n") + "\n\n" + found + "\n"
    return text
