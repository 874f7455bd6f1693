"""The report of ``benchmarks.scaling``: its results and their Markdown (benchmarks/SCALING.md).

Pure: no I/O, no clock, so the smoke test renders it from made-up figures. Every headline figure
is printed beside its same-run baseline and the ratio between them.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.scaling_cluster import ClusterResult
from benchmarks.scaling_common import fmt, md_table, mib, ratio
from benchmarks.scaling_pins import LatencyRow, PinStoreResult
from benchmarks.scaling_proxy import SETTLE, LoadRow, MemoryRun, VisitRound, ratio_2_to_1, ratios_2_to_1


@dataclass(slots=True)
class Results:
    args: dict[str, Any]
    command: str
    info: dict[str, str]
    started: dt.datetime
    load_before: str
    load_after: str = "?"
    seconds: float = 0.0
    pins: PinStoreResult | None = None
    cluster: ClusterResult | None = None
    backends: str = ""
    users: list[MemoryRun] = field(default_factory=list)
    visits: list[VisitRound] = field(default_factory=list)
    targets: list[tuple[str, str]] = field(default_factory=list)
    workers: list[list[LoadRow]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class UserCost:
    """One store's memory cost of distinct users: ``many`` users against ``one`` user."""

    store: str
    users: int
    rss_one_kib: int
    rss_many_kib: int
    per_user_bytes: float | None
    ratio: float | None  # RSS after many users ÷ RSS after one user
    redis_per_pin: float | None


def user_costs(runs: Sequence[MemoryRun]) -> list[UserCost]:
    """Memory per user from the first round (later rounds repeat it with fresh proxies)."""
    runs = [r for r in runs if r.round == 0]
    out = []
    for store in dict.fromkeys(r.store for r in runs):
        one = next((r for r in runs if r.store == store and r.users == 1), None)
        many = max((r for r in runs if r.store == store), key=lambda r: r.users)
        if one is None or many is one:
            continue
        delta = (many.rss_after_kib - one.rss_after_kib) * 1024
        per_pin = many.redis_delta / many.pins if many.redis_delta is not None and many.pins else None
        out.append(UserCost(store, many.users, one.rss_after_kib, many.rss_after_kib, delta / many.users,
                            ratio(many.rss_after_kib, one.rss_after_kib), per_pin))
    return out


@dataclass(frozen=True, slots=True)
class VisitRates:
    """One store's first-visit and repeat-visit rates through the proxy, per interleaved round."""

    store: str
    first: list[float]  # req/s, every request a new user's (a claim and a new cookie each)
    repeat: list[float]  # req/s, every request a returning user's (pin stored, no cookie)

    @property
    def ratios(self) -> list[float]:
        """repeat ÷ first per round: 1.0 = a first visit costs what a repeat visit does."""
        return [r / f for f, r in zip(self.first, self.repeat, strict=True) if f > 0]


def visit_rates(visits: Sequence[VisitRound]) -> list[VisitRates]:
    out = []
    for store in dict.fromkeys(v.store for v in visits):
        mine = sorted((v for v in visits if v.store == store), key=lambda v: v.round)
        out.append(VisitRates(store, [v.first_rps for v in mine], [v.repeat_rps for v in mine]))
    return out


def one_user_rates(runs: Sequence[MemoryRun]) -> list[VisitRates]:
    """The memory part's rates: ``users`` first visits against as many requests from ONE user
    (identical requests, which the fast engine's hot-route cache and the store serve best)."""
    out = []
    for store in dict.fromkeys(r.store for r in runs):
        one = next((r for r in runs if r.store == store and r.users == 1 and r.load.seconds), None)
        many = max((r for r in runs if r.store == store and r.load.seconds), key=lambda r: r.users, default=None)
        if one is not None and many is not None and many is not one:
            out.append(VisitRates(store, [many.load.requests / many.load.seconds],
                                  [one.load.requests / one.load.seconds]))
    return out


