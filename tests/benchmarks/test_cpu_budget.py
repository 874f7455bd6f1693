"""The CPU budget's stage attribution (benchmarks/cpu_budget.py): pure parts, on stacks shaped like
py-spy's ``--native --format raw`` output."""

from __future__ import annotations

import pytest

from benchmarks.cpu_budget import OTHER, SYSCALLS, Budget, parse_collapsed, stage_of, table

LOOP = ("run_forever (loop.c:33397);uv_run (core.c:464);uv__io_poll (linux.c:1546);uv__stream_io (stream.c:1210);"
        "uv__read (stream.c:1154);loop___uv_stream_on_read (loop.c:113027)")


@pytest.mark.parametrize(("stack", "stage"), [
    (f"{LOOP};ClientConnection.data_received (affinity_proxy/engines/fast/protocol.py:134);"
     "RequestFraming._process (affinity_proxy/engines/fast/protocol.py:154)", "parse"),
    (f"{LOOP};make_route_input (affinity_proxy/proxy/resolve.py:68);CookieCodec._sign "
     "(affinity_proxy/routing/cookie.py:149);HMAC_Update (libcrypto.so.3)", "cookie"),
    (f"{LOOP};decide (affinity_proxy/routing/decide.py:140);HashRing.choose (affinity_proxy/routing/ring.py:32)",
     "decide"),
    (f"{LOOP};Forwarding._forward (affinity_proxy/engines/fast/exchange.py:120);UVStream__try_write (loop.c:106818);"
     "write (libc.so.6)", SYSCALLS),
    (f"{LOOP};ClientConnection.write (affinity_proxy/engines/fast/protocol.py:205);write (loop.c:110189)", "write"),
    (f"{LOOP};UpstreamPool.acquire (affinity_proxy/engines/fast/upstream.py:57)", "pool"),
    (f"{LOOP};HotRoutes.get (affinity_proxy/engines/fast/route.py:200)", "exchange"),
    (f"{LOOP};upstream_head (affinity_proxy/engines/fast/rewrite.py:46)", "rewrite"),
    (LOOP, "event loop"),
    ("_run_module_as_main (<frozen runpy>:198)", OTHER),
])
def test_a_stack_goes_to_its_innermost_named_stage(stack: str, stage: str) -> None:
    assert stage_of(stack.split(";")) == stage


def test_collapsed_lines_are_counted_per_stage_and_junk_is_ignored() -> None:
    lines = [
        f"process 1:\"python\";{LOOP};upstream_head (affinity_proxy/engines/fast/rewrite.py:46) 7",
        f"{LOOP};epoll_pwait (libc.so.6) 3",
        "",
        "not a sample line",
    ]
    assert parse_collapsed(lines) == {"rewrite": 7, SYSCALLS: 3}


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
