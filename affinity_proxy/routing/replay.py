"""fly-replay on the wire and the replay plan (README "Fly mode", docs/fly-protocol.md §1-2).

Pure: stdlib plus ``routing.model`` and ``routing.decide`` (for ``RepinReason``) only; no I/O, no
clocks, no aiohttp/asyncio. It builds and parses ``fly-replay`` values, parses the headers Fly's edge
adds to replayed requests (``fly-replay-src``, ``fly-replay-failed``,
``fly-preferred-instance-unavailable``), sorts what they say into "gone: re-pin" and "transient:
serve here once, keep the pin" (``triage``) and decides how a routing decision is carried out in
fly mode (``plan``): serve here, replay, or forward over the private network because Fly cannot
replay the body. Every parser treats its input as untrusted client data; none of these headers is
ever a security signal.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from affinity_proxy.routing.decide import RepinReason
from affinity_proxy.routing.model import InstanceId, MembershipView, is_valid_instance_id

REPLAY_HEADER = "fly-replay"
REPLAY_SRC_HEADER = "fly-replay-src"
REPLAY_FAILED_HEADER = "fly-replay-failed"
PREFERRED_UNAVAILABLE_HEADER = "fly-preferred-instance-unavailable"
FORCE_INSTANCE_HEADER = "fly-force-instance-id"
PREFER_INSTANCE_HEADER = "fly-prefer-instance-id"
#: Replay cache (docs/fly-protocol.md §1 "Replay caching"): a response header (``/path/*`` or
#: ``invalidate``), its TTL header, and the request header telling the target how it got there.
REPLAY_CACHE_HEADER = "fly-replay-cache"
REPLAY_CACHE_TTL_HEADER = "fly-replay-cache-ttl-secs"
REPLAY_CACHE_STATUS_HEADER = "fly-replay-cache-status"
CACHE_INVALIDATE = "invalidate"
CACHE_HIT = "hit"

#: Our ``state`` value: a request whose fly-replay-src carries it was replayed by a node of ours.
OUR_STATE_MARKER = "affinity"
#: Bodies larger than this cannot be replayed by Fly (docs/fly-protocol.md §1 "Size limits").
MAX_REPLAY_BODY = 1_000_000
#: Fly re-replays a request at most this many times, then answers PA02.
MAX_REPLAYS = 10
#: Methods whose body Fly may not be able to replay when its length is unknown (rubys/navigator).
UNSIZED_METHODS: frozenset[str] = frozenset({"POST", "PUT", "PATCH"})
#: ``timeout`` sent with every replay by default (seconds). docs/fly-protocol.md §1: it bounds the time until a
#: connection to the target is made (a stopped Machine boots in ~2 s, docs/fly-protocol.md §6.3), and with a
#: ``fallback`` it turns "target destroyed / unreachable" into a request back to us, not a 5xx.
DEFAULT_REPLAY_TIMEOUT = 10.0
#: ``fallback`` sent with every replay by default: back to the replayer, or any Machine of the app
#: when the replayer is gone itself (docs/fly-protocol.md §1 ``prefer_self``), so a destroyed
#: target never strands a user.
DEFAULT_FALLBACK = "prefer_self"
#: Kept for callers of the old name (the default ``timeout``).
PREFER_TIMEOUT = DEFAULT_REPLAY_TIMEOUT
FALLBACKS: frozenset[str] = frozenset({"prefer_self", "force_self"})
FAILED_REASONS: frozenset[str] = frozenset({"timeout", "retries_exhausted", "no_candidate"})

_STATE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_REGION = re.compile(r"[A-Za-z0-9-]{1,32}")
_APP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
_DURATION = re.compile(r"(\d{1,9})(ms|s|m)")
_DIGITS = re.compile(r"\d{1,20}")
_BARE_VALUE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x7e]*")  # visible ASCII minus " , ;
_MAX_HEADER = 4096


# --------------------------------------------------------------------------- fly-replay values


def format_duration(seconds: float) -> str:
    """``5`` -> ``5s``, ``0.8`` -> ``800ms``. ValueError unless finite and at least 1 ms."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise ValueError(f"timeout must be a finite number of seconds, got {seconds!r}")
    ms = round(seconds * 1000) if -86_401 < seconds < 86_401 else -1  # huge floats: * 1000 is inf
    if ms < 1 or ms > 86_400_000:
        raise ValueError(f"timeout must be between 1ms and 24h, got {seconds!r}")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def parse_duration(text: str) -> float:
    """``10s`` / ``800ms`` / ``2m`` -> seconds. ValueError for anything else."""
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"invalid duration {text!r}")
    number, unit = int(match.group(1)), match.group(2)
    return number / 1000 if unit == "ms" else float(number * (60 if unit == "m" else 1))