def _spread(values: Sequence[float], spec: str = ".2f") -> str:
    """median (min-max) of values."""
    if not values:
        return "-"
    return f"{statistics.median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"


def median_rows(rounds: Sequence[Sequence[LoadRow]]) -> list[LoadRow]:
    out = []
    for name in [x.target for x in rounds[0]] if rounds else []:
        rs = [x for rnd in rounds for x in rnd if x.target == name]
        out.append(LoadRow(name, statistics.median(x.rps for x in rs), statistics.median(x.p50_ms for x in rs),
                           statistics.median(x.p99_ms for x in rs), sum(x.errors for x in rs),
                           statistics.median(x.cpu for x in rs), statistics.median(x.busy for x in rs),
                           max(x.rss_kib for x in rs)))
    return out


def _latency_ms(s: Any) -> str:
    return f"{fmt(s.p50_ms, '.3f')} / {fmt(s.p99_ms, '.3f')} / {fmt(s.mean_ms, '.3f')}"


def _latency_table(rows: Sequence[LatencyRow]) -> str:
    header = ("operation", "concurrency", "RedisPinStore p50 / p99 / mean ms", "baseline",
              "baseline p50 / p99 / mean ms", "p50 ÷ base", "p99 ÷ base", "mean ÷ base", "store calls/s",
              "baseline calls/s", "errors")
    body = [(r.op, str(r.concurrency), _latency_ms(r.store), f"`{r.baseline_name}`", _latency_ms(r.baseline),
             fmt(ratio(r.store.p50_ms, r.baseline.p50_ms)), fmt(ratio(r.store.p99_ms, r.baseline.p99_ms)),
             fmt(ratio(r.store.mean_ms, r.baseline.mean_ms)), fmt(r.store.ops_per_s, ",.0f"),
             fmt(r.baseline.ops_per_s, ",.0f"), f"{r.store.errors} / {r.baseline.errors}") for r in rows]
    return md_table(header, body, left=1)


def _load_table(rows: Sequence[LoadRow]) -> str:
    header = ("target", "req/s", "p50 ms", "p99 ms", "errors", "target CPU (cores)", "machine CPU busy", "RSS MiB")
    body = [(r.target, f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.errors:,}", f"{r.cpu:.2f}",
             f"{r.busy:.0%}", mib(r.rss_kib)) for r in rows]
    return md_table(header, body)


