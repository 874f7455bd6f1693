"""CLI presentation: aligned text tables, JSON/YAML dumps, durations, the pin balance summary and
the words that explain a session-check document.

Pure formatting: takes the JSON documents the admin API and session-check return (plain dicts) and
returns strings. No I/O, no click, nothing else of ours is imported.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

BAR_WIDTH = 30


def dump_json(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=False)


def dump_yaml(doc: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip("\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Iterable[int] = ()) -> str:
    """Columns padded to their widest cell; columns whose index is in ``right`` are right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    right_set = set(right)

    def line(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if i in right_set else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in cells)])


def duration(seconds: float | int | None) -> str:
    """``10800`` -> ``3h``; ``5400`` -> ``1h30m``; ``None`` or negative -> ``never``/``expired``."""
    if seconds is None:
        return "never"
    s = int(seconds)
    if s < 0:
        return "expired"
    if s == 0:
        return "0s"
    parts: list[str] = []
    for name, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            count, s = divmod(s, size)
            parts.append(f"{count}{name}")
        elif parts:
            break
        if len(parts) == 2:
            break
    return "".join(parts)


def pins_table(pins: Sequence[Mapping[str, Any]]) -> str:
    return table(("USER", "INSTANCE", "EXPIRES IN"),
                 ((p["user"], p["instance"], duration(p.get("expires_in"))) for p in pins), right=(2,))


def instances_table(instances: Sequence[Mapping[str, Any]]) -> str:
    return table(("ID", "STATE", "WEIGHT", "PINS", "URL"),
                 ((i["id"], i["state"], i["weight"], i["pins"], i.get("url") or "-") for i in instances),
                 right=(2, 3))


