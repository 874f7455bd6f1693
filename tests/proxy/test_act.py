"""``proxy.act``: the engine-neutral "what to do about a decision", table-driven.

Every decision kind x every fly plan kind (and proxy mode) x with and without a user key, the
counters each action names, the Set-Cookie rule, and every upstream-failure outcome. Pure: no
sockets, no event loop.
"""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest

from affinity_proxy.proxy import act
from affinity_proxy.proxy.headers import IDEMPOTENT_METHODS, INSTANCE_HEADER
from affinity_proxy.routing.cookie import AffinityCookie, CookieCodec
from affinity_proxy.routing.decide import DecisionReason, Refuse, RepinReason, Route, RouteInput
from affinity_proxy.routing.model import InstanceId
from affinity_proxy.routing.replay import REPLAY_SRC_HEADER, LocalForward, PlanReason, PrivateForward, Replay

LOCAL = InstanceId("local-1")
OTHER = InstanceId("other-2")

DECISIONS = {
    "cookie": Route(OTHER, DecisionReason.COOKIE),
    "new": Route(OTHER, DecisionReason.NEW, set_cookie=True),
    "repin": Route(OTHER, DecisionReason.REPIN, repin_reason=RepinReason.DEAD, set_cookie=True, conflict=True),
    "local": Route(LOCAL, DecisionReason.PIN),
    "refuse": Refuse(),
    "refuse-draining": Refuse("all_draining"),
}
PLANS = {
    "proxy-mode": None,
    "local": LocalForward(LOCAL),
    "replay": Replay(OTHER, f"instance={OTHER}"),
    "private": PrivateForward(OTHER, PlanReason.BODY_TOO_LARGE),
    "keep-pin": LocalForward(LOCAL, PlanReason.UNREACHABLE, keep_pin=True),
    "loop-guard": LocalForward(LOCAL, PlanReason.LOOP_GUARD, loop_guard=True),
}
USERS = {"anonymous": None, "keyed": "alice"}


@pytest.mark.parametrize(("decision_name", "plan_name", "user_name"),
                         list(itertools.product(DECISIONS, PLANS, USERS)))
def test_act_every_decision_under_every_plan(decision_name: str, plan_name: str, user_name: str) -> None:
    decision, step, user = DECISIONS[decision_name], PLANS[plan_name], USERS[user_name]
    inp = RouteInput(user_key=user, now=1000.0)
    action = act.act(decision, step, inp, LOCAL)
    if isinstance(decision, Refuse):  # a refusal never consults the plan
        assert isinstance(action, act.Refused) and action.decision is decision
        assert action.answer.status == 503 and action.answer.headers == (("Retry-After", "5"),)
        assert json.loads(action.answer.body) == {
            "error": decision.reason, "message": "no instance can serve this request", "status": 503}
        assert act.refuse_counts(decision) == (("requests", ("refuse", decision.reason)),)
        return
    if isinstance(step, Replay):
        assert action == act.ReplayTo(decision, step.instance, step.header)
        return
    assert isinstance(action, act.Forward)
    if step is None or plan_name == "local":
        assert action == act.Forward(decision)
        assert action.route is decision  # identity: the fast engine's hot-route entries key on it
    elif plan_name == "private":
        assert action == act.Forward(decision, ((REPLAY_SRC_HEADER, f"instance={LOCAL};state=affinity:private"),))
    elif plan_name == "keep-pin":  # served here once; the pin and the cookie stay
        assert action == act.Forward(Route(LOCAL, DecisionReason.FALLBACK))
        assert not action.route.set_cookie and action.repin is None and not action.loop_prevented
    else:  # the loop guard: served here, re-pinned here when there is a user, a fresh cookie
        assert plan_name == "loop-guard"
        assert action.route == Route(LOCAL, DecisionReason.LOOP_GUARD, set_cookie=True)
        assert action.loop_prevented and action.decided is decision and action.upstream_headers == ()
        expected = None if user is None else act.Repin(user, decision.instance, LOCAL)
        assert action.repin == expected