def _pins_sections(p: PinStoreResult) -> tuple[list[str], list[str]]:
    """(summary bullets, sections) of the pin-store part."""
    plain = next(m for m in p.memory if m.layout == "plain SET")
    px = next(m for m in p.memory if m.layout == "SET PX")
    pin = next(m for m in p.memory if m.layout.startswith("pin, current"))
    old = next((m for m in p.memory if m.layout.startswith("pin, previous")), None)
    summary = [f"- Redis memory per pin: **{pin.per_item:.0f} B** = **{fmt(ratio(pin.per_item, plain.per_item))} x** "
               f"a plain `SET` key of the same size ({plain.per_item:.0f} B), "
               f"{fmt(ratio(pin.per_item, px.per_item))} x `SET ... PX` ({px.per_item:.0f} B); "
               f"{p.pins:,} pins = {pin.delta_bytes / 2**20:,.0f} MiB"
               + (f" (previous layout, same run: {old.per_item:.0f} B = {fmt(ratio(old.per_item, plain.per_item))} x)"
                  if old else "")]
    for r in p.latency:
        if r.op.startswith(("get, pin", "claim")):
            summary.append(f"- {r.op}, concurrency {r.concurrency}: p50 **{fmt(r.store.p50_ms, '.3f')} ms**, p99 "
                           f"**{fmt(r.store.p99_ms, '.3f')} ms** = {fmt(ratio(r.store.p50_ms, r.baseline.p50_ms))} x / "
                           f"{fmt(ratio(r.store.p99_ms, r.baseline.p99_ms))} x raw `{r.baseline_name}`")
    mem_rows = [(m.layout, f"{m.keys:,}", f"{m.delta_bytes / 2**20:,.1f}", f"{m.per_item:.1f}",
                 fmt(ratio(m.per_item, plain.per_item)), fmt(ratio(m.per_item, px.per_item))) for m in p.memory]
    sections = [
        f"## 1. Pin store: Redis memory with {p.pins:,} pins", "",
        "`used_memory` (INFO memory) before and after filling an empty redis-server with N items, each layout "
        "in turn (FLUSHALL between them). Keys are `<prefix>pin:{pN}user-NNNNNNNNNNN` (33-35 bytes, with the "
        "bucket's hash tag), values an instance id (5 bytes). Current layout: the pin key expires on a grid of "
        "pin_ttl/32 and is counted in its bucket's per-instance hash (field = expiry ms, value = pins), so the "
        "extra structures are a few hundred small hashes whatever N is. Previous layout (still read, see "
        "`affinity_proxy/pins/redis_legacy.py`): the pin also adds a member to its bucket's index of its "
        "instance (sorted set, score = expiry).",
        "",
        md_table(("layout", "keys in Redis", "used_memory Δ MiB", "bytes per item", "÷ plain SET", "÷ SET PX"),
                 mem_rows),
        "",
        "Where the bytes go:",
        "",
        *[f"- {b}" for b in p.breakdown],
        "",
        f"Fill of all layouts: {p.fill_seconds:.1f}s (pins through `redis-cli --pipe`, EVALSHA of the store's "
        "CLAIM script with `RedisPinStore.claim`'s keys and arguments). Checks that the layout is the proxy's:",
        "",
        *[f"- {c}" for c in p.checks],
        "",
        "## 2. Pin store: latency of `RedisPinStore` calls", "",
        f"{p.latency[0].store.n if p.latency else 0:,} calls per cell, random users, in interleaved blocks against "
        "the baseline: a raw redis-py asyncio client (`BlockingConnectionPool`, 50 connections, like the store's) "
        "on the same server. *get* is the store's GET+PTTL script; *claim* is the first-request compare-and-set "
        "(CLAIM script: GET, SET PXAT, HINCRBY, SADD). Latency is one loopback round trip plus redis-py's pure-Python "
        "client work (no hiredis); at concurrency 50 it is mostly queueing in the client's event loop, so compare "
        "the ratios and calls/s there.",
        "",
        _latency_table(p.latency),
        "",
    ]
    return summary, sections


def _cluster_sections(c: ClusterResult) -> tuple[list[str], list[str]]:
    """(summary bullets, sections) of the Redis Cluster part."""
    plain = next(m for m in c.memory if m.layout == "plain SET")
    pin = next(m for m in c.memory if m.layout.startswith("pin"))
    summary = [f"- Redis Cluster, {c.masters} masters: **{pin.per_item:.0f} B** per pin = "
               f"**{fmt(ratio(pin.per_item, plain.per_item))} x** a plain `SET` on the same cluster "
               f"({plain.per_item:.0f} B); pins per master {', '.join(f'{n:,}' for n in c.spread)}"]
    for row in c.latency:
        summary.append(f"- Redis Cluster {row.op}, concurrency {row.concurrency}: "
                       f"{fmt(row.store.ops_per_s, ',.0f')} calls/s = "
                       f"{fmt(ratio(row.store.ops_per_s, row.baseline.ops_per_s))} x the single Redis "
                       f"({fmt(row.baseline.ops_per_s, ',.0f')} calls/s, same run, interleaved)")
    rows = [(m.layout, f"{m.keys:,}", f"{m.delta_bytes / 2**20:,.1f}", f"{m.per_item:.1f}",
             fmt(ratio(m.per_item, plain.per_item))) for m in c.memory]
    sections = [
        f"## 2b. Pin store on a Redis Cluster of {c.masters} masters", "",
        f"{c.masters} cluster-enabled redis-servers (no replicas) on this machine, joined by `redis-cli --cluster "
        f"create`. Memory: {c.pins:,} items filled as in part 1, each command sent to the master owning its "
        "key's slot; `used_memory` summed over the masters. Calls: `RedisPinStore` on `redis+cluster://` against "
        "the same calls on the single redis-server of part 1, in interleaved blocks.",
        "",
        md_table(("layout", "keys in Redis", "used_memory Δ MiB", "bytes per item", "÷ plain SET"), rows),
        "",
        _latency_table(c.latency),
        "",
        "- How throughput grows with masters: each pin call touches one slot, so one master serves it and the "
        "masters share no work; with a core per master (and clients on their own cores) calls/s grow about "
        "linearly with masters until the clients or the network saturate, less the client's slot routing (the "
        "ratio above). On this 2-core box the 3 masters, the client and the other helpers' work share 2 cores, "
        "so the cluster cannot be faster here; the ratio is the client-side cost of a cluster, not its gain. "
        "A proxy worker is one Python process: one worker's store calls/s are bounded by its own core "
        "(redis-py's pure-Python client), so more masters pay off with more proxy workers and nodes.",
        "",
    ]
    return summary, sections


