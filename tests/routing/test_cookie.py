"""The signed affinity cookie: round trip, tamper and secret checks, time limits, unsigned mode,
header-injection safety and the Set-Cookie builder."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from affinity_proxy.routing.cookie import (
    MAX_COOKIE_LENGTH,
    MAX_FUTURE_SKEW,
    AffinityCookie,
    CookieCodec,
    CookieProblem,
    expire_cookie_value,
    set_cookie_value,
)
from affinity_proxy.routing.model import InstanceId

NOW = 1_700_000_000
COOKIE_OCTETS = re.compile(r"[\x21\x23-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]*")

instance_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)
digests = st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9_-]{0,43}", fullmatch=True))
issued = st.integers(min_value=0, max_value=2**42)


@pytest.fixture
def codec() -> CookieCodec:
    return CookieCodec("current-secret", ["older-secret", "oldest-secret"])


def signed(instance: str = "i-1", issued_at: int = NOW, digest: str = "", secret: str = "current-secret") -> str:
    return CookieCodec(secret).encode(InstanceId(instance), issued_at, digest)


@given(instance=instance_ids, issued_at=issued, digest=digests, is_signed=st.booleans())
def test_round_trip(instance: str, issued_at: int, digest: str, is_signed: bool) -> None:
    codec = CookieCodec("s" if is_signed else None, signed=is_signed)
    raw = codec.encode(InstanceId(instance), issued_at, digest)
    assert COOKIE_OCTETS.fullmatch(raw) and len(raw) <= MAX_COOKIE_LENGTH
    assert codec.decode(raw, issued_at) == AffinityCookie(InstanceId(instance), issued_at, digest)
    assert codec.decode(raw, issued_at + 10) == AffinityCookie(InstanceId(instance), issued_at, digest)


def test_wire_format_is_documented_shape(codec: CookieCodec) -> None:
    raw = codec.encode(InstanceId("i-abc.1_2"), NOW, codec.user_digest("alice"))
    version, instance, issued_at, digest, sig = raw.split("~")
    assert (version, instance, int(issued_at, 36)) == ("1", "i-abc.1_2", NOW)
    assert len(digest) == 12 and len(sig) == 22
    unsigned = CookieCodec(None, signed=False).encode(InstanceId("i-abc"), NOW, "")
    assert unsigned == f"1~i-abc~{issued_at}~"


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.characters()),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.characters()),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.just("")),
)


@given(instance=instance_ids, digest=digests, mutation=mutations)
def test_any_tampering_is_rejected(instance: str, digest: str, mutation: tuple[str, int, str]) -> None:
    codec = CookieCodec("current-secret", ["older-secret"])
    raw = codec.encode(InstanceId(instance), NOW, digest)
    kind, index, char = mutation
    at = index % (len(raw) + (1 if kind == "insert" else 0))
    if kind == "flip":
        if raw[at] == char:
            return
        tampered = raw[:at] + char + raw[at + 1 :]
    elif kind == "insert":
        tampered = raw[:at] + char + raw[at:]
    else:
        tampered = raw[:at] + raw[at + 1 :]
    assert isinstance(codec.decode(tampered, NOW), CookieProblem)


@given(raw=st.text(), now=st.floats(allow_nan=True, allow_infinity=True), is_signed=st.booleans())
def test_decode_never_raises(raw: str, now: float, is_signed: bool) -> None:
    codec = CookieCodec("s" if is_signed else None, signed=is_signed)
    result = codec.decode(raw, now)
    assert isinstance(result, (AffinityCookie, CookieProblem))


@given(raw=st.text(alphabet="1~abcdefz0-_.ABC", max_size=80))
def test_decode_never_raises_on_near_miss_shapes(raw: str) -> None:
    for codec in (CookieCodec("s"), CookieCodec(None, signed=False)):
        assert isinstance(codec.decode(raw, NOW), (AffinityCookie, CookieProblem))


def test_wrong_secret_is_rejected(codec: CookieCodec) -> None:
    assert codec.decode(signed(secret="attacker"), NOW) is CookieProblem.BAD_SIGNATURE


def test_previous_secrets_are_accepted_and_flagged_for_reissue(codec: CookieCodec) -> None:
    current = codec.decode(signed(), NOW)
    assert isinstance(current, AffinityCookie) and not codec.needs_reissue(current)
    for old in ("older-secret", "oldest-secret"):
        cookie = codec.decode(signed(secret=old), NOW)
        assert cookie == AffinityCookie(InstanceId("i-1"), NOW, "")
        assert isinstance(cookie, AffinityCookie) and codec.needs_reissue(cookie)
    reissued = codec.decode(codec.encode(InstanceId("i-1"), NOW, ""), NOW)
    assert isinstance(reissued, AffinityCookie) and not codec.needs_reissue(reissued)


def test_retired_secret_is_rejected() -> None:
    assert CookieCodec("new").decode(signed(secret="current-secret"), NOW) is CookieProblem.BAD_SIGNATURE


def test_empty_previous_secrets_are_ignored() -> None:
    codec = CookieCodec("s", ["", "old"])
    assert isinstance(codec.decode(signed(secret="old"), NOW), AffinityCookie)


@pytest.mark.parametrize(
    ("issued_at", "expected"),
    [
        pytest.param(NOW, "ok", id="now"),
        pytest.param(NOW - 604800, "ok", id="exactly-max-age"),
        pytest.param(NOW - 604801, CookieProblem.EXPIRED, id="older-than-max-age"),
        pytest.param(0, CookieProblem.EXPIRED, id="epoch"),
        pytest.param(NOW + MAX_FUTURE_SKEW, "ok", id="future-within-skew"),
        pytest.param(NOW + MAX_FUTURE_SKEW + 1, CookieProblem.MALFORMED, id="future-beyond-skew"),
    ],
)
def test_time_limits(codec: CookieCodec, issued_at: int, expected: object) -> None:
    result = codec.decode(signed(issued_at=issued_at), NOW)
    if expected == "ok":
        assert result == AffinityCookie(InstanceId("i-1"), issued_at, "")
    else:
        assert result is expected


def test_cache_still_checks_time_on_every_call() -> None:
    codec = CookieCodec("current-secret", max_age=100)
    raw = signed(issued_at=NOW)
    assert isinstance(codec.decode(raw, NOW), AffinityCookie)
    assert codec.decode(raw, NOW + 101) is CookieProblem.EXPIRED
    assert codec.decode(raw, NOW - MAX_FUTURE_SKEW - 1) is CookieProblem.MALFORMED
    assert isinstance(codec.decode(raw, NOW + 50), AffinityCookie)


def test_cache_is_bounded_and_optional() -> None:
    codec = CookieCodec("current-secret", cache_size=2)
    raws = [signed(instance=f"i-{n}") for n in range(5)]
    for raw in raws:
        assert isinstance(codec.decode(raw, NOW), AffinityCookie)
    assert len(codec._cache) == 2
    assert all(isinstance(codec.decode(raw, NOW), AffinityCookie) for raw in raws)
    uncached = CookieCodec("current-secret", cache_size=0)
    assert isinstance(uncached.decode(raws[0], NOW), AffinityCookie)
    assert len(uncached._cache) == 0


def test_rejections_are_not_cached(codec: CookieCodec) -> None:
    codec.decode(signed(secret="attacker"), NOW)
    codec.decode("garbage", NOW)
    assert len(codec._cache) == 0


def test_oversized() -> None:
    codec = CookieCodec("s")
    assert codec.decode("1~" + "a" * MAX_COOKIE_LENGTH, NOW) is CookieProblem.OVERSIZED
    assert codec.decode("x" * MAX_COOKIE_LENGTH, NOW) is CookieProblem.MALFORMED


GOOD = signed()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("", CookieProblem.MALFORMED, id="empty"),
        pytest.param("i-1", CookieProblem.MALFORMED, id="bare-id-when-signed"),
        pytest.param(GOOD + "\r\nSet-Cookie: admin=1", CookieProblem.MALFORMED, id="crlf"),
        pytest.param(GOOD + "\n", CookieProblem.MALFORMED, id="lf"),
        pytest.param(GOOD + "; Domain=evil", CookieProblem.MALFORMED, id="semicolon"),
        pytest.param(f'"{GOOD}"', CookieProblem.MALFORMED, id="quoted"),
        pytest.param(GOOD.replace("~", "\\", 1), CookieProblem.MALFORMED, id="backslash"),
        pytest.param(GOOD.replace("~", ",", 1), CookieProblem.MALFORMED, id="comma"),
        pytest.param(" " + GOOD, CookieProblem.MALFORMED, id="space"),
        pytest.param(GOOD + "\x00", CookieProblem.MALFORMED, id="nul"),
        pytest.param(GOOD.replace("i-1", "i-é"), CookieProblem.MALFORMED, id="non-ascii"),
        pytest.param(GOOD.replace("i-1", "-i1"), CookieProblem.MALFORMED, id="bad-instance-shape"),
        pytest.param(GOOD.replace("i-1", "a" * 65), CookieProblem.MALFORMED, id="instance-too-long"),
        pytest.param("1~~s44we8~~" + GOOD.rsplit("~", 1)[1], CookieProblem.MALFORMED, id="empty-instance"),
        pytest.param("1~i-1~S44WE8~~" + "A" * 22, CookieProblem.MALFORMED, id="uppercase-time"),
        pytest.param("1~i-1~0s44we8~~" + "A" * 22, CookieProblem.MALFORMED, id="leading-zero-time"),
        pytest.param("1~i-1~s44we8~~~" + "A" * 22, CookieProblem.MALFORMED, id="extra-part"),
        pytest.param("1~i-1~s44we8~a+b~" + "A" * 22, CookieProblem.MALFORMED, id="bad-digest"),
        pytest.param("2" + GOOD[1:], CookieProblem.UNKNOWN_VERSION, id="version-2"),
        pytest.param("99~anything", CookieProblem.UNKNOWN_VERSION, id="version-99"),
        pytest.param("v1" + GOOD[1:], CookieProblem.MALFORMED, id="non-numeric-version"),
        pytest.param(GOOD.rsplit("~", 1)[0], CookieProblem.BAD_SIGNATURE, id="missing-signature"),
        pytest.param(GOOD.rsplit("~", 1)[0] + "~", CookieProblem.BAD_SIGNATURE, id="empty-signature"),
        pytest.param(GOOD[:-1], CookieProblem.BAD_SIGNATURE, id="short-signature"),
        pytest.param(GOOD + "A", CookieProblem.BAD_SIGNATURE, id="long-signature"),
        pytest.param(GOOD.replace("i-1", "i-2"), CookieProblem.BAD_SIGNATURE, id="other-instance"),
    ],
)
def test_rejection_table(codec: CookieCodec, raw: str, expected: CookieProblem) -> None:
    assert codec.decode(raw, NOW) is expected


def test_unsigned_mode_accepts_the_format_and_a_bare_instance_id() -> None:
    codec = CookieCodec(None, signed=False)
    assert codec.decode("1~i-1~s44we8~", NOW) == AffinityCookie(InstanceId("i-1"), int("s44we8", 36), "")
    assert codec.decode(GOOD, NOW) == AffinityCookie(InstanceId("i-1"), NOW, "")  # a signature is ignored
    assert codec.decode("e784079f432e83", NOW) == AffinityCookie(InstanceId("e784079f432e83"), NOW, "")
    assert codec.decode("machine.v2_x", NOW + 0.7) == AffinityCookie(InstanceId("machine.v2_x"), NOW, "")
    # a bare id is never cached: it is as fresh as the request
    assert codec.decode("e784079f432e83", NOW + 500) == AffinityCookie(InstanceId("e784079f432e83"), NOW + 500, "")
    assert codec.decode("e784079f432e83", float("nan")) == AffinityCookie(InstanceId("e784079f432e83"), 0, "")
    for bad in ("-leading-dash", "a" * 65, "a b", "a;b", "", "a\r\n"):
        assert codec.decode(bad, NOW) is CookieProblem.MALFORMED
    assert codec.decode("1~i-1~s44we8~~not+b64", NOW) is CookieProblem.MALFORMED
    assert codec.decode("2~i-1~s44we8~", NOW) is CookieProblem.UNKNOWN_VERSION


def test_encode_rejects_invalid_input(codec: CookieCodec) -> None:
    for instance, issued_at, digest in [
        ("-bad", NOW, ""),
        ("a~b", NOW, ""),
        ("i-1", -1, ""),
        ("i-1", True, ""),
        ("i-1", NOW, "has space"),
        ("i-1", NOW, "x" * 44),
    ]:
        with pytest.raises(ValueError):
            codec.encode(InstanceId(instance), issued_at, digest)


def test_a_signed_codec_needs_a_secret() -> None:
    for secret in (None, ""):
        with pytest.raises(ValueError):
            CookieCodec(secret)
    with pytest.raises(ValueError):
        CookieCodec("s", max_age=0)
    CookieCodec(None, signed=False)


def test_user_digest() -> None:
    codec = CookieCodec("current-secret")
    assert codec.user_digest(None) == ""
    digest = codec.user_digest("alice@example.com")
    assert re.fullmatch(r"[A-Za-z0-9_-]{12}", digest)
    assert digest == CookieCodec("current-secret", ["x"]).user_digest("alice@example.com")
    assert digest != codec.user_digest("bob@example.com")
    assert digest != CookieCodec("other-secret").user_digest("alice@example.com")
    assert "alice" not in codec.encode(InstanceId("i-1"), NOW, digest)
    unsigned = CookieCodec(None, signed=False).user_digest("alice@example.com")
    assert re.fullmatch(r"[A-Za-z0-9_-]{12}", unsigned) and unsigned != digest
    assert codec.user_digest("\udcff odd surrogate")  # never raises


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            dict(max_age=604800, path="/", domain=None, secure=False, http_only=True, same_site="Lax"),
            "fly-instance-id=v; Max-Age=604800; Path=/; HttpOnly; SameSite=Lax",
        ),
        (
            dict(max_age=60, path="/app", domain="example.com", secure=True, http_only=True, same_site="none"),
            "fly-instance-id=v; Max-Age=60; Path=/app; Domain=example.com; Secure; HttpOnly; SameSite=None",
        ),
        (
            dict(max_age=0, path="/", domain=".example.com", secure=True, http_only=False, same_site="STRICT"),
            "fly-instance-id=v; Max-Age=0; Path=/; Domain=.example.com; Secure; SameSite=Strict",
        ),
        (
            dict(max_age=10, path="/", domain="", secure=False, http_only=False, same_site=""),
            "fly-instance-id=v; Max-Age=10; Path=/",
        ),
    ],
)
def test_set_cookie_value_attributes(kwargs: dict, expected: str) -> None:
    assert set_cookie_value("fly-instance-id", "v", **kwargs) == expected


@pytest.mark.parametrize(
    "override",
    [
        {"name": "bad name"},
        {"name": "a;b"},
        {"name": ""},
        {"value": "a;b"},
        {"value": "a\r\nX-Evil: 1"},
        {"value": 'a"b'},
        {"path": "/;Domain=evil"},
        {"path": "/\r\n"},
        {"path": ""},
        {"domain": "evil.com; Secure"},
        {"domain": "a b"},
        {"same_site": "Sometimes"},
        {"max_age": -1},
    ],
)
def test_set_cookie_value_refuses_injection(override: dict) -> None:
    args = dict(name="fly-instance-id", value=GOOD, max_age=60, path="/", domain=None, secure=True, http_only=True)
    args |= {"same_site": "Lax"} | override
    name, value = args.pop("name"), args.pop("value")
    with pytest.raises(ValueError):
        set_cookie_value(name, value, **args)


def test_set_cookie_value_carries_an_encoded_cookie(codec: CookieCodec) -> None:
    header = set_cookie_value(
        "fly-instance-id", GOOD, max_age=604800, path="/", domain=None, secure=True, http_only=True, same_site="Lax"
    )
    assert header.startswith(f"fly-instance-id={GOOD}; ")


def test_expire_cookie_value() -> None:
    assert expire_cookie_value("fly-instance-id", "/", None) == "fly-instance-id=; Max-Age=0; Path=/"
    assert expire_cookie_value("sid", "/app", "example.com") == "sid=; Max-Age=0; Path=/app; Domain=example.com"
    with pytest.raises(ValueError):
        expire_cookie_value("sid", "/;x", None)