def test_private_forward_needs_the_local_instance() -> None:
    with pytest.raises(AssertionError):
        act.act(DECISIONS["cookie"], PLANS["private"], RouteInput(), None)


@pytest.mark.parametrize(("action", "route", "expected"), [
    ("forward", Route(OTHER, DecisionReason.COOKIE), (("requests", ("forward", DecisionReason.COOKIE)),)),
    ("forward", Route(OTHER, DecisionReason.REPIN, repin_reason=RepinReason.GONE),
     (("requests", ("forward", DecisionReason.REPIN)), ("repins", (RepinReason.GONE,)))),
    ("forward", Route(OTHER, DecisionReason.REPIN), (("requests", ("forward", DecisionReason.REPIN)),)),
    ("forward", Route(OTHER, DecisionReason.PIN, conflict=True),
     (("requests", ("forward", DecisionReason.PIN)), ("pin_conflicts", ()))),
    ("replay", Route(OTHER, DecisionReason.HASH),
     (("requests", ("replay", DecisionReason.HASH)), ("replays", (DecisionReason.HASH,)))),
    ("replay", Route(OTHER, DecisionReason.REPIN, repin_reason=RepinReason.DRAINING, conflict=True),
     (("requests", ("replay", DecisionReason.REPIN)), ("repins", (RepinReason.DRAINING,)), ("pin_conflicts", ()),
      ("replays", (DecisionReason.REPIN,)))),
])
def test_counts_name_every_counter_one_request_adds_to(action: str, route: Route, expected: tuple) -> None:
    assert act.counts(action, route) == expected


# ---------------------------------------------------------------------- Set-Cookie and X-Fly-Instance

def _config(name: str = "aff") -> SimpleNamespace:
    cookie = SimpleNamespace(name=name, max_age=60, path="/", domain=None, secure=True, http_only=True, same_site="Lax")
    return SimpleNamespace(cookie=cookie)


CODEC = CookieCodec("s3cret")
FRESH = AffinityCookie(OTHER, 990, "")
OLD_SECRET = AffinityCookie(OTHER, 990, "", previous_secret=True)


@pytest.mark.parametrize(("set_cookie", "cookie", "due"), [
    (False, None, False), (False, FRESH, False), (False, OLD_SECRET, True),
    (True, None, True), (True, FRESH, True), (True, OLD_SECRET, True),
])
def test_set_cookie_rule(set_cookie: bool, cookie: AffinityCookie | None, due: bool) -> None:
    writer = act.CookieWriter()
    route = Route(OTHER, DecisionReason.COOKIE, set_cookie=set_cookie)
    value = writer.value(CODEC, _config(), OTHER, route, RouteInput(cookie=cookie, now=1000.0))
    if not due:
        assert value is None
        assert act.response_headers(OTHER, value) == ((INSTANCE_HEADER, OTHER),)
        return
    assert value is not None and value.startswith("aff=")
    assert "Max-Age=60" in value and "Secure" in value and "HttpOnly" in value and "SameSite=Lax" in value
    read, problem = CODEC.read(value.split(";")[0].split("=", 1)[1], 1000.0)
    assert problem is None and read is not None and read.instance == OTHER and read.issued_at == 1000
    assert act.response_headers(OTHER, value) == ((INSTANCE_HEADER, OTHER), ("Set-Cookie", value))


def test_cookie_attributes_follow_a_new_config() -> None:
    writer = act.CookieWriter()
    route = Route(OTHER, DecisionReason.NEW, set_cookie=True)
    first = writer.value(CODEC, _config("one"), OTHER, route, RouteInput(now=1.0))
    second = writer.value(CODEC, _config("two"), OTHER, route, RouteInput(now=1.0))
    assert first is not None and first.startswith("one=")
    assert second is not None and second.startswith("two=")