def _users_sections(r: Results) -> tuple[list[str], list[str]]:
    costs = user_costs(r.users)
    summary = [f"- proxy RSS per distinct user, {c.store} store: **{fmt(c.per_user_bytes, ',.0f')} B** "
               f"({mib(c.rss_many_kib)} MiB after {c.users:,} users vs {mib(c.rss_one_kib)} MiB after as many "
               f"requests from one user: {fmt(c.ratio)} x)" for c in costs]
    visits = visit_rates(r.visits)
    summary += [f"- repeat visits ÷ first visits through the proxy, {v.store} store: **{_spread(v.ratios)} x** "
                f"(median (min-max) of {len(v.ratios)} rounds; first {_spread(v.first, ',.0f')} req/s, repeat "
                f"{_spread(v.repeat, ',.0f')} req/s)" for v in visits]
    rows = [(str(u.round + 1), u.store, f"{u.users:,}", f"{u.load.requests:,}", f"{u.load.errors:,}", f"{u.pins:,}",
             mib(u.rss_start_kib),
             mib(u.rss_after_kib), mib(u.rss_after_kib - u.rss_start_kib), f"{u.load.seconds:.1f}",
             fmt(u.load.requests / u.load.seconds if u.load.seconds else None, ",.0f")) for u in r.users]
    users = max((u.users for u in r.users), default=0)
    sections = [
        f"## 3. Proxy memory with {users:,} distinct users", "",
        f"A fresh `affinity-proxy serve` (`engine: fast`, user key from the `X-User-Id` header) per row, in front "
        f"of {r.backends}. Each row sends {users:,} requests without cookies, from that many distinct users or from "
        f"one; RSS is VmRSS of the proxy's processes {SETTLE:g}s after start and after the load; *pins* is what the "
        f"store holds afterwards (admin `GET /instances`). Client: {r.users[0].load.client if r.users else '-'}.",
        "",
        md_table(("round", "store", "distinct users", "requests", "errors", "pins in store", "RSS start MiB",
                  "RSS after MiB", "Δ MiB", "load s", "req/s"), rows, left=2),
        "",
        *[f"- {c.store} store: ({mib(c.rss_many_kib)} - {mib(c.rss_one_kib)}) MiB / {c.users:,} users = "
          f"**{fmt(c.per_user_bytes, ',.0f')} B per user**"
          + (f"; Redis `used_memory` grew {fmt(c.redis_per_pin, ',.0f')} B per pin (same key layout as part 1; "
             "the proxy's pins were also touched)" if c.redis_per_pin else "")
          for c in costs],
        "- *req/s* of the 1-user rows is one user's requests again and again without a cookie: identical "
        "requests, which the fast engine's hot-route cache and per-user memos serve best; of the many-user rows, "
        "first visits (a claim and a new signed cookie each). Their ratio: "
        + "; ".join(f"{v.store} store {fmt(v.repeat[0], ',.0f')} ÷ {fmt(v.first[0], ',.0f')} = "
                    f"{fmt(v.ratios[0] if v.ratios else None)} x" for v in one_user_rates(r.users))
        + ". Part 3b compares first visits with real repeat visits.",
        "",
    ]
    if r.visits:
        n = r.visits[0].first_a.requests
        vrows = [(str(v.round + 1), v.store, f"{_rps(v.first_a):,.0f}", f"{v.repeat_rps:,.0f}",
                  f"{_rps(v.first_b):,.0f}", f"{v.repeat_rps / v.first_rps:.2f}" if v.first_rps else "-",
                  str(v.first_a.errors + v.repeat.errors + v.first_b.errors)) for v in r.visits]
        sections += [
            "## 3b. First visits against repeat visits", "",
            f"Per round and store, one fresh proxy (as above) and an empty Redis, three legs of about {n:,} requests, "
            "one per user, no cookies: *first A* = users 0..n-1 (each a claim and a new cookie), *repeat* = the "
            "same users again (pin stored: the claim-or-get call finds it; a new cookie each), *first B* = users "
            "n..2n-1. The repeat leg sits between the two first-visit legs, and the stores alternate in order per "
            "round, so a drift in the shared machine's load hits both; the ratio is repeat ÷ mean(first A, first B).",
            "",
            md_table(("round", "store", "first A req/s", "repeat req/s", "first B req/s", "repeat ÷ first", "errors"),
                     vrows, left=2),
            "",
        ]
    return summary, sections