def _instance(name: str, value: str) -> str:
    if not isinstance(value, str) or not is_valid_instance_id(value):
        raise ValueError(f"{name}: invalid instance id {value!r}")
    return value


def _regions(region: Sequence[str] | str) -> list[str]:
    items = region.split(",") if isinstance(region, str) else list(region)
    if not items:
        raise ValueError("region: empty list")
    for item in items:
        if not isinstance(item, str) or not _REGION.fullmatch(item):
            raise ValueError(f"region: invalid region code {item!r}")
    return items


def format_replay_header(
    instance: str | None = None,
    *,
    prefer_instance: str | None = None,
    region: Sequence[str] | str | None = None,
    app: str | None = None,
    state: str | None = None,
    elsewhere: bool = False,
    timeout: float | None = None,
    fallback: str | None = None,
) -> str:
    """The ``fly-replay`` header value: ``;``-separated ``key=value`` pairs (docs/fly-protocol.md §1).

    A region list of several codes is written as a double-quoted comma list; ``timeout`` as
    ``5s``/``800ms``. Every value is validated against a strict charset, so nothing the caller
    passes (client data included) can inject ``;``, ``,``, ``"``, CR or LF. Raises ValueError for
    an invalid value, for both ``instance`` and ``prefer_instance``, or for an empty instruction.
    """
    parts: list[str] = []
    if instance is not None and prefer_instance is not None:
        raise ValueError("instance and prefer_instance are mutually exclusive")
    if instance is not None:
        parts.append(f"instance={_instance('instance', instance)}")
    if prefer_instance is not None:
        parts.append(f"prefer_instance={_instance('prefer_instance', prefer_instance)}")
    if region is not None:
        codes = _regions(region)
        parts.append(f"region={codes[0]}" if len(codes) == 1 else f'region="{",".join(codes)}"')
    if app is not None:
        if not isinstance(app, str) or not _APP.fullmatch(app):
            raise ValueError(f"app: invalid app name {app!r}")
        parts.append(f"app={app}")
    if state is not None:
        if not isinstance(state, str) or not _STATE.fullmatch(state):
            raise ValueError(f"state: must match [A-Za-z0-9_.:-]{{1,64}}, got {state!r}")
        parts.append(f"state={state}")
    if elsewhere:
        parts.append("elsewhere=true")
    if timeout is not None:
        parts.append(f"timeout={format_duration(timeout)}")
    if fallback is not None:
        if not isinstance(fallback, str) or fallback not in FALLBACKS:
            raise ValueError(f"fallback: must be one of {sorted(FALLBACKS)}, got {fallback!r}")
        parts.append(f"fallback={fallback}")
    if not parts:
        raise ValueError("empty fly-replay instruction")
    return ";".join(parts)


def _split_fields(value: str) -> list[tuple[str, str, bool]]:
    """``(key, raw value, quoted)`` for each ``;``-separated field; ``;`` inside quotes is kept."""
    fields: list[tuple[str, str, bool]] = []
    i, n = 0, len(value)
    while i < n:
        end = i
        while end < n and value[end] != ";":
            if value[end] == '"':
                close = value.find('"', end + 1)
                if close < 0:
                    raise ValueError("unterminated quoted value")
                end = close
            end += 1
        segment = value[i:end].strip(" ")
        i = end + 1
        if not segment:
            continue
        key, eq, raw = segment.partition("=")
        key, raw = key.strip(" "), raw.strip(" ")
        if not eq or not _KEY.fullmatch(key):
            raise ValueError(f"not a key=value field: {segment!r}")
        quoted = len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"'
        inner = raw[1:-1] if quoted else raw
        if '"' in inner or (not quoted and not _BARE_VALUE.fullmatch(inner)):
            raise ValueError(f"invalid value for {key!r}: {raw!r}")
        fields.append((key.lower(), inner, quoted))
    return fields


