"""What to do about a routing decision, written once for both engines (the sans-io half of the act).

``routing.decide`` says *where* a request goes; this module says *what to do about it*: refuse with
this JSON body, answer with a ``fly-replay``, or forward with these extra upstream headers, this
``X-Fly-Instance`` and this ``Set-Cookie``, re-pinning first when the loop guard fired; which
counters one request adds to; and, after an upstream failure, whether to report the instance to
health, retry once elsewhere or answer with which error. Everything returns values (mitmproxy's
shape: the layer yields commands, the engine performs them). An engine only parses requests, moves
bytes and translates these values to its wire form (``engines/aiohttp/proxy_handler.py`` builds
``web.Response`` objects, ``engines/fast`` pre-encoded bytes cached by key).

Pure: no I/O, no asyncio, no aiohttp. Imports ``routing`` and ``proxy.headers`` only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from affinity_proxy.proxy.headers import IDEMPOTENT_METHODS, INSTANCE_HEADER
from affinity_proxy.routing.cookie import CookieCodec, set_cookie_template
from affinity_proxy.routing.decide import Decision, DecisionReason, Refuse, RepinReason, Route, RouteInput
from affinity_proxy.routing.model import InstanceId
from affinity_proxy.routing.replay import REPLAY_SRC_HEADER, LocalForward, Plan, PrivateForward, Replay

Header = tuple[str, str]

#: Sent on private-network forwards so the target node serves the request and never replays it.
PRIVATE_FORWARD_SRC = "instance={id};state=affinity:private"

FORWARD = "forward"
REPLAY = "replay"
REFUSE = "refuse"


# ---------------------------------------------------------------------- answers of the proxy's own

_TITLES = {
    400: "bad request", 401: "unauthorized", 404: "not found", 405: "method not allowed",
    413: "request body too large", 431: "request header fields too large", 502: "bad gateway",
    503: "service unavailable", 504: "gateway timeout",
}


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    """``{"error": <code>, "message": <message>, "status": N}``: every refusal's body. Messages are
    fixed strings chosen by the caller, never request data, so nothing a client sends is echoed."""
    code = code or _TITLES.get(status, "error").replace(" ", "_")
    return json.dumps({"error": code, "message": message, "status": status}).encode()


@dataclass(frozen=True, slots=True)
class Answer:
    """A response the proxy produces itself (``Content-Type: application/json``)."""

    status: int
    body: bytes
    headers: tuple[Header, ...] = ()


def error(status: int, message: str, code: str | None = None, headers: tuple[Header, ...] = ()) -> Answer:
    return Answer(status, error_body(status, message, code), headers)


#: No instance can serve the request (a ``Refuse`` decision); the code is the refusal's reason.
NO_INSTANCE_MESSAGE = "no instance can serve this request"
RETRY_AFTER: tuple[Header, ...] = (("Retry-After", "5"),)
#: The decided instance left the membership (or has no URL) between deciding and forwarding.
NO_UPSTREAM = error(502, "chosen instance has no address", "no_upstream")


def refused(refuse: Refuse) -> Answer:
    return error(503, NO_INSTANCE_MESSAGE, refuse.reason, RETRY_AFTER)


def body_too_large(limit: int) -> Answer:
    return error(413, f"request body exceeds {limit} bytes", "body_too_large")


#: The status a client gets when the instance fails (by ``UpstreamError.kind``): 504 for a timeout.
UPSTREAM_STATUS: dict[str, int] = {"connect": 502, "timeout": 504, "protocol": 502}


def upstream_error(kind: str, status: int) -> Answer:
    """The answer to an upstream failure that is not retried (``status``: 502, or 504 for a timeout)."""
    message = "upstream timed out" if kind == "timeout" else "upstream unreachable"
    return error(status, message, f"upstream_{kind}")


def replay_body(instance: str) -> bytes:
    """The body of a ``fly-replay`` answer (Fly's edge consumes it; the client never sees it)."""
    return json.dumps({"message": f"replaying to instance {instance}", "instance": instance}).encode()


# ---------------------------------------------------------------------- the action for a decision


@dataclass(frozen=True, slots=True)
class Refused:
    """Answer ``answer``; count ``requests{action=refuse, reason}``."""

    decision: Refuse
    answer: Answer


@dataclass(frozen=True, slots=True)
class ReplayTo:
    """Fly mode: answer with ``fly-replay: header`` (status ``fly.replay_status``, ``replay_body``)."""

    route: Route
    instance: InstanceId
    header: str
    #: Also send ``fly-replay-cache: invalidate`` (a replay-cache hit for a user who belongs
    #: elsewhere); count ``replay_cache_invalidations``.
    invalidate: bool = False


@dataclass(frozen=True, slots=True)
class Repin:
    """The loop guard's re-pin, to do (compare-and-set) before forwarding; a store failure is
    counted as ``store_errors{op=repin}`` and the request is forwarded anyway."""

    user_key: str
    expected: InstanceId
    to: InstanceId


@dataclass(frozen=True, slots=True)
class Forward:
    """Forward to ``route.instance`` with ``upstream_headers`` added to the request."""

    route: Route
    upstream_headers: tuple[Header, ...] = ()
    repin: Repin | None = None
    #: The fly loop guard fired: count ``replay_loops_prevented`` and log ``decided``.
    loop_prevented: bool = False
    decided: Route | None = None


Action = Refused | ReplayTo | Forward


def act(decision: Decision, step: Plan | None, inp: RouteInput, local: InstanceId | None = None) -> Action:
    """The action for ``decision`` and, in fly mode, the replay plan ``step`` (None in proxy mode).

    - ``Refuse`` -> 503 with ``Retry-After: 5``, the refusal's reason as the error code.
    - ``Replay`` -> the ``fly-replay`` answer; no upstream call.
    - ``LocalForward(keep_pin)`` -> forward here as ``fallback``: the pin and the cookie stay.
    - ``LocalForward(loop_guard)`` -> forward here as ``loop_guard`` with a new cookie, re-pinning
      the user here first (when there is a user key).
    - ``PrivateForward`` -> forward with ``fly-replay-src`` naming ``local`` so the target serves it.
    """
    if isinstance(decision, Refuse):
        return Refused(decision, refused(decision))
    assert isinstance(decision, Route)
    if step is None or (isinstance(step, LocalForward) and not step.keep_pin and not step.loop_guard):
        return Forward(decision)
    if isinstance(step, Replay):
        return ReplayTo(decision, step.instance, step.header, step.invalidate)
    if isinstance(step, PrivateForward):
        assert local is not None
        return Forward(decision, ((REPLAY_SRC_HEADER, PRIVATE_FORWARD_SRC.format(id=local)),))
    assert isinstance(step, LocalForward)
    if step.keep_pin:
        return Forward(Route(step.instance, DecisionReason.FALLBACK))
    here = Route(step.instance, DecisionReason.LOOP_GUARD, set_cookie=True)
    repin = Repin(inp.user_key, decision.instance, step.instance) if inp.user_key is not None else None
    return Forward(here, repin=repin, loop_prevented=True, decided=decision)


# ---------------------------------------------------------------------- counting


#: (``ProxyMetrics`` attribute, label values) of one counter increment.
Count = tuple[str, tuple[str, ...]]


def counts(action: str, route: Route) -> tuple[Count, ...]:
    """The counters one routed request adds to (``action``: ``forward`` or ``replay``); the engine
    also records ``RecentEvents.route(action, route)`` and the response status."""
    found: list[Count] = [("requests", (action, route.reason))]
    if route.reason is DecisionReason.REPIN and route.repin_reason is not None:
        found.append(("repins", (route.repin_reason,)))
    if route.conflict:
        found.append(("pin_conflicts", ()))
    if route.how is not None:
        found.append(("placements", (route.instance, route.how)))
    if action == REPLAY:
        found.append(("replays", (route.reason,)))
    return tuple(found)


#: A request Fly's replay cache delivered (``fly-replay-cache-status: hit``), counted once on arrival.
CACHE_HIT_COUNTS: tuple[Count, ...] = (("replay_cache_hits", ()),)
#: A ``ReplayTo`` with ``invalidate``.
CACHE_INVALIDATION_COUNTS: tuple[Count, ...] = (("replay_cache_invalidations", ()),)


def refuse_counts(decision: Refuse) -> tuple[Count, ...]:
    return (("requests", (REFUSE, decision.reason)),)


# ---------------------------------------------------------------------- response headers


def cookie_attributes(config: Any) -> dict[str, Any]:
    """Set-Cookie attributes from ``cookie.*`` of a ``Config`` (computed once per config)."""
    c = config.cookie
    return {"max_age": c.max_age, "path": c.path, "domain": c.domain, "secure": c.secure,
            "http_only": c.http_only, "same_site": c.same_site}


class CookieWriter:
    """The affinity ``Set-Cookie`` rule: sent when the decision asks for it (new session, re-pin,
    loop guard) or the client's cookie is due for re-issue. One per engine per process; the
    cookie attributes are computed once per config (a reload replaces the config)."""

    __slots__ = ("_config", "_template")

    def __init__(self) -> None:
        self._config: object = None
        self._template: tuple[str, str] = ("", "")

    def value(self, codec: CookieCodec, config: Any, instance: InstanceId, route: Route, inp: RouteInput) -> str | None:
        """The ``Set-Cookie`` value, or None when none is due. ``config``: the current ``Config``."""
        if not (route.set_cookie or (inp.cookie is not None and codec.needs_reissue(inp.cookie))):
            return None
        if config is not self._config:
            self._template = set_cookie_template(config.cookie.name, **cookie_attributes(config))
            self._config = config
        prefix, suffix = self._template
        return prefix + codec.encode(instance, int(inp.now), inp.user_digest) + suffix


def response_headers(instance: InstanceId, set_cookie: str | None) -> tuple[Header, ...]:
    """Headers added to a forwarded response: ``X-Fly-Instance`` always, ``Set-Cookie`` when due."""
    if set_cookie is None:
        return ((INSTANCE_HEADER, instance),)
    return ((INSTANCE_HEADER, instance), ("Set-Cookie", set_cookie))


# ---------------------------------------------------------------------- the access log


def access_fields(method: str, path: str, status: int, seconds: float, routed: tuple[str, str, str],
                  request_id: str | None, remote: str | None) -> dict[str, Any]:
    """The fields of one access-log line. ``routed``: (action, instance, reason), ("refuse", "", "")
    when nothing was routed. Never the cookie, the user key or any header value."""
    action, instance, reason = routed
    return {
        "method": method, "path": path, "status": status, "duration_ms": round(seconds * 1000, 2),
        "action": action, "instance": instance or None, "reason": reason or None,
        "replay_target": instance if action == REPLAY else None, "request_id": request_id, "remote": remote,
    }


# ---------------------------------------------------------------------- after an upstream failure


def may_retry(method: str, has_body: bool) -> bool:
    """Retry only requests that are idempotent and carry no body (nothing consumed)."""
    return method in IDEMPOTENT_METHODS and not has_body


@dataclass(frozen=True, slots=True)
class Failed:
    """What to do after the instance failed before the response started.

    ``report_health``: mark the instance down now (``health.report_failure``); ``retry``: decide
    again avoiding it (``retry_input``) and carry that out as attempt 1; else answer ``answer``.
    Counted in every case: ``upstream_errors{instance, kind}`` (``failure_counts``)."""

    report_health: bool
    retry: bool
    answer: Answer | None


def after_failure(kind: str, status: int, *, retryable: bool, attempt: int, method: str, has_body: bool,
                  local: bool, health: bool) -> Failed:
    """``retryable``: nothing reached the instance (a connect failure). ``local``: the instance is
    one health checks (not a private-network peer); ``health``: health checking is on."""
    retry = retryable and attempt == 0 and may_retry(method, has_body)
    return Failed(report_health=retryable and health and local, retry=retry,
                  answer=None if retry else upstream_error(kind, status))


def failure_counts(instance: InstanceId, kind: str) -> tuple[Count, ...]:
    return (("upstream_errors", (instance, kind)),)


def retry_input(inp: RouteInput, failed: InstanceId, now: float | None = None) -> RouteInput:
    """The input of the retry's decision: the failed instance is avoided as dead."""
    avoid = {**inp.avoid, failed: RepinReason.DEAD}
    return replace(inp, avoid=avoid) if now is None else replace(inp, avoid=avoid, now=now)
