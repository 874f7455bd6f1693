"""The fast engine's pure parts: chunk boundaries, the hot-route cache's validity rules, the
response-head cache and the request-head filter. No sockets."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from affinity_proxy.config import Config, CookieConfig, InstanceConfig, UserKeySourceConfig
from affinity_proxy.engines.fast.rewrite import ResponseCache, ResponseHead
from affinity_proxy.engines.fast.route import HotRoutes, RequestHead
from affinity_proxy.engines.fast.wire import ChunkedEnd, RequestIds, answer_bytes, connection_tokens
from affinity_proxy.proxy import act
from affinity_proxy.routing.decide import DecidePolicy, DecisionReason, Route, RouteInput, decide
from affinity_proxy.routing.model import InstanceId, InstanceState
from affinity_proxy.serve.app import build_context

# --------------------------------------------------------------------------- ChunkedEnd


def chunked(sizes: list[int], trailers: bytes = b"", ext: bytes = b"") -> bytes:
    return b"".join(b"%x%s\r\n%s\r\n" % (n, ext, b"x" * n) for n in sizes) + b"0\r\n" + trailers + b"\r\n"


@given(
    sizes=st.lists(st.integers(1, 300), max_size=6),
    trailers=st.sampled_from([b"", b"X-T: 1\r\n", b"A: 1\r\nB: 2\r\n"]),
    ext=st.sampled_from([b"", b";a=1", b';n="v"']),
    cuts=st.lists(st.integers(1, 2000), max_size=8),
    after=st.binary(max_size=40),
)
def test_chunked_end_finds_the_end_whatever_the_reads(sizes, trailers, ext, cuts, after) -> None:
    body = chunked(sizes, trailers, ext)
    stream = body + after
    points = sorted({c for c in cuts if c < len(stream)})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    scanner = ChunkedEnd()
    consumed = 0
    for piece in pieces:
        if scanner.done:
            break
        n = scanner.feed(piece)
        consumed += n
        assert n == len(piece) or scanner.done
    assert scanner.done and consumed == len(body)


@pytest.mark.parametrize("bad", [b"zz\r\n", b"-1\r\n", b"\r\n"])
def test_chunked_end_claims_everything_on_syntax_llhttp_rejects(bad: bytes) -> None:
    scanner = ChunkedEnd()
    assert scanner.feed(bad + b"rest") == len(bad) + 4 and not scanner.done


# --------------------------------------------------------------------------- small wire helpers


def test_request_ids_are_unique_and_cheap() -> None:
    ids = RequestIds()
    got = {ids() for _ in range(1000)}
    assert len(got) == 1000 and all(len(i) == 21 for i in got)


def test_connection_tokens_ignore_the_standard_ones() -> None:
    assert connection_tokens([b"keep-alive, Upgrade", b"close"]) == frozenset()
    assert connection_tokens([b"keep-alive, X-Secret", b" x-other "]) == {b"x-secret", b"x-other"}


def test_answer_bytes_frame_the_shared_answer() -> None:
    data = answer_bytes(act.error(503, "no instance can serve this request", "no_routable_instance",
                                  (("Retry-After", "5"),)))
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\n")
    assert body == b'{"error": "no_routable_instance", "message": "no instance can serve this request", "status": 503}'


def test_response_head_filters_as_it_parses() -> None:
    head = ResponseHead()
    for name, value in [(b"Server", b"x"), (b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"),
                        (b"X-Fly-Instance", b"spoofed"), (b"Content-Length", b"3"), (b"Date", b"d"),
                        (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"X-Bad", b"\xff\xfe")]:
        head.add(name, value)
    assert head.block() == b"Server: x\r\nContent-Length: 3\r\nDate: d\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
    assert (head.length, head.has_date, head.odd, head.chunked) == (3, True, False, False)
    chunked_head = ResponseHead()
    chunked_head.add(b"Content-Length", b"3")
    chunked_head.add(b"Transfer-Encoding", b"chunked")
    chunked_head.add(b"Connection", b"X-Hop")
    assert chunked_head.block() == b"" and chunked_head.odd


def test_response_cache_matches_only_a_whole_known_message() -> None:
    cache = ResponseCache()
    head = ResponseHead()
    head.status, head.reason = 200, b"OK"
    head.add(b"Content-Length", b"3")
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
    cache.remember(raw + b"abcd", head, head_only=False)  # not exactly one message: not kept
    assert cache.match(raw + b"abc", head_only=False) is None
    cache.remember(raw + b"abc", head, head_only=False)
    assert cache.match(raw + b"xyz", head_only=False) == (head, b"xyz")
    assert cache.match(raw + b"xy", head_only=False) is None, "a partial body goes through llhttp"
    assert cache.match(raw, head_only=True) == (head, b"")
    assert cache.match(raw.replace(b"OK", b"Ok") + b"abc", head_only=False) is None


# --------------------------------------------------------------------------- the hot-route cache

SECRET = "unit-secret-0123456789abcdef"


@pytest.fixture
def ctx():  # type: ignore[no-untyped-def]
    config = Config(listen="127.0.0.1:0", admin_listen="127.0.0.1:0", engine="fast",
                    instances=(InstanceConfig("a", "http://127.0.0.1:1"), InstanceConfig("b", "http://127.0.0.1:2")),
                    cookie=CookieConfig(secret=SECRET, revalidate_after=60),
                    user_key=(UserKeySourceConfig("header", "X-User-Id"),))
    return build_context(config)


def head_with(**headers: bytes) -> RequestHead:
    head = RequestHead()
    head.method, head.target = "GET", b"/"
    for name, value in headers.items():
        head.first[name.replace("_", "-").encode()] = value
    return head


def cookie_input(ctx, issued: float, user: str | None = None) -> tuple[RouteInput, bytes]:  # type: ignore[no-untyped-def]
    digest = ctx.codec.user_digest(user)
    raw = ctx.codec.encode(InstanceId("a"), int(issued), digest)
    cookie = ctx.codec.decode(raw, time.time())
    return RouteInput(user_key=user, user_digest=digest, cookie=cookie, now=time.time()), raw.encode()


def test_a_fresh_cookie_decision_is_reused_until_it_goes_stale(ctx) -> None:  # type: ignore[no-untyped-def]
    hot = HotRoutes(ctx, fly=False)
    issued = int(time.time()) - 10
    inp, raw = cookie_input(ctx, issued, "u1")
    decision = decide(inp, ctx.membership.current(), ctx.policy)
    assert isinstance(decision, Route) and decision.reason is DecisionReason.COOKIE and not decision.set_cookie
    key = hot.key(head_with(cookie=b"fly-instance-id=" + raw, x_user_id=b"u1"))
    assert key is not None
    hot.put(key, decision, inp, None)
    assert hot.get(key, time.time()).decision is decision
    assert hot.get(key, issued + 59.9) is not None
    assert hot.get(key, issued + 60) is None, "stale at revalidate_after, exactly as decide()"


def test_the_cache_forgets_on_membership_policy_codec_and_config_changes(ctx) -> None:  # type: ignore[no-untyped-def]
    hot = HotRoutes(ctx, fly=False)
    inp, raw = cookie_input(ctx, time.time())
    decision = decide(inp, ctx.membership.current(), ctx.policy)
    head = head_with(cookie=b"fly-instance-id=" + raw)
    key = hot.key(head)

    def cached() -> bool:
        hot.put(key, decision, inp, None)
        return hot.get(key, time.time()) is not None

    assert cached()
    ctx.membership.set_health(InstanceId("b"), False)  # any snapshot swap
    assert hot.get(key, time.time()) is None
    assert cached()
    ctx.policy = DecidePolicy(revalidate_after=5)
    assert hot.get(key, time.time()) is None
    assert cached()
    ctx.config = replace(ctx.config, pin_ttl=5)
    assert hot.get(key, time.time()) is None
    assert ctx.membership.current().state_of("b") is InstanceState.DOWN


def test_decisions_that_write_or_set_cookies_are_never_cached(ctx) -> None:  # type: ignore[no-untyped-def]
    hot = HotRoutes(ctx, fly=False)
    inp, _ = cookie_input(ctx, time.time())
    key = ("k",)
    for route in (Route(InstanceId("a"), DecisionReason.NEW, set_cookie=True),
                  Route(InstanceId("a"), DecisionReason.COOKIE, set_cookie=True),
                  Route(InstanceId("a"), DecisionReason.PIN, touch=True),
                  Route(InstanceId("a"), DecisionReason.HASH)):
        hot.put(key, route, inp, None)
        assert hot.get(key, time.time()) is None
    hot.put(key, Route(InstanceId("a"), DecisionReason.COOKIE), replace(inp, avoid={InstanceId("b"): None}), None)
    assert hot.get(key, time.time()) is None


def test_fly_replay_headers_bypass_the_cache(ctx) -> None:  # type: ignore[no-untyped-def]
    hot = HotRoutes(ctx, fly=True)
    assert hot.key(head_with(fly_replay_src=b"instance=x")) is None
    assert hot.key(head_with(fly_preferred_instance_unavailable=b"x")) is None
    assert hot.key(head_with(cookie=b"c=1")) is not None