def parse_replay_header(value: str) -> dict[str, str | list[str]]:
    """Parse a ``fly-replay`` value into ``{key: value}``; quoted values become lists.

    Tolerates spaces and tabs around fields and separators and empty fields (``a=1;;b=2;``);
    keys are lower-cased. Raises ValueError (and only ValueError, for any input) for an empty
    value, a field without ``=``, an unquoted ``,`` (the comma-separated form docs/fly-protocol.md calls a
    pitfall), stray quotes, control or non-ASCII characters, a repeated key, or more than 4 KiB.
    Syntax only: see ``parse_replay_instruction`` for the meaning of the fields.
    """
    if not isinstance(value, str):
        raise ValueError(f"fly-replay must be a string, got {type(value).__name__}")
    value = value.replace("\t", " ")
    if len(value) > _MAX_HEADER or not value.isascii() or not value.isprintable():
        raise ValueError("fly-replay has invalid characters or is too long")
    out: dict[str, str | list[str]] = {}
    for key, inner, quoted in _split_fields(value):
        if key in out:
            raise ValueError(f"repeated field {key!r}")
        if quoted:
            items = [item.strip() for item in inner.split(",")]
            if any(not _BARE_VALUE.fullmatch(item) or not item for item in items):
                raise ValueError(f"invalid list for {key!r}: {inner!r}")
            out[key] = items
        else:
            out[key] = inner
    if not out:
        raise ValueError("empty fly-replay")
    return out


@dataclass(frozen=True, slots=True)
class ReplayInstruction:
    """A validated ``fly-replay`` instruction (what Fly's edge acts on)."""

    instance: InstanceId | None = None
    prefer_instance: InstanceId | None = None
    region: tuple[str, ...] = ()
    app: str | None = None
    state: str | None = None
    elsewhere: bool = False
    timeout: float | None = None
    fallback: str | None = None


def parse_replay_instruction(value: str) -> ReplayInstruction:
    """``parse_replay_header`` plus field validation. Unknown fields are ignored (Fly adds new
    ones over time). Raises ValueError (Fly's PA03 "invalid fly-replay") for any invalid field.
    """
    fields = parse_replay_header(value)

    def one(key: str) -> str | None:
        got = fields.get(key)
        if isinstance(got, list):
            raise ValueError(f"{key}: a list is not allowed here")
        return got

    instance, prefer = one("instance"), one("prefer_instance")
    region_raw = fields.get("region")
    regions = tuple(_regions(region_raw)) if region_raw is not None else ()
    app, state = one("app"), one("state")
    if app is not None and not _APP.fullmatch(app):
        raise ValueError(f"app: invalid app name {app!r}")
    elsewhere_raw = (one("elsewhere") or "false").lower()
    if elsewhere_raw not in ("true", "false"):
        raise ValueError(f"elsewhere: must be true or false, got {elsewhere_raw!r}")
    timeout_raw, fallback = one("timeout"), one("fallback")
    if fallback is not None and fallback not in FALLBACKS:
        raise ValueError(f"fallback: must be one of {sorted(FALLBACKS)}, got {fallback!r}")
    return ReplayInstruction(
        instance=InstanceId(_instance("instance", instance)) if instance is not None else None,
        prefer_instance=InstanceId(_instance("prefer_instance", prefer)) if prefer is not None else None,
        region=regions,
        app=app,
        state=state,
        elsewhere=elsewhere_raw == "true",
        timeout=parse_duration(timeout_raw) if timeout_raw is not None else None,
        fallback=fallback,
    )


# --------------------------------------------------------------------------- headers on replayed requests


def _loose_fields(value: object) -> dict[str, str] | None:
    """fly-ruby's ``(.*?)=(.*?)($|;)`` reading: ``;``-split, first ``=`` splits; first key wins."""
    if not isinstance(value, str) or not value or len(value) > _MAX_HEADER or not value.isprintable():
        return None
    out: dict[str, str] = {}
    for segment in value.split(";"):
        key, eq, raw = segment.partition("=")
        key = key.strip().lower()
        if eq and key:
            out.setdefault(key, raw.strip())
    return out


def _id_or_none(value: str | None) -> InstanceId | None:
    return InstanceId(value) if value is not None and is_valid_instance_id(value) else None


def _token_or_none(value: str | None, pattern: re.Pattern[str]) -> str | None:
    return value if value is not None and pattern.fullmatch(value) else None


@dataclass(frozen=True, slots=True)
class ReplaySource:
    """``fly-replay-src``: ``instance`` is the machine that SENT the fly-replay (the replayer, not
    the target); ``t`` is microseconds since the epoch; ``state`` is echoed from the replay (may be "").
    """

    instance: InstanceId | None
    region: str | None
    t: int | None
    state: str | None

    @property
    def ours(self) -> bool:
        """The replay carried our ``state`` marker (a node of ours replayed it)."""
        return carries_our_marker(self.state)