def _rps(load: Any) -> float:
    return float(load.requests / load.seconds) if load.seconds else 0.0


def _workers_sections(r: Results) -> tuple[list[str], list[str]]:
    proxy, ng = ratio_2_to_1(r.workers, "proxy"), ratio_2_to_1(r.workers, "nginx")
    medians = median_rows(r.workers)
    busy = statistics.median(x.busy for x in medians) if medians else None
    summary = [f"- `serve --workers 2` ÷ `--workers 1`: **{fmt(proxy)} x** req/s (nginx 2 ÷ 1 workers in the same "
               f"rounds: {fmt(ng)} x); machine CPU {fmt(busy, '.0%')} busy during the loads"]
    a = r.args
    sections = [
        "## 4. `serve --workers 2` vs `--workers 1`", "",
        f"wrk -t{a['wrk_threads']} -c{a['connections']} -d{a['duration']:g}s per leg, {a['rounds']} round(s) after "
        f"a {a['warmup']:g}s warm-up per target; a round loads every target twice in mirrored order (A B C D D C B A; "
        "the table shows the mean of the two legs), so a drift in the machine's load hits every target alike. A pinned "
        "user (the proxy's own affinity cookie and `X-User-Id`), so requests take the cookie fast path. Both worker "
        "counts use the Redis store (`--workers 2` needs a shared store). Nothing is pinned to a CPU: wrk, the "
        "backends, Redis and the proxy share the machine's cores, so *machine CPU busy* near 100% means the box, "
        "not the proxy, is the limit.",
        "",
        *[f"- **{name}**: {what}" for name, what in r.targets],
        "",
        "Median over rounds (RSS: the largest seen):", "",
        _load_table(medians),
        "",
        f"- proxy `--workers 2` ÷ `--workers 1`: **{fmt(proxy)} x** (median of per-round ratios "
        f"{', '.join(f'{x:.2f}' for x in ratios_2_to_1(r.workers, 'proxy'))})",
        f"- nginx 2 workers ÷ 1 worker: **{fmt(ng)} x** (per round "
        f"{', '.join(f'{x:.2f}' for x in ratios_2_to_1(r.workers, 'nginx'))})",
        *_cpu_note(medians),
        "",
    ]
    for i, rnd in enumerate(r.workers, 1):
        sections += [f"Round {i}:", "", _load_table(rnd), ""]
    return summary, sections


