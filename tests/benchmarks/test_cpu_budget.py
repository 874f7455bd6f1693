"""The CPU budget (benchmarks/cpu_budget.py): pure parts only, on stacks shaped like py-spy's
``--native --format raw`` output. Stage attribution of the current tree's frames and of the tree
before #16 (``fastpath/``, ``web/``, ``forwarding/``), the figures over rounds, the before/after
section and how RESULTS.md keeps it (benchmarks/sections.py). Nothing is run or timed."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from benchmarks.cpu_budget import (
    BEFORE_REF,
    OTHER,
    STAGES,
    SYSCALLS,
    Budget,
    Figures,
    Run,
    figures_table,
    flagged_rounds,
    other_frames,
    parse_collapsed,
    section,
    stage_of,
    table,
)
from benchmarks.refs import RefTree
from benchmarks.sections import CPU_BUDGET, WS_BENCH, carry_sections, extract, write_section

ROOT = Path(__file__).resolve().parents[2]
LOOP = ("run_forever (loop.c:33397);uv_run (core.c:464);uv__io_poll (linux.c:1546);uv__stream_io (stream.c:1210);"
        "uv__read (stream.c:1154);loop___uv_stream_on_read (loop.c:113027)")
#: The fast engine's files before #16 (``git ls-tree a3d0e59^ affinity_proxy/fastpath``).
OLD_FASTPATH = ("closing", "counting", "exchange", "forward", "framing", "handoff", "head", "hot", "lane", "pool",
                "protocol", "response", "rewrite", "route", "server", "upstream", "wire")
#: Where a compared ref runs from (benchmarks/refs.py): py-spy may name its files by full path.
WORKTREE = "/tmp/affinity-bench-ref-x1y2/6117f7100000/affinity_proxy"


@pytest.mark.parametrize(("stack", "stage"), [
    (f"{LOOP};ClientConnection.data_received (affinity_proxy/engines/fast/protocol.py:134);"
     "RequestFraming._process (affinity_proxy/engines/fast/protocol.py:154)", "parse"),
    (f"{LOOP};make_route_input (affinity_proxy/proxy/resolve.py:68);CookieCodec._sign "
     "(affinity_proxy/routing/cookie.py:149);HMAC_Update (libcrypto.so.3)", "cookie"),
    (f"{LOOP};decide (affinity_proxy/routing/decide.py:140);HashRing.choose (affinity_proxy/routing/ring.py:32)",
     "decide"),
    (f"{LOOP};NewSessions.place (affinity_proxy/engines/fast/mint.py:210);HashRing.position "
     "(affinity_proxy/routing/ring.py:60);md5_update (md5module.c:1)", "decide"),
    (f"{LOOP};Forwarding._forward (affinity_proxy/engines/fast/exchange.py:120);UVStream__try_write (loop.c:106818);"
     "write (libc.so.6)", SYSCALLS),
    (f"{LOOP};ClientConnection.write (affinity_proxy/engines/fast/protocol.py:205);write (loop.c:110189)", "write"),
    (f"{LOOP};ResponseHead.feed (affinity_proxy/engines/fast/rewrite.py:300)", "write"),
    (f"{LOOP};UpstreamPool.acquire (affinity_proxy/engines/fast/upstream.py:57)", "pool"),
    (f"{LOOP};HotRoutes.get (affinity_proxy/engines/fast/route.py:200)", "exchange"),
    (f"{LOOP};upstream_head (affinity_proxy/engines/fast/rewrite.py:46)", "rewrite"),
    (f"{LOOP};Counts.flush (affinity_proxy/engines/fast/counting.py:80);inc (prometheus_client/values.py:20)",
     "metrics"),
    (LOOP, "event loop"),
    ("_run_module_as_main (<frozen runpy>:198)", OTHER),
])
def test_a_stack_goes_to_its_innermost_named_stage(stack: str, stage: str) -> None:
    assert stage_of(stack.split(";")) == stage


@pytest.mark.parametrize("prefix", ["affinity_proxy", WORKTREE])
@pytest.mark.parametrize(("frames", "stage"), [
    ("ClientConnection.data_received (P/fastpath/protocol.py:120);RequestFraming.feed (P/fastpath/framing.py:60)",
     "parse"),
    ("RequestFraming._head (P/fastpath/framing.py:90);RequestHead.__init__ (P/fastpath/head.py:40)", "parse"),
    ("Exchange.begin (P/fastpath/exchange.py:60);Router.route (P/fastpath/route.py:70)", "decide"),
    ("Exchange.begin (P/fastpath/exchange.py:60);resolve (P/web/resolve.py:50)", "decide"),
    ("Router.route (P/fastpath/route.py:70);decide (P/routing/decide.py:140);HashRing.get (P/routing/ring.py:30);"
     "get_node (uhashring/ring.py:200);hashi (uhashring/ring_ketama.py:40);_hashlib_openssl_md5 (_hashlib.so);"
     "EVP_DigestFinal_ex (libcrypto.so.3)", "decide"),
    ("Router.route (P/fastpath/route.py:70);CookieCodec.encode (P/routing/cookie.py:120);new (hmac.py:184);"
     "_hashlib_hmac_new_impl (_hashlib.so);EVP_MD_CTX_copy_ex (libcrypto.so.3)", "cookie"),
    ("Exchange.begin (P/fastpath/exchange.py:60);HotRoutes.get (P/fastpath/hot.py:40)", "exchange"),
    ("Forwarding.send (P/fastpath/forward.py:80);upstream_head (P/fastpath/rewrite.py:30)", "rewrite"),
    ("Forwarding.send (P/fastpath/forward.py:80);UpstreamPool.acquire (P/fastpath/pool.py:50)", "pool"),
    ("UpstreamConnection.data_received (P/fastpath/upstream.py:90)", "pool"),
    ("UpstreamConnection.data_received (P/fastpath/upstream.py:90);ResponseHead.feed (P/fastpath/response.py:40)",
     "write"),
    ("Forwarding.on_head (P/fastpath/forward.py:120)", "exchange"),
    ("Exchange.finish (P/fastpath/exchange.py:200);Counts.add (P/fastpath/counting.py:30)", "exchange"),
    ("forward_http (P/forwarding/http.py:40);filtered (P/forwarding/headers.py:60)", "rewrite"),
])
def test_the_tree_before_16_is_attributed_too(prefix: str, frames: str, stage: str) -> None:
    assert stage_of(f"{LOOP};{frames.replace('P/', prefix + '/')}".split(";")) == stage


@pytest.mark.parametrize("module", [
    *(f"fastpath/{name}.py" for name in OLD_FASTPATH),
    *(p.relative_to(ROOT / "affinity_proxy").as_posix()
      for p in sorted((ROOT / "affinity_proxy" / "engines" / "fast").glob("*.py")) if p.name != "__init__.py"),
])
def test_every_fast_engine_module_of_either_tree_names_a_stage(module: str) -> None:
    # a function of the module called from the loop: its stage, not the loop's nor "other"
    assert stage_of([*LOOP.split(";"), f"helper (affinity_proxy/{module}:10)"]) not in (OTHER, "event loop")


def test_collapsed_lines_are_counted_per_stage_and_junk_is_ignored() -> None:
    lines = [
        f"process 1:\"python\";{LOOP};upstream_head (affinity_proxy/engines/fast/rewrite.py:46) 7",
        f"{LOOP};epoll_pwait (libc.so.6) 3",
        "_run_module_as_main (<frozen runpy>:198);gc_collect (gcmodule.c:1) 2",
        "",
        "not a sample line",
    ]
    assert parse_collapsed(lines) == {"rewrite": 7, SYSCALLS: 3, OTHER: 2}
    assert other_frames(lines) == {"other: gc_collect (gcmodule.c:1) <- _run_module_as_main (<frozen runpy>:198)": 2}


def test_kernel_time_is_measured_and_user_time_split_by_samples_outside_syscalls() -> None:
    # 1000 requests, 10 ms user + 20 ms kernel: 10 µs user and 20 µs kernel per request.
    budget = Budget(requests=1000, user_seconds=0.010, sys_seconds=0.020,
                    per_stage={"parse": 30, "decide": 10, SYSCALLS: 960})
    assert budget.us_per_request == pytest.approx(30.0)
    assert budget.stage_us(SYSCALLS) == pytest.approx(20.0)
    assert budget.stage_us("parse") == pytest.approx(7.5)
    assert budget.stage_us("decide") == pytest.approx(2.5)
    assert budget.stage_us("cookie") == 0.0
    rendered = table(budget, "test")
    assert "| parse | 7.5 |" in rendered and "| **total** | **30.0** |" in rendered
    assert rendered.count("| parse |") == 1  # one row per stage, though several rules name it


def _budget(us: float, parse_share: float) -> Budget:
    """``us`` µs per request over 1000 requests, half kernel time, ``parse_share`` of the user time parse."""
    n = round(100 * parse_share)
    return Budget(1000, us / 2e3, us / 2e3, {"parse": n, "exchange": 100 - n, SYSCALLS: 50})


def test_figures_are_medians_per_stage_with_the_totals_spread() -> None:
    figures = Figures.of([_budget(40, 0.5), _budget(30, 0.5), _budget(50, 0.2)])
    assert figures.rounds == 3 and figures.requests == 3000
    assert (figures.total.median, figures.total.lo, figures.total.hi) == pytest.approx((40, 30, 50))
    assert figures.stage_us[SYSCALLS] == pytest.approx(20.0)
    assert figures.stage_us["parse"] == pytest.approx(7.5)  # median of 10, 7.5 and 5
    assert set(figures.stage_us) == set(STAGES)


def test_before_after_table_gives_both_columns_and_their_difference() -> None:
    before, after = Figures.of([_budget(40, 0.5)]), Figures.of([_budget(30, 0.5)])
    rendered = figures_table([("before (old)", before), ("after", after)])
    assert rendered.splitlines()[0] == "| stage | before (old) µs | after µs | after - before µs | change |"
    assert "| parse | 10.0 | 7.5 | -2.5 | -25 % |" in rendered
    assert "| cookie | 0.0 | 0.0 | +0.0 | - |" in rendered
    assert "| **total** (min-max) | **40.0** (40.0-40.0) | **30.0** (30.0-30.0) | **-10.0** | -25 % |" in rendered


def _section(ref: RefTree) -> str:
    rounds = [{"affinity-proxy": _budget(30, 0.4), f"affinity-proxy@{ref.label}": _budget(40, 0.5)},
              {f"affinity-proxy@{ref.label}": _budget(44, 0.5), "affinity-proxy": _budget(33, 0.4)}]
    run = Run("python -m benchmarks.cpu_budget --compare-ref a3d0e59^ --write", dt.datetime(2026, 12, 4, 13, 0),
              3.0, {"nproc": "2", "cpu": "a CPU", "kernel": "6.1", "versions": "python 3.11", "commit": "abc"},
              ("0.1", "0.2"), 2, 5.0, 400, 50)
    return section(run, ["affinity-proxy"], rounds, ref)


def test_the_section_has_before_and_after_per_target_between_its_markers() -> None:
    ref = RefTree(BEFORE_REF, "6117f71" + "0" * 33, BEFORE_REF, Path("/tmp/x"))
    text = _section(ref)
    assert text.startswith(CPU_BUDGET[0] + "\n## CPU budget (`make bench-budget`)\n") and text.endswith(CPU_BUDGET[1])
    assert "| stage | before (a3d0e59^) µs | after µs | after - before µs | change |" in text
    assert "| **total** (min-max) | **42.0** (40.0-44.0) | **31.5** (30.0-33.0) | **-10.5** | -25 % |" in text
    assert "`a3d0e59^` = 6117f7100000" in text
    assert "taken in the same round: 0.75." in text
    assert "- affinity-proxy: 42.0 → 31.5 µs per request (-25 %" in text
    assert "- flagged rounds (other work above 0.25 cores during a measurement; kept in the figures): none" in text
    assert "rounds are flagged" not in text


def test_a_round_with_other_work_is_flagged_and_kept() -> None:
    quiet, busy = _budget(30, 0.4), dataclasses.replace(_budget(40, 0.4), other_cpu=0.6)
    rounds = [{"a": quiet, "a@old": quiet}, {"a": quiet, "a@old": busy}]
    assert flagged_rounds(rounds) == [1]
    assert Figures.of([r["a@old"] for r in rounds]).total.hi == pytest.approx(40)


def test_the_section_is_replaced_in_place_and_kept_by_a_make_bench_rewrite(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    ws = f"{WS_BENCH[0]}\nws figures\n{WS_BENCH[1]}"
    results.write_text(f"# Benchmark results\n\nmedians\n\n{ws}\n")
    write_section(f"{CPU_BUDGET[0]}\nfirst\n{CPU_BUDGET[1]}", results, CPU_BUDGET)
    write_section(f"{CPU_BUDGET[0]}\nsecond\n{CPU_BUDGET[1]}", results, CPU_BUDGET)
    budget = f"{CPU_BUDGET[0]}\nsecond\n{CPU_BUDGET[1]}"
    assert results.read_text() == f"# Benchmark results\n\nmedians\n\n{ws}\n\n{budget}\n"
    # benchmarks.run writes the file whole: both sections come along, in the order the file had them
    assert carry_sections(results, "# a new run\n") == f"# a new run\n\n{ws}\n\n{budget}\n"
    # ... and a section the new text has already is not doubled
    assert carry_sections(results, f"# a new run\n\n{budget}\n") == f"# a new run\n\n{budget}\n\n{ws}\n"
    assert extract("no markers here", CPU_BUDGET) is None