def carries_our_marker(state: str | None, marker: str = OUR_STATE_MARKER) -> bool:
    """``state`` is our marker, or starts with ``<marker>:``."""
    return isinstance(state, str) and (state == marker or state.startswith(marker + ":"))


def parse_replay_src(value: str | None) -> ReplaySource | None:
    """Parse ``instance=<id>;region=<r>;t=<us>;state=<s>``. Never raises.

    Unknown fields are ignored, an invalid field becomes None (``state`` may be empty), and the
    result is None when the value is missing, has control characters, or has none of the four
    fields. Callers that guard against loops on the header's mere presence must check that
    themselves.
    """
    fields = _loose_fields(value)
    if not fields or not fields.keys() & {"instance", "region", "t", "state"}:
        return None
    t_raw = fields.get("t")
    state = fields.get("state")
    return ReplaySource(
        instance=_id_or_none(fields.get("instance")),
        region=_token_or_none(fields.get("region"), _REGION),
        t=int(t_raw) if t_raw is not None and _DIGITS.fullmatch(t_raw) else None,
        state=state if state is None or _STATE.fullmatch(state) else (None if state else ""),
    )


@dataclass(frozen=True, slots=True)
class ReplayFailed:
    """``fly-replay-failed``: the replay to ``instance`` (the target) failed and came back here."""

    instance: InstanceId | None
    app: str | None
    region: str | None
    replay_source: InstanceId | None
    elapsed_ms: int | None
    reason: str | None  # timeout | retries_exhausted | no_candidate, else None


def parse_replay_failed(value: str | None) -> ReplayFailed | None:
    """Parse ``instance=..;app=..;region=..;replay_source=..;reason=..;elapsed_ms=..``. Never raises;
    None when no known field is present."""
    fields = _loose_fields(value)
    known = {"instance", "app", "region", "replay_source", "elapsed_ms", "reason"}
    if not fields or not fields.keys() & known:
        return None
    elapsed = fields.get("elapsed_ms")
    reason = fields.get("reason")
    return ReplayFailed(
        instance=_id_or_none(fields.get("instance")),
        app=_token_or_none(fields.get("app"), _APP),
        region=_token_or_none(fields.get("region"), _REGION),
        replay_source=_id_or_none(fields.get("replay_source")),
        elapsed_ms=int(elapsed) if elapsed is not None and _DIGITS.fullmatch(elapsed) else None,
        reason=reason if reason in FAILED_REASONS else None,
    )


def parse_unavailable(value: str | None) -> InstanceId | None:
    """``fly-preferred-instance-unavailable: <id>`` -> the id, or None when missing/invalid. Never raises."""
    return _id_or_none(value.strip()) if isinstance(value, str) else None


# --------------------------------------------------------------------------- the plan


class PlanReason(StrEnum):
    LOCAL = "local"
    LOOP_GUARD = "loop_guard"
    FALLBACK = "fallback"  # a fallback request (fly-replay-failed): Fly forbids another replay (PA03)
    UNREACHABLE = "unreachable"  # Fly could not deliver to the target just now: serve here, keep the pin
    INVALID_TARGET = "invalid_target"
    REPLAY = "replay"
    BODY_TOO_LARGE = "body_too_large"
    UNKNOWN_LENGTH = "unknown_length"
    FOREIGN_REPLAY = "foreign_replay"  # replayed in by someone else (a router app): never replayed again
    CACHE_INVALIDATE = "cache_invalidate"  # Fly's replay cache sent a user here who belongs elsewhere


@dataclass(frozen=True, slots=True)
class BodyInfo:
    """The request body as its headers describe it (``content_length`` None when absent)."""

    method: str
    content_length: int | None
    chunked: bool


@dataclass(frozen=True, slots=True)
class LocalForward:
    """Forward to the local app. ``loop_guard``: the decision named another instance but the
    request was already replayed by us or is a fallback; the caller re-pins the user here.
    ``keep_pin``: the decision named an instance Fly could not deliver to just now (at its
    ``hard_limit``, slow to start); serve here once and leave the pin and cookie alone."""

    instance: InstanceId
    reason: PlanReason = PlanReason.LOCAL
    loop_guard: bool = False
    keep_pin: bool = False