def _cpu_note(medians: Sequence[LoadRow]) -> list[str]:
    by = {x.target: x for x in medians}
    one, two = by.get("proxy-w1"), by.get("proxy-w2")
    if one is None or two is None:
        return []
    return [f"- The proxy used {one.cpu:.2f} cores with 1 worker and {two.cpu:.2f} with 2, while the machine was "
            f"{one.busy:.0%} / {two.busy:.0%} busy: wrk, the nginx backends and Redis take the rest of the 2 cores, so "
            "a second worker has no idle core to run on. 2 ÷ 1 is what a second worker gains on this saturated box, "
            "not how the proxy scales on a machine with cores to spare.",
            EXPECTED_SCALING]


#: Not measured (this box has 2 cores): what the design lets one expect where every worker has a core.
EXPECTED_SCALING = (
    "- Expected with cores to spare (reasoning, not a measurement): the workers share nothing on a pinned request's "
    "path. The kernel spreads client connections over the workers' SO_REUSEPORT sockets, a valid cookie is "
    "verified in the worker without a store call, and each worker counts into its own memory-mapped prometheus-client "
    "file, merged only when `/metrics` is scraped. So req/s should grow about linearly with workers while each worker, "
    "the clients, the instances and Redis have cores of their own, as nginx's workers do: N workers ≈ N x the "
    "one-worker figure above, less SO_REUSEPORT's uneven hash over few client connections (wrk -c50 over 8 workers is "
    "about 6 connections each). What does not grow with workers is the shared store: first visits with a user key, "
    "re-pins and the reaper go to one Redis (one core; section 1 has the cost per call), or to a Redis Cluster's "
    "masters (section 2); new sessions without a user key and pinned requests never touch it.")


def report_markdown(r: Results) -> str:
    a = r.args
    summary: list[str] = []
    sections: list[str] = []
    parts = [_pins_sections(r.pins)] if r.pins else []
    parts += [_cluster_sections(r.cluster)] if r.cluster else []
    parts += [_users_sections(r)] if r.users else []
    parts += [_workers_sections(r)] if r.workers else []
    for s, body in parts:
        summary += s
        sections += body
    head = [
        "# Scaling measurements (issue #6, item 3)", "",
        "Generated by `python -m benchmarks.scaling` (see the docstrings of `benchmarks/scaling*.py`). The machine "
        "is shared, so every figure sits beside a baseline **measured in the same run** and the ratio is the result.",
        "",
        f"- date: {r.started.strftime('%Y-%m-%d %H:%M UTC')}; the run took {r.seconds / 60:.1f} min",
        f"- machine: {r.info.get('machine', '?')}",
        f"- versions: {r.info.get('versions', '?')}",
        f"- affinity-proxy: commit {r.info.get('commit', '?')}",
        f"- command: `{r.command}`",
        f"- sizes: {a['pins']:,} pins, {a['users']:,} users, {a['lookups']:,} timed store calls per cell",
        f"- load average before / after: {r.load_before} / {r.load_after} (other work on the machine adds noise)",
        "",
        "## Summary", "",
        *summary,
        *[f"- {s}" for s in r.skipped],
        "",
    ]
    notes = [
        "## Notes", "",
        "- Redis memory is `used_memory` (what Redis allocated), not RSS; jemalloc fragmentation comes on top.",
        "- The current pin costs about what `SET ... PX` costs: the per-instance counters are a few hundred small "
        "hashes whatever the number of pins; `list()` and the reaper find pins by an incremental SCAN (1,000 keys "
        "a step). The previous layout's extra cost was the index entry (sorted-set member + score, skiplist and "
        "dict node) per pin.",
        "- The machine was shared with other work (load averages above): throughput figures are noisy, so read "
        "the same-run ratios, and the medians with their min-max over interleaved rounds.",
        "- With the Redis store the proxy keeps a bounded near cache (`PinNearCache`, 100,000 entries) of recently "
        "seen pins for outages; past 100k users it stops growing. The memory store keeps every live pin in the "
        "process until its TTL (1 day by default) expires.",
        "- Latencies are loopback round trips on one machine; a network hop adds its own RTT to every store call.",
        "",
    ]
    return "\n".join(head + sections + notes)