# ---------------------------------------------------------------------- after an upstream failure

KINDS = {"connect": (502, True), "timeout": (504, False), "protocol": (502, False)}
METHODS = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH"]


@pytest.mark.parametrize(("kind", "attempt", "method", "has_body", "local", "health"), list(itertools.product(
    KINDS, [0, 1], METHODS, [False, True], [False, True], [False, True])))
def test_after_failure_every_outcome(kind: str, attempt: int, method: str, has_body: bool, local: bool,
                                     health: bool) -> None:
    status, retryable = KINDS[kind]
    then = act.after_failure(kind, status, retryable=retryable, attempt=attempt, method=method, has_body=has_body,
                             local=local, health=health)
    assert then.report_health == (retryable and local and health)
    retry = retryable and attempt == 0 and method in IDEMPOTENT_METHODS and not has_body
    assert then.retry == retry
    if retry:
        assert then.answer is None
        return
    assert then.answer is not None and then.answer.status == status
    message = "upstream timed out" if kind == "timeout" else "upstream unreachable"
    assert json.loads(then.answer.body) == {"error": f"upstream_{kind}", "message": message, "status": status}


def test_failure_counts_and_retry_input() -> None:
    assert act.failure_counts(OTHER, "connect") == (("upstream_errors", (OTHER, "connect")),)
    inp = RouteInput(user_key="u", now=5.0, avoid={LOCAL: RepinReason.GONE})
    retry = act.retry_input(inp, OTHER)
    assert retry.avoid == {LOCAL: RepinReason.GONE, OTHER: RepinReason.DEAD} and retry.now == 5.0
    assert inp.avoid == {LOCAL: RepinReason.GONE}  # the first attempt's input is left alone
    assert act.retry_input(inp, OTHER, now=9.0).now == 9.0


@pytest.mark.parametrize(("method", "has_body", "expected"), [
    *((m, False, m in IDEMPOTENT_METHODS) for m in METHODS), *((m, True, False) for m in METHODS)])
def test_may_retry(method: str, has_body: bool, expected: bool) -> None:
    assert act.may_retry(method, has_body) is expected


# ---------------------------------------------------------------------- the proxy's own answers

@pytest.mark.parametrize(("answer", "status", "code"), [
    (act.NO_UPSTREAM, 502, "no_upstream"),
    (act.body_too_large(10), 413, "body_too_large"),
    (act.error(500, "internal error", "internal_error"), 500, "internal_error"),
    (act.error(404, "gone"), 404, "not_found"),  # no code: the status' title
    (act.error(418, "teapot"), 418, "error"),
])
def test_answers_are_small_json_errors(answer: act.Answer, status: int, code: str) -> None:
    assert answer.status == status
    assert list(json.loads(answer.body)) == ["error", "message", "status"]
    assert json.loads(answer.body)["error"] == code and json.loads(answer.body)["status"] == status


def test_replay_body() -> None:
    assert json.loads(act.replay_body(OTHER)) == {"message": f"replaying to instance {OTHER}", "instance": OTHER}


@pytest.mark.parametrize(("routed", "instance", "reason", "replay_target"), [
    (("refuse", "", ""), None, None, None),
    (("forward", "i-1", "cookie"), "i-1", "cookie", None),
    (("replay", "i-2", "hash"), "i-2", "hash", "i-2"),
])
def test_access_fields(routed: tuple[str, str, str], instance: str | None, reason: str | None,
                       replay_target: str | None) -> None:
    fields = act.access_fields("GET", "/a", 200, 0.0123456, routed, "rid", "10.0.0.1")
    assert fields == {"method": "GET", "path": "/a", "status": 200, "duration_ms": 12.35, "action": routed[0],
                      "instance": instance, "reason": reason, "replay_target": replay_target,
                      "request_id": "rid", "remote": "10.0.0.1"}