@dataclass(frozen=True, slots=True)
class Replay:
    """Answer with ``fly-replay: <header>`` so Fly's edge replays the request on ``instance``.
    ``invalidate``: also send ``fly-replay-cache: invalidate`` (the request came from Fly's replay
    cache, whose entry names the wrong Machine)."""

    instance: InstanceId
    header: str
    reason: PlanReason = PlanReason.REPLAY
    invalidate: bool = False


@dataclass(frozen=True, slots=True)
class PrivateForward:
    """Forward to ``instance`` over the private network: Fly cannot replay this body."""

    instance: InstanceId
    reason: PlanReason


Plan = LocalForward | Replay | PrivateForward


def body_replayable(
    body: BodyInfo, *, max_replay_body: int = MAX_REPLAY_BODY, unsized_methods: Collection[str] = UNSIZED_METHODS
) -> PlanReason | None:
    """None when Fly can replay ``body``; else why not. A chunked body of any method counts as
    unknown length (it may be of any size); so does a missing length on ``unsized_methods``."""
    length = body.content_length if isinstance(body.content_length, int) and body.content_length >= 0 else None
    method = body.method.upper() if isinstance(body.method, str) else ""
    if body.chunked or (length is None and method in unsized_methods):
        return PlanReason.UNKNOWN_LENGTH
    if length is not None and length > max_replay_body:
        return PlanReason.BODY_TOO_LARGE
    return None


def replay_header_for(
    target: str,
    *,
    prefer_instance: bool = False,
    timeout: float | None = DEFAULT_REPLAY_TIMEOUT,
    fallback: str | None = DEFAULT_FALLBACK,
    state: str | None = OUR_STATE_MARKER,
    cacheable: bool = False,
) -> str:
    """The fly-replay value ``plan`` sends: ``instance=<id>;state=..;timeout=..;fallback=..`` or,
    with ``prefer_instance``, the same with ``prefer_instance=<id>``. ``timeout``/``fallback`` None
    leave the field out. When an option is invalid the minimal ``instance=<id>;state=affinity`` is
    returned. ValueError only for an invalid ``target``.

    ``cacheable``: the form Fly's replay cache may keep, ``prefer_instance=<id>`` alone. A cached
    replay may not carry ``state``, ``timeout`` or ``fallback`` (docs/fly-protocol.md §1 "Replay
    caching"); ``prefer_instance`` keeps "a destroyed target never strands a user": Fly then
    delivers to another Machine with ``fly-preferred-instance-unavailable`` (``triage``).
    """
    if cacheable:
        return format_replay_header(prefer_instance=target)
    try:
        if prefer_instance:
            return format_replay_header(prefer_instance=target, state=state, timeout=timeout, fallback=fallback)
        return format_replay_header(target, state=state, timeout=timeout, fallback=fallback)
    except (ValueError, TypeError):
        return format_replay_header(target, state=OUR_STATE_MARKER)


@dataclass(frozen=True, slots=True)
class Triage:
    """What Fly's re-pin signals mean for one request: ``avoid`` (re-pin away, with the reason:
    the Machine is gone) and ``unreachable`` (not deliverable just now: serve here, keep the pin)."""

    avoid: Mapping[InstanceId, RepinReason]
    unreachable: frozenset[InstanceId]


NO_SIGNALS = Triage({}, frozenset())


def triage(
    unavailable: InstanceId | None,
    failed: ReplayFailed | None,
    view: MembershipView,
    *,
    static_membership: bool = False,
) -> Triage:
    """Sort ``fly-preferred-instance-unavailable`` and ``fly-replay-failed`` into gone vs transient.

    Fly sends ``fly-preferred-instance-unavailable`` both for a Machine that is not found and for
    one merely at its ``hard_limit`` (docs/fly-protocol.md §1 ``prefer_instance``), and a fallback's ``reason``
    (``timeout``/``retries_exhausted``/``no_candidate``) does not say which either. So the
    membership decides: a named Machine that is not routable in ``view`` (gone, or down) is
    avoided (re-pin reasons ``unavailable``/``replay_failed``); a routable one is ``unreachable``
    (its pins are kept). With ``static_membership`` (nothing else will ever say a Machine is gone)
    Fly's word is taken for it when it can only mean "not found": ``no_candidate`` and
    ``fly-preferred-instance-unavailable``. Pure; never raises.
    """
    avoid: dict[InstanceId, RepinReason] = {}
    unreachable: set[InstanceId] = set()
    if unavailable is not None:
        if static_membership or not view.is_routable(unavailable):
            avoid[unavailable] = RepinReason.UNAVAILABLE
        else:
            unreachable.add(unavailable)
    if failed is not None and failed.instance is not None:
        target = failed.instance
        if not view.is_routable(target) or (static_membership and failed.reason == "no_candidate"):
            avoid[target] = RepinReason.REPLAY_FAILED
        else:
            unreachable.add(target)
    if not avoid and not unreachable:
        return NO_SIGNALS
    return Triage(avoid, frozenset(unreachable - avoid.keys()))