def pin_stats(instances: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pins per instance and balance: ``mean`` over all listed instances, ``balance`` = max / mean
    (1.0 is perfectly even; ``None`` when there are no pins). ``share`` is each instance's fraction;
    ``weighted_balance`` is the largest pins / (total * weight / sum of weights), 1.0 when every
    instance holds exactly its weighted share."""
    counts = [int(i.get("pins", 0)) for i in instances]
    weights = [max(int(i.get("weight", 1)), 0) for i in instances]
    live = [i.get("sessions") for i in instances]
    known = [int(n) for n in live if n is not None]
    total = sum(counts)
    mean = total / len(counts) if counts else 0.0
    peak = max(counts, default=0)
    weight_sum = sum(weights)
    ratios = [n * weight_sum / (total * w) for n, w in zip(counts, weights, strict=True) if w] if total else []
    return {
        "instances": [
            {"id": i["id"], "state": i["state"], "weight": i.get("weight", 1), "pins": n, "sessions": s,
             "share": round(n / total, 4) if total else 0.0}
            for i, n, s in zip(instances, counts, live, strict=True)
        ],
        # live sessions (pins + anonymous cookie sessions) as the answering node counts them; None
        # when the source does not count them
        "sessions": {"total": sum(known), "max": max(known),
                     "balance": round(max(known) * len(known) / sum(known), 3) if sum(known) else None}
                    if known else None,
        "total": total,
        "mean": round(mean, 2),
        "max": peak,
        "balance": round(peak / mean, 3) if mean else None,
        "weighted_balance": round(max(ratios), 3) if ratios else None,
    }


def stats_text(stats: Mapping[str, Any], width: int = BAR_WIDTH) -> str:
    peak = stats["max"]
    rows = []
    for i in stats["instances"]:
        bar = "#" * (round(width * i["pins"] / peak) if peak else 0)
        rows.append((i["id"], i["state"], i["weight"], i["pins"], f"{i['share'] * 100:.1f}%", bar))
    if stats.get("sessions") is not None:
        rows = [(*row[:4], "-" if i.get("sessions") is None else i["sessions"], *row[4:])
                for row, i in zip(rows, stats["instances"], strict=True)]
        body = table(("INSTANCE", "STATE", "WEIGHT", "PINS", "SESSIONS", "SHARE", ""), rows, right=(2, 3, 4, 5))
    else:
        body = table(("INSTANCE", "STATE", "WEIGHT", "PINS", "SHARE", ""), rows, right=(2, 3, 4))
    balance = "n/a" if stats["balance"] is None else f"{stats['balance']:.2f}"
    summary = f"total {stats['total']}  mean {stats['mean']:.2f}  max {stats['max']}  balance (max/mean) {balance}"
    if stats.get("weighted_balance") is not None and len({i["weight"] for i in stats["instances"]}) > 1:
        summary += f"  weighted {stats['weighted_balance']:.2f}"
    live = stats.get("sessions")
    if live is not None:
        ratio = "n/a" if live["balance"] is None else f"{live['balance']:.2f}"
        summary += f"\nlive sessions {live['total']}  max {live['max']}  balance (max/mean) {ratio}"
    return f"{body}\n\n{summary}"


def reap_text(doc: Mapping[str, Any]) -> str:
    reaped: Mapping[str, list[str]] = doc.get("reaped") or {}
    total = int(doc.get("total", 0))
    verb = "would drop" if doc.get("dry_run") else "dropped"
    noun = "pin" if total == 1 else "pins"
    if not total:
        return "dry run: nothing to reap" if doc.get("dry_run") else "nothing to reap"
    head = f"{'dry run: ' if doc.get('dry_run') else ''}{verb} {total} orphaned {noun}"
    lines = [head]
    for instance, users in reaped.items():
        shown = ", ".join(users[:10]) + (f", ... (+{len(users) - 10})" if len(users) > 10 else "")
        lines.append(f"  {instance}: {len(users)} ({shown})")
    return "\n".join(lines)


def rebalance_text(doc: Mapping[str, Any]) -> str:
    """The plan (``--dry-run``) or the moves of one rebalance pass."""
    if doc.get("skipped"):
        return "another process holds the rebalance lock (a pass is running there); nothing was moved"
    moves: list[Mapping[str, str]] = doc.get("moves") or []
    loads: Mapping[str, int] = doc.get("loads") or {}
    head = (f"live sessions: {', '.join(f'{k} {v}' for k, v in loads.items()) or 'none'}; "
            f"idle after {duration(doc.get('idle_threshold'))} unused; budget {doc.get('budget')} moves a pass")
    if not moves:
        return f"{head}\nnothing to move"
    verb = "would move" if doc.get("dry_run") else f"moved {doc.get('moved', 0)} of"
    lines = [head, f"{'dry run: ' if doc.get('dry_run') else ''}{verb} {len(moves)} idle pins"]
    flows: dict[tuple[str, str], list[str]] = {}
    for move in moves:
        flows.setdefault((move["from"], move["to"]), []).append(move["user"])
    for (source, target), users in sorted(flows.items()):
        shown = ", ".join(users[:5]) + (f", ... (+{len(users) - 5})" if len(users) > 5 else "")
        lines.append(f"  {source} -> {target}: {len(users)} ({shown})")
    return "\n".join(lines)


def _cookie_words(cookie: Mapping[str, Any] | None) -> str:
    if not cookie or not cookie.get("present"):
        return "cookie absent"
    if not cookie.get("valid"):
        problem = cookie.get("problem") or "invalid"
        return f"cookie invalid ({problem})"
    words = f"cookie names {cookie.get('instance')}"
    extra = []
    if cookie.get("age_seconds") is not None:
        extra.append(f"issued {duration(cookie['age_seconds'])} ago")
    if cookie.get("for_this_user") is False:
        extra.append("for another user, ignored")
    return f"{words} ({', '.join(extra)})" if extra else words


def _decision_words(decision: Mapping[str, Any] | None) -> str:
    if not decision:
        return "decision: unknown"
    action = decision.get("action")
    reason = decision.get("reason")
    if action == "refuse" or decision.get("instance") is None:
        return f"decision: {action or 'refuse'} because {reason}"
    words = f"decision: {action} to {decision['instance']} because {reason}"
    if decision.get("repin_reason"):
        words += f" ({decision['repin_reason']})"
    notes = []
    if decision.get("conflict"):
        notes.append("cookie and stored pin disagree, the pin wins")
    if decision.get("sets_cookie"):
        notes.append("sets the cookie")
    return f"{words}, {'; '.join(notes)}" if notes else words


def explain_session_check(doc: Mapping[str, Any]) -> str:
    """One sentence, then the node and instances:

    ``user alice: pinned to b (stored pin, expires in 3h); cookie absent; decision: forward to b because pin``
    """
    user = doc.get("user_key")
    pin = doc.get("pin")
    if user is None:
        who = f"anonymous request (no user key; a new session would hash to {doc.get('hash_instance') or 'nothing'})"
    elif pin and "expires_in" not in pin:  # a public answer leaves the expiry out
        who = f"user {user}: pinned to {pin['instance']} (stored pin)"
    elif pin:
        who = f"user {user}: pinned to {pin['instance']} (stored pin, expires in {duration(pin.get('expires_in'))})"
    else:
        who = f"user {user}: not pinned (hash chooses {doc.get('hash_instance') or 'nothing'})"
    parts = [who, _cookie_words(doc.get("cookie")), _decision_words(doc.get("decision"))]
    store = doc.get("store") or {}
    if store and not store.get("ok", True):
        parts.append(f"pin store ({store.get('kind')}) unavailable")
    lines = ["; ".join(parts)]
    node = f"node {doc.get('node')} (mode {doc.get('mode')}"
    if doc.get("region"):
        node += f", region {doc['region']}"
    lines.append(node + f", store {store.get('kind', '?')})")
    insts = doc.get("instances") or []
    if insts:
        lines.append("instances: " + ", ".join(
            f"{i['id']} {i['state']} ({i['pins']} {'pin' if i['pins'] == 1 else 'pins'})" if "pins" in i
            else f"{i['id']} {i['state']}" for i in insts))
    return "\n".join(lines)
