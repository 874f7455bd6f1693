"""routing.replay: fly-replay formatting/parsing tables, round trips, the header parsers of replayed
requests, every rule of plan(), and hypothesis properties (parsers never raise, format never emits
an injectable character, plan never replays to itself nor twice)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_proxy.routing.decide import RepinReason
from affinity_proxy.routing.model import Instance, InstanceId, InstanceState, MembershipView, is_valid_instance_id
from affinity_proxy.routing.replay import (
    MAX_REPLAY_BODY,
    OUR_STATE_MARKER,
    BodyInfo,
    LocalForward,
    PlanReason,
    PrivateForward,
    Replay,
    ReplayFailed,
    ReplayInstruction,
    ReplaySource,
    body_replayable,
    carries_our_marker,
    format_duration,
    format_replay_header,
    parse_duration,
    parse_replay_failed,
    parse_replay_header,
    parse_replay_instruction,
    parse_replay_src,
    parse_unavailable,
    plan,
    replay_header_for,
    triage,
)

I = InstanceId  # noqa: E741
GET = BodyInfo("GET", None, False)
SRC = ReplaySource(I("other1"), "lcl", 1754400000000000, OUR_STATE_MARKER)
HEADER = "instance=b;state=affinity;timeout=10s;fallback=prefer_self"

# ------------------------------------------------------------------ format_replay_header


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("00bb33ff",), {}, "instance=00bb33ff"),
        ((), {"region": "sjc"}, "region=sjc"),
        ((), {"region": ["iad", "ord", "us", "na"]}, 'region="iad,ord,us,na"'),
        ((), {"region": "sjc,any", "app": "target-app"}, 'region="sjc,any";app=target-app'),
        ((), {"region": ("sjc",)}, "region=sjc"),
        ((), {"app": "my-worker", "timeout": 10, "fallback": "force_self"},
         "app=my-worker;timeout=10s;fallback=force_self"),
        ((), {"prefer_instance": "m1", "timeout": 0.8, "fallback": "prefer_self"},
         "prefer_instance=m1;timeout=800ms;fallback=prefer_self"),
        (("m1",), {"state": "affinity"}, "instance=m1;state=affinity"),
        (("m1",), {"state": "a.b:c-d_e"}, "instance=m1;state=a.b:c-d_e"),
        ((), {"elsewhere": True}, "elsewhere=true"),
        (("m1",), {"elsewhere": False}, "instance=m1"),
        (("m1",), {"timeout": 2.5}, "instance=m1;timeout=2500ms"),
        (("m1",), {"timeout": 0.001}, "instance=m1;timeout=1ms"),
    ],
)  # fmt: skip
def test_format_table(args: tuple[str, ...], kwargs: dict[str, object], expected: str) -> None:
    assert format_replay_header(*args, **kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"elsewhere": False},
        {"instance": "bad;id"},
        {"instance": "a,b"},
        {"instance": ""},
        {"instance": "a\r\nx-evil: 1"},
        {"instance": '"q"'},
        {"instance": "m1", "prefer_instance": "m2"},
        {"prefer_instance": "x y"},
        {"region": []},
        {"region": ""},
        {"region": 'sjc";x=1'},
        {"region": ["sjc", "i;ad"]},
        {"app": "a;b"},
        {"app": "-app"},
        {"instance": "m1", "state": ""},
        {"instance": "m1", "state": "a;b"},
        {"instance": "m1", "state": "a,b"},
        {"instance": "m1", "state": "x" * 65},
        {"instance": "m1", "state": "é"},
        {"instance": "m1", "timeout": 0},
        {"instance": "m1", "timeout": -1},
        {"instance": "m1", "timeout": float("nan")},
        {"instance": "m1", "timeout": float("inf")},
        {"instance": "m1", "timeout": True},
        {"instance": "m1", "timeout": "5s"},
        {"instance": "m1", "fallback": "self"},
        {"instance": "m1", "fallback": ["prefer_self"]},
    ],
)
def test_format_rejects_invalid_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        format_replay_header(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("seconds", "text"), [(5, "5s"), (5.0, "5s"), (0.8, "800ms"), (1.5, "1500ms"), (60, "60s")])
def test_duration_round_trip(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "5h", "-1s", "1.5s", "5 s", "ms"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# ------------------------------------------------------------------ parse_replay_header


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("region=sjc", {"region": "sjc"}),
        ('region="iad,ord,us,na"', {"region": ["iad", "ord", "us", "na"]}),
        ('region="sjc,any";app=target-app', {"region": ["sjc", "any"], "app": "target-app"}),
        ("instance=00bb33ff", {"instance": "00bb33ff"}),
        ("app=my-worker;timeout=10s;fallback=force_self",
         {"app": "my-worker", "timeout": "10s", "fallback": "force_self"}),
        ('  region = " iad , ord " ;\tapp=x ; ', {"region": ["iad", "ord"], "app": "x"}),
        ("instance=a;;state=b;", {"instance": "a", "state": "b"}),
        ("INSTANCE=a", {"instance": "a"}),
        ("state=", {"state": ""}),
        ('region="sjc"', {"region": ["sjc"]}),
        ("future_field=1;instance=a", {"future_field": "1", "instance": "a"}),
    ],
)  # fmt: skip
def test_parse_table(value: str, expected: dict[str, object]) -> None:
    assert parse_replay_header(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        ";;",
        "instance",
        "=x",
        "app=<app>,state=<key>",  # the comma pitfall in one Fly blueprint
        'region="iad,ord',
        'region=iad"',
        'region="a"b"',
        'region=""',
        'region="a,,b"',
        "a=1;a=2",
        "a=1;A=2",
        "instance=a b",
        "instance=a\r\nx: y",
        "instance=\x00",
        "instance=é",
        "1key=a",
        "k" * 40 + "=1",
        "a=" + "x" * 5000,
    ],
)
def test_parse_rejects_garbage(value: str) -> None:
    with pytest.raises(ValueError):
        parse_replay_header(value)


def test_parse_rejects_non_strings() -> None:
    for value in (None, b"instance=a", 3):
        with pytest.raises(ValueError):
            parse_replay_header(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("instance=m1", ReplayInstruction(instance=I("m1"))),
        ("prefer_instance=m1;timeout=800ms;fallback=prefer_self",
         ReplayInstruction(prefer_instance=I("m1"), timeout=0.8, fallback="prefer_self")),
        ('region="iad,ord";elsewhere=true', ReplayInstruction(region=("iad", "ord"), elsewhere=True)),
        ("region=sjc;app=x;state=s;unknown=1", ReplayInstruction(region=("sjc",), app="x", state="s")),
        ("elsewhere=FALSE;instance=m1", ReplayInstruction(instance=I("m1"))),
    ],
)  # fmt: skip
def test_parse_instruction(value: str, expected: ReplayInstruction) -> None:
    assert parse_replay_instruction(value) == expected


@pytest.mark.parametrize(
    "value",
    ['instance="a,b"', "instance=-x", "fallback=self", "timeout=5", "elsewhere=yes", 'app="a,b"', "app=-a", "x"],
)
def test_parse_instruction_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_replay_instruction(value)


# ------------------------------------------------------------------ headers on replayed requests


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("instance=00bb33ff;region=iad;t=1754400000000000;state=affinity",
         ReplaySource(I("00bb33ff"), "iad", 1754400000000000, "affinity")),
        ("instance=other77;state=;t=1754400000000000", ReplaySource(I("other77"), None, 1754400000000000, "")),
        (" instance = m1 ; region = lcl ", ReplaySource(I("m1"), "lcl", None, None)),
        ("instance=m1;extra=zzz;Region=ams", ReplaySource(I("m1"), "ams", None, None)),
        ("instance=bad id;t=xx;state=a;b", ReplaySource(None, None, None, "a")),
        ("state=weird value!", ReplaySource(None, None, None, None)),
        ("t=-5", ReplaySource(None, None, None, None)),
        ("instance=m1;instance=m2", ReplaySource(I("m1"), None, None, None)),
    ],
)  # fmt: skip
def test_parse_replay_src(value: str, expected: ReplaySource) -> None:
    assert parse_replay_src(value) == expected


@pytest.mark.parametrize("value", [None, "", "garbage", "foo=bar", ";;;", "instance", "x=1\r\ninstance=a", 5])
def test_parse_replay_src_garbage_is_none(value: object) -> None:
    assert parse_replay_src(value) is None  # type: ignore[arg-type]


def test_replay_src_instance_is_the_replayer() -> None:
    src = parse_replay_src("instance=replayer1;region=lcl;t=1;state=affinity")
    assert src is not None and src.instance == "replayer1" and src.ours


@pytest.mark.parametrize(
    ("state", "ours"),
    [("affinity", True), ("affinity:n1", True), ("affinityx", False), ("other", False), ("", False), (None, False)],
)
def test_our_marker(state: str | None, ours: bool) -> None:
    assert carries_our_marker(state) is ours


def test_parse_replay_failed_doc_example() -> None:
    value = "instance=00bb33ff;app=target-app;region=iad;replay_source=11aa44ee;reason=timeout;elapsed_ms=10000"
    assert parse_replay_failed(value) == ReplayFailed(
        I("00bb33ff"), "target-app", "iad", I("11aa44ee"), 10000, "timeout"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("instance=m2;reason=no_candidate", ReplayFailed(I("m2"), None, None, None, None, "no_candidate")),
        ("instance=m2;reason=exploded;elapsed_ms=x", ReplayFailed(I("m2"), None, None, None, None, None)),
        ("reason=retries_exhausted", ReplayFailed(None, None, None, None, None, "retries_exhausted")),
        (None, None),
        ("", None),
        ("nonsense", None),
        ("other=1", None),
    ],
)
def test_parse_replay_failed(value: str | None, expected: ReplayFailed | None) -> None:
    assert parse_replay_failed(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("m1", "m1"), (" 00bb33ff ", "00bb33ff"), ("", None), (None, None), ("a;b", None), ("-x", None)],
)
def test_parse_unavailable(value: str | None, expected: str | None) -> None:
    assert parse_unavailable(value) == expected


# ------------------------------------------------------------------ round trips


ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
regions = st.from_regex(r"[a-z0-9]{2,5}", fullmatch=True)
states = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)


@given(
    instance=st.one_of(st.none(), ids),
    region=st.one_of(st.none(), st.lists(regions, min_size=1, max_size=4)),
    app=st.one_of(st.none(), st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)),
    state=st.one_of(st.none(), states),
    elsewhere=st.booleans(),
    timeout_ms=st.one_of(st.none(), st.integers(1, 600_000)),
    fallback=st.sampled_from([None, "prefer_self", "force_self"]),
    prefer=st.booleans(),
)
def test_format_parse_round_trip(instance, region, app, state, elsewhere, timeout_ms, fallback, prefer) -> None:
    timeout = timeout_ms / 1000 if timeout_ms is not None else None
    kwargs = {"region": region, "app": app, "state": state, "elsewhere": elsewhere, "timeout": timeout}
    key = "prefer_instance" if prefer else "instance"
    if instance is not None:
        kwargs[key] = instance
    try:
        value = format_replay_header(fallback=fallback, **kwargs)
    except ValueError:
        assert all(v in (None, False) for v in kwargs.values()) and fallback is None
        return
    assert "\r" not in value and "\n" not in value
    parsed = parse_replay_header(value)
    inst = parse_replay_instruction(value)
    if instance is not None:
        assert parsed[key] == instance and getattr(inst, key) == instance
    if region is not None:
        assert inst.region == tuple(region)
        assert parsed["region"] == (region if len(region) > 1 else region[0])
    assert inst.app == app and inst.state == state and inst.elsewhere is elsewhere and inst.fallback == fallback
    if timeout is not None:
        assert inst.timeout == pytest.approx(timeout)


# ------------------------------------------------------------------ plan


def _body(method: str = "GET", length: int | None = None, chunked: bool = False) -> BodyInfo:
    return BodyInfo(method, length, chunked)


@pytest.mark.parametrize(
    ("target", "src", "body", "ws", "expected"),
    [
        # the local instance: always served here, replayed or not
        ("a", None, _body(), False, LocalForward(I("a"))),
        ("a", SRC, _body(), False, LocalForward(I("a"))),
        ("a", None, _body("POST", 5_000_000), False, LocalForward(I("a"))),
        # replayed by one of our nodes (our marker): loop guard, never a second replay
        ("b", SRC, _body(), False, LocalForward(I("a"), PlanReason.LOOP_GUARD, loop_guard=True)),
        ("b", ReplaySource(None, None, None, "affinity:private"), _body(), True,
         LocalForward(I("a"), PlanReason.LOOP_GUARD, True)),
        ("b", SRC, _body("POST", 5_000_000), False, LocalForward(I("a"), PlanReason.LOOP_GUARD, True)),
        # replayed by someone else (a router app with app=, an unparsable header): never replayed
        # again (the contract: anything replayed to us is served, not replayed); affinity goes
        # over the private network, whatever the body, WebSocket upgrades included
        ("b", ReplaySource(None, None, None, None), _body(), True, PrivateForward(I("b"), PlanReason.FOREIGN_REPLAY)),
        ("b", ReplaySource(I("x"), "ams", 1, "their-state"), _body(), False,
         PrivateForward(I("b"), PlanReason.FOREIGN_REPLAY)),
        ("b", ReplaySource(I("x"), "ams", 1, ""), _body(), False, PrivateForward(I("b"), PlanReason.FOREIGN_REPLAY)),
        ("b", ReplaySource(I("x"), "ams", 1, "affinityx"), _body(), False,
         PrivateForward(I("b"), PlanReason.FOREIGN_REPLAY)),
        ("b", ReplaySource(I("x"), "ams", 1, "their"), _body("POST", 5_000_000), False,
         PrivateForward(I("b"), PlanReason.FOREIGN_REPLAY)),
        ("a", ReplaySource(I("x"), "ams", 1, "their"), _body(), False, LocalForward(I("a"))),
        ("b;x", ReplaySource(I("x"), "ams", 1, "their"), _body(), False,
         LocalForward(I("a"), PlanReason.INVALID_TARGET)),
        # an invalid target id never reaches a header or a URL
        ("b;x=1", None, _body(), False, LocalForward(I("a"), PlanReason.INVALID_TARGET)),
        ("", None, _body(), False, LocalForward(I("a"), PlanReason.INVALID_TARGET)),
        # bodies Fly cannot replay go over the private network
        ("b", None, _body("POST", MAX_REPLAY_BODY + 1), False, PrivateForward(I("b"), PlanReason.BODY_TOO_LARGE)),
        ("b", None, _body("GET", MAX_REPLAY_BODY + 1), False, PrivateForward(I("b"), PlanReason.BODY_TOO_LARGE)),
        ("b", None, _body("POST"), False, PrivateForward(I("b"), PlanReason.UNKNOWN_LENGTH)),
        ("b", None, _body("put"), False, PrivateForward(I("b"), PlanReason.UNKNOWN_LENGTH)),
        ("b", None, _body("PATCH"), False, PrivateForward(I("b"), PlanReason.UNKNOWN_LENGTH)),
        ("b", None, _body("POST", 10, chunked=True), False, PrivateForward(I("b"), PlanReason.UNKNOWN_LENGTH)),
        ("b", None, _body("DELETE", chunked=True), False, PrivateForward(I("b"), PlanReason.UNKNOWN_LENGTH)),
        # replayable
        ("b", None, _body(), False, Replay(I("b"), HEADER)),
        ("b", None, _body("POST", MAX_REPLAY_BODY), False, Replay(I("b"), HEADER)),
        ("b", None, _body("POST", 0), False, Replay(I("b"), HEADER)),
        ("b", None, _body("DELETE"), False, Replay(I("b"), HEADER)),
        ("b", None, _body("POST", -3), False, PrivateForward(I("b"), PlanReason.UNKNOWN_LENGTH)),
        # WebSocket upgrades are always replayed with a plain HTTP answer
        ("b", None, _body("GET", None, chunked=True), True, Replay(I("b"), HEADER)),
    ],
)  # fmt: skip
def test_plan_table(target: str, src: ReplaySource | None, body: BodyInfo, ws: bool, expected: object) -> None:
    assert plan(I(target), local_instance=I("a"), replay_src=src, body=body, is_websocket=ws) == expected


def test_plan_prefer_instance_and_thresholds() -> None:
    got = plan(I("b"), local_instance=I("a"), replay_src=None, body=GET, is_websocket=False, prefer_instance=True)
    assert got == Replay(I("b"), "prefer_instance=b;state=affinity;timeout=10s;fallback=prefer_self")
    got = plan(
        I("b"), local_instance=I("a"), replay_src=None, body=GET, is_websocket=False,
        prefer_instance=True, timeout=0.8, fallback="force_self", state="affinity:n1",
    )  # fmt: skip
    assert (
        isinstance(got, Replay)
        and got.header == "prefer_instance=b;state=affinity:n1;timeout=800ms;fallback=force_self"
    )
    small = plan(I("b"), local_instance=I("a"), replay_src=None, body=_body("POST", 200), is_websocket=False,
                 max_replay_body=100)  # fmt: skip
    assert small == PrivateForward(I("b"), PlanReason.BODY_TOO_LARGE)
    unsized = plan(I("b"), local_instance=I("a"), replay_src=None, body=_body("POST"), is_websocket=False,
                   unsized_methods=frozenset())  # fmt: skip
    assert isinstance(unsized, Replay)


FOREIGN = ReplaySource(I("router1"), "ams", 1, "router-state")


@pytest.mark.parametrize(
    ("target", "src", "fallback_request", "unreachable", "expected"),
    [
        # a fallback (fly-replay-failed) is never replayed: Fly answers PA03 (docs/fly-protocol.md section 1),
        # with or without fly-replay-src on it
        ("b", None, True, (), LocalForward(I("a"), PlanReason.FALLBACK, loop_guard=True)),
        ("b", SRC, True, (), LocalForward(I("a"), PlanReason.FALLBACK, loop_guard=True)),
        ("b", FOREIGN, True, (), LocalForward(I("a"), PlanReason.FALLBACK, loop_guard=True)),
        ("a", None, True, (), LocalForward(I("a"))),
        # the target Fly just could not deliver to (hard_limit, slow start): served here, pin kept
        ("b", None, False, ("b",), LocalForward(I("a"), PlanReason.UNREACHABLE, keep_pin=True)),
        ("b", SRC, False, ("b",), LocalForward(I("a"), PlanReason.UNREACHABLE, keep_pin=True)),
        ("b", None, True, ("b",), LocalForward(I("a"), PlanReason.UNREACHABLE, keep_pin=True)),
        ("a", None, True, ("a",), LocalForward(I("a"))),
        # another unreachable Machine does not matter for this target
        ("b", None, False, ("c",), Replay(I("b"), HEADER)),
        ("b", SRC, False, ("c",), LocalForward(I("a"), PlanReason.LOOP_GUARD, loop_guard=True)),
        # a foreign router's replay still gets affinity, over the private network, never a replay
        ("b", FOREIGN, False, (), PrivateForward(I("b"), PlanReason.FOREIGN_REPLAY)),
        ("b", FOREIGN, False, ("b",), LocalForward(I("a"), PlanReason.UNREACHABLE, keep_pin=True)),
    ],
)  # fmt: skip
def test_plan_fallbacks_and_foreign_replays(target, src, fallback_request, unreachable, expected) -> None:
    got = plan(I(target), local_instance=I("a"), replay_src=src, body=GET, is_websocket=False,
               fallback_request=fallback_request, unreachable=frozenset(unreachable))
    assert got == expected


def _view(**states: InstanceState) -> MembershipView:
    return MembershipView.build(Instance(I(i), state=st_) for i, st_ in states.items())


VIEW = _view(a=InstanceState.UP, b=InstanceState.UP, c=InstanceState.STOPPED, d=InstanceState.DOWN,
             e=InstanceState.DRAINING)


def _failed(target: str | None, reason: str | None = "timeout") -> ReplayFailed:
    return ReplayFailed(I(target) if target else None, "demo", "lcl", I("a"), 10, reason)


@pytest.mark.parametrize(
    ("unavailable", "failed", "static", "avoid", "unreachable"),
    [
        (None, None, False, {}, set()),
        # prefer_instance landed elsewhere: a Machine at its hard_limit keeps its pins, a gone one does not
        ("b", None, False, {}, {"b"}),
        ("c", None, False, {}, {"c"}),
        ("e", None, False, {}, {"e"}),
        ("zz", None, False, {"zz": RepinReason.UNAVAILABLE}, set()),
        ("d", None, False, {"d": RepinReason.UNAVAILABLE}, set()),
        # static membership never learns that a Machine is gone: Fly's word is taken
        ("b", None, True, {"b": RepinReason.UNAVAILABLE}, set()),
        # a fallback: gone (or down) target -> re-pin; a routable one was only slow or full
        (None, _failed("zz"), False, {"zz": RepinReason.REPLAY_FAILED}, set()),
        (None, _failed("d", "retries_exhausted"), False, {"d": RepinReason.REPLAY_FAILED}, set()),
        (None, _failed("b"), False, {}, {"b"}),
        (None, _failed("b", "no_candidate"), False, {}, {"b"}),
        (None, _failed("b", "retries_exhausted"), False, {}, {"b"}),
        (None, _failed("c", None), False, {}, {"c"}),
        (None, _failed("b", "no_candidate"), True, {"b": RepinReason.REPLAY_FAILED}, set()),
        (None, _failed("b", "timeout"), True, {}, {"b"}),
        (None, _failed(None), False, {}, set()),
        # both at once
        ("b", _failed("zz"), False, {"zz": RepinReason.REPLAY_FAILED}, {"b"}),
        ("zz", _failed("zz"), False, {"zz": RepinReason.REPLAY_FAILED}, set()),
        ("b", _failed("b", "no_candidate"), True, {"b": RepinReason.REPLAY_FAILED}, set()),
    ],
)  # fmt: skip
def test_triage(unavailable, failed, static, avoid, unreachable) -> None:
    got = triage(I(unavailable) if unavailable else None, failed, VIEW, static_membership=static)
    assert dict(got.avoid) == avoid
    assert got.unreachable == frozenset(unreachable)
    assert not (got.avoid.keys() & got.unreachable)


def test_replay_header_for_falls_back_to_minimal_on_bad_options() -> None:
    assert replay_header_for("b", prefer_instance=True, timeout=-1) == "instance=b;state=affinity"
    assert replay_header_for("b", state="a;b") == "instance=b;state=affinity"
    assert replay_header_for("b", prefer_instance=True, fallback=["x"]) == "instance=b;state=affinity"  # type: ignore[arg-type]
    assert replay_header_for("b", state=None) == "instance=b;timeout=10s;fallback=prefer_self"
    assert replay_header_for("b", state=None, timeout=None, fallback=None) == "instance=b"
    assert replay_header_for("b", timeout=None) == "instance=b;state=affinity;fallback=prefer_self"
    assert replay_header_for("b", fallback="force_self", timeout=2.5) == (
        "instance=b;state=affinity;timeout=2500ms;fallback=force_self")
    with pytest.raises(ValueError):
        replay_header_for("b;c")


def test_body_replayable() -> None:
    assert body_replayable(_body("GET")) is None
    assert body_replayable(_body("POST", 1)) is None
    assert body_replayable(_body("POST")) is PlanReason.UNKNOWN_LENGTH


# ------------------------------------------------------------------ properties


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_parse_replay_header_only_raises_value_error(value: str) -> None:
    try:
        parse_replay_header(value)
        parse_replay_instruction(value)
    except ValueError:
        pass


fieldish = st.text(alphabet=st.sampled_from(list('instaceregio_=;," \t\r\n0123456789abm-.:é\x00')), max_size=80)


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=200), fieldish, st.none()))
def test_header_parsers_never_raise(value: str | None) -> None:
    src = parse_replay_src(value)
    assert src is None or isinstance(src, ReplaySource)
    if src is not None and src.instance is not None:
        assert is_valid_instance_id(src.instance)
    failed = parse_replay_failed(value)
    assert failed is None or isinstance(failed, ReplayFailed)
    unavailable = parse_unavailable(value)
    assert unavailable is None or is_valid_instance_id(unavailable)
    try:
        parse_replay_header(value)  # type: ignore[arg-type]
    except ValueError:
        pass


@settings(max_examples=300)
@given(
    instance=st.text(max_size=30),
    region=st.one_of(st.none(), st.text(max_size=20), st.lists(st.text(max_size=8), max_size=3)),
    app=st.one_of(st.none(), st.text(max_size=20)),
    state=st.one_of(st.none(), st.text(max_size=70)),
    timeout=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)
def test_format_never_emits_injectable_characters(instance, region, app, state, timeout) -> None:
    try:
        value = format_replay_header(instance, region=region, app=app, state=state, timeout=timeout)
    except ValueError:
        return
    assert "\r" not in value and "\n" not in value and "\x00" not in value
    assert value.isascii() and " " not in value
    outside_quotes = value.split('"')[0::2]
    assert all("," not in part for part in outside_quotes)
    assert value.count('"') in (0, 2)
    assert parse_replay_header(value)


bodies = st.builds(
    BodyInfo,
    method=st.one_of(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "post"]), st.text(max_size=8)),
    content_length=st.one_of(st.none(), st.integers(-10, 3 * MAX_REPLAY_BODY)),
    chunked=st.booleans(),
)
any_ids = st.one_of(st.sampled_from(["a", "b", "c"]), st.text(max_size=12))
sources = st.one_of(
    st.none(),
    st.builds(ReplaySource, st.one_of(st.none(), any_ids), st.none(), st.none(),
              st.one_of(st.none(), st.text(), st.sampled_from(["affinity", "affinity:private", "affinityx", ""]))),
)


@settings(max_examples=500)
@given(
    target=any_ids,
    local=st.sampled_from(["a", "b"]),
    src=sources,
    body=bodies,
    ws=st.booleans(),
    prefer=st.booleans(),
    timeout=st.one_of(st.none(), st.floats(allow_nan=True)),
    fallback=st.one_of(st.none(), st.text(max_size=12)),
    state=st.one_of(st.none(), st.text(max_size=12)),
    fallback_request=st.booleans(),
    unreachable=st.frozensets(any_ids, max_size=2),
)
def test_plan_never_replays_to_itself_nor_twice(
    target, local, src, body, ws, prefer, timeout, fallback, state, fallback_request, unreachable
) -> None:
    got = plan(
        I(target), local_instance=I(local), replay_src=src, body=body, is_websocket=ws,
        prefer_instance=prefer, timeout=timeout, fallback=fallback, state=state,
        fallback_request=fallback_request, unreachable=unreachable,
    )  # fmt: skip
    assert isinstance(got, LocalForward | Replay | PrivateForward)
    ours = src is not None and src.ours
    if not isinstance(got, LocalForward):
        assert not fallback_request and not ours and target not in unreachable
    if isinstance(got, Replay):
        assert src is None, "anything replayed to us is served, never replayed again"
        assert got.instance != local
        assert is_valid_instance_id(got.instance)
        inst = parse_replay_instruction(got.header)
        assert (inst.prefer_instance if prefer and inst.prefer_instance else inst.instance) == target
        assert "\r" not in got.header and "\n" not in got.header
    elif isinstance(got, PrivateForward):
        assert got.instance != local and is_valid_instance_id(got.instance)
        assert not ws or src is not None
    else:
        assert got.instance == local
        assert got.keep_pin is (target != local and target in unreachable)
        assert got.loop_guard is (target != local and not got.keep_pin and (fallback_request or ours))


def test_replay_module_loads_no_io_frameworks() -> None:
    import json
    import subprocess
    import sys

    script = "import sys, json; import affinity_proxy.routing.replay; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    loaded = set(json.loads(out.stdout))
    for name in ("aiohttp", "asyncio", "redis", "socket", "yaml"):
        assert not any(m == name or m.startswith(name + ".") for m in loaded), f"{name} was imported"