def plan(
    route_instance: InstanceId,
    *,
    local_instance: InstanceId,
    replay_src: ReplaySource | None,
    body: BodyInfo,
    is_websocket: bool,
    fallback_request: bool = False,
    unreachable: Collection[str] = frozenset(),
    prefer_instance: bool = False,
    timeout: float | None = DEFAULT_REPLAY_TIMEOUT,
    fallback: str | None = DEFAULT_FALLBACK,
    state: str | None = OUR_STATE_MARKER,
    max_replay_body: int = MAX_REPLAY_BODY,
    unsized_methods: Collection[str] = UNSIZED_METHODS,
    cacheable: bool = False,
    cache_hit: bool = False,
) -> Plan:
    """How to carry out "serve on ``route_instance``" on the node running ``local_instance``.

    Rules, in order:

    1. the local instance -> ``LocalForward`` (local);
    2. an instance in ``unreachable`` (Fly just could not deliver there, ``triage``) ->
       ``LocalForward`` with ``keep_pin`` (serve here once, the pin stays);
    3. a fallback request (``fly-replay-failed``; Fly forbids a replay from it, PA03, and does not
       promise ``fly-replay-src`` on it) -> ``LocalForward`` with ``loop_guard`` (fallback);
    4. a request replayed by one of our nodes (our marker in ``replay_src.state``) ->
       ``LocalForward`` with ``loop_guard`` (serve here and re-pin here: never replay twice);
    5. an invalid target id -> ``LocalForward`` (invalid_target);
    6. a request replayed to us by anything else (``fly-replay-src`` without our marker: a router
       app replaying into ours with ``app=``) is never answered with another replay either; it
       gets affinity through the private network -> ``PrivateForward`` (foreign_replay), any body,
       WebSocket upgrades included;
    7. a body Fly cannot replay (``body_replayable``) -> ``PrivateForward``, except for WebSocket
       upgrades, which are always replayed;
    8. otherwise ``Replay`` with ``replay_header_for``: in the cacheable form when ``cacheable``
       (``fly.replay_cache`` on and the request carries something Fly's cache is keyed on), with
       ``invalidate`` when ``cache_hit`` (``fly-replay-cache-status: hit``: Fly's cache sent the
       request here, so its entry names the wrong Machine; reason ``cache_invalidate``).

    A cache hit carries no ``fly-replay-src`` (docs/fly-protocol.md §1), so rules 4 and 6 do not
    apply to it: it is one hop old, and the invalidating replay is the only one we add (a second
    replay is never made from the request that replay delivers: it carries ``fly-replay-src``).
    Never returns ``Replay`` to the local instance. Pure and O(1); never raises for any input.
    """
    if route_instance == local_instance:
        return LocalForward(local_instance)
    if route_instance in unreachable:
        return LocalForward(local_instance, PlanReason.UNREACHABLE, keep_pin=True)
    if fallback_request:
        return LocalForward(local_instance, PlanReason.FALLBACK, loop_guard=True)
    if replay_src is not None and replay_src.ours:
        return LocalForward(local_instance, PlanReason.LOOP_GUARD, loop_guard=True)
    if not isinstance(route_instance, str) or not is_valid_instance_id(route_instance):
        return LocalForward(local_instance, PlanReason.INVALID_TARGET)
    target = InstanceId(route_instance)
    if replay_src is not None:
        return PrivateForward(target, PlanReason.FOREIGN_REPLAY)
    if not is_websocket:
        try:
            why = body_replayable(body, max_replay_body=max_replay_body, unsized_methods=unsized_methods)
        except (AttributeError, TypeError):
            why = PlanReason.UNKNOWN_LENGTH
        if why is not None:
            return PrivateForward(target, why)
    header = replay_header_for(target, prefer_instance=prefer_instance, timeout=timeout, fallback=fallback,
                               state=state, cacheable=cacheable)
    if cache_hit:
        return Replay(target, header, PlanReason.CACHE_INVALIDATE, invalidate=True)
    return Replay(target, header)
