"""The signed affinity cookie: encode, verify and decode the client's copy of its pin.

Pure: stdlib only (hmac, hashlib, base64, re). No I/O and no clocks; the time comes in as ``now``.

Wire format, version 1 (RFC 6265 cookie-octets only; ``~`` never occurs in an instance id)::

    1~<instance>~<issued_at>~<user_digest>~<sig>

- ``instance``: the instance id verbatim (``^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$``).
- ``issued_at``: unix seconds in lowercase base36, no leading zeros.
- ``user_digest``: ``""`` for an anonymous session, else 12 base64url chars of
  HMAC-SHA256(secret, "user\\0" + user key) so the cookie never reveals the user key.
- ``sig``: base64url (no padding) of HMAC-SHA256(secret, everything before ``~<sig>``) truncated
  to 128 bits (22 chars), compared as a string with ``hmac.compare_digest`` against the current
  secret and then each previous one.

With ``signed=False`` the ``~<sig>`` part is omitted (and ignored if present), and a bare instance
id is also accepted as the whole value (the Fly blueprint ``fly-instance-id=<machine id>`` cookie).

Secret rotation: a cookie verified with a previous secret decodes normally and ``needs_reissue``
says so. Its ``user_digest`` was made with the old secret, so a keyed user's cookie no longer
matches the request's digest; ``decide`` then treats it as absent and checks the stored pin once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from affinity_proxy.routing.model import InstanceId, is_valid_instance_id

VERSION = "1"
SEPARATOR = "~"
MAX_COOKIE_LENGTH = 512
MAX_FUTURE_SKEW = 300  # seconds an issued_at may lie ahead of ``now`` (clock skew between nodes)
USER_DIGEST_LENGTH = 12
_SIG_BYTES = 16  # 128 bits
_SIG_LENGTH = 22  # base64url chars for 16 bytes, unpadded

_COOKIE_OCTETS = re.compile(r"[\x21\x23-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]*")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION_RE = re.compile(r"[0-9]{1,3}")
_ISSUED_RE = re.compile(r"0|[1-9a-z][0-9a-z]{0,12}")
_DIGEST_RE = re.compile(r"[A-Za-z0-9_-]{0,43}")
_SIG_RE = re.compile(rf"[A-Za-z0-9_-]{{{_SIG_LENGTH}}}")
_ANY_SIG_RE = re.compile(r"[A-Za-z0-9_-]{0,86}")
_PATH_RE = re.compile(r"[\x20-\x3A\x3C-\x7E]+")
_DOMAIN_RE = re.compile(r"\.?[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_SAME_SITE = {"strict": "Strict", "lax": "Lax", "none": "None"}
_USER_PREFIX = b"user\x00"


class CookieProblem(StrEnum):
    """Why a present cookie was not usable; values double as log fields and session-check output.

    ``UNKNOWN_INSTANCE`` is never returned by ``decode`` (it knows no membership); callers that
    check a verified cookie against the membership may report it.
    """

    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_VERSION = "unknown_version"
    OVERSIZED = "oversized"
    EXPIRED = "expired"
    UNKNOWN_INSTANCE = "unknown_instance"


@dataclass(frozen=True, slots=True)
class AffinityCookie:
    """A verified affinity cookie. ``user_digest == ""`` means it was issued to an anonymous session.

    ``previous_secret`` (not part of equality) is True when only a previous secret verified it.
    """

    instance: InstanceId
    issued_at: int
    user_digest: str
    previous_secret: bool = field(default=False, compare=False)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_MAX_KNOWN_IDS = 1024  # instance ids ``encode`` has validated (a membership's worth, bounded)


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = []
    while True:
        n, r = divmod(n, 36)
        out.append(digits[r])
        if n == 0:
            return "".join(reversed(out))


class CookieCodec:
    """Encodes and verifies affinity cookies for one process.

    ``decode`` costs one regex pass and up to ``1 + len(previous_secrets)`` HMACs for a cookie it
    has not seen; verified cookies are kept in a bounded LRU (``cache_size`` entries, 0 disables),
    so the hot path pays the HMAC once per distinct cookie. Expiry is still checked on every call.
    Meant for one event loop; the cache tolerates concurrent use without raising.
    Raises ``ValueError`` at construction when ``signed`` and no secret is given.
    """

    __slots__ = ("_cache", "_cache_size", "_digest_key", "_issued", "_keys", "_known_ids", "max_age", "signed")

    def __init__(
        self,
        secret: str | None,
        previous_secrets: Sequence[str] = (),
        *,
        signed: bool = True,
        max_age: int = 604800,
        cache_size: int = 4096,
    ) -> None:
        if signed and not secret:
            raise ValueError("a cookie secret is required when cookies are signed")
        if max_age <= 0:
            raise ValueError("max_age must be positive")
        if cache_size < 0:
            raise ValueError("cache_size must not be negative")
        self.signed = signed
        self.max_age = int(max_age)
        secrets = [s for s in (secret, *previous_secrets) if s] if secret else []
        self._keys: tuple[bytes, ...] = tuple(s.encode("utf-8", "surrogatepass") for s in secrets)
        self._digest_key: bytes | None = self._keys[0] if self._keys else None
        self._cache: OrderedDict[str, AffinityCookie] = OrderedDict()
        self._cache_size = cache_size
        self._known_ids: set[str] = set()  # ids that passed ``is_valid_instance_id`` in ``encode``
        self._issued: tuple[int, str] = (0, "0")  # the last issued_at and its base36 form

    def user_digest(self, user_key: str | None) -> str:
        """Short digest of the user key for the cookie: ``""`` for None. Keyed when a secret is set."""
        if user_key is None:
            return ""
        data = user_key.encode("utf-8", "surrogatepass")
        if self._digest_key is not None:
            raw = hmac.new(self._digest_key, _USER_PREFIX + data, hashlib.sha256).digest()
        else:
            raw = hashlib.sha256(_USER_PREFIX + data).digest()
        return _b64(raw[:9])

    def _sign(self, key: bytes, body: str) -> str:
        return _b64(hmac.digest(key, body.encode("ascii"), "sha256")[:_SIG_BYTES])

    def encode(self, instance: InstanceId, issued_at: int, user_digest: str) -> str:
        """The cookie value. Raises ``ValueError`` on an invalid id, negative time or bad digest.

        Cost: one HMAC; an instance id is checked once (then remembered, bounded) and the base36
        time once per second, so minting many sessions pays for little else."""
        if instance not in self._known_ids:
            if not is_valid_instance_id(instance):
                raise ValueError(f"invalid instance id: {instance!r}")
            if len(self._known_ids) >= _MAX_KNOWN_IDS:
                self._known_ids.clear()
            self._known_ids.add(instance)
        if isinstance(issued_at, bool) or not isinstance(issued_at, int) or issued_at < 0:
            raise ValueError("issued_at must be a non-negative int")
        if user_digest and not _DIGEST_RE.fullmatch(user_digest):
            raise ValueError("user_digest must be base64url, at most 43 chars")
        issued = self._issued
        if issued[0] != issued_at:
            issued = self._issued = (issued_at, _base36(issued_at))
        body = SEPARATOR.join((VERSION, instance, issued[1], user_digest))
        if not self.signed:
            return body
        return body + SEPARATOR + self._sign(self._keys[0], body)

    def read(self, raw: str | None, now: float) -> tuple[AffinityCookie | None, CookieProblem | None]:
        """``decode`` split for ``RouteInput``: (the cookie, None), (None, why it is unusable), or
        (None, None) when the request carried none."""
        if raw is None:
            return None, None
        parsed = self.decode(raw, now)
        if isinstance(parsed, AffinityCookie):
            return parsed, None
        return None, parsed

    def decode(self, raw: str, now: float) -> AffinityCookie | CookieProblem:
        """The verified cookie, or why it is unusable. Never raises; no I/O."""
        if not isinstance(raw, str):
            return CookieProblem.MALFORMED
        if len(raw) > MAX_COOKIE_LENGTH:
            return CookieProblem.OVERSIZED
        cached = self._cache.get(raw)
        if cached is not None:
            try:
                self._cache.move_to_end(raw)
            except KeyError:
                pass
            return self._check_time(cached, now)
        parsed = self._parse(raw, now)
        if isinstance(parsed, CookieProblem):
            return parsed
        if self._cache_size and SEPARATOR in raw:  # a bare id's issued_at is ``now``: never cache it
            self._remember(raw, parsed)
        return self._check_time(parsed, now)

    def needs_reissue(self, cookie: AffinityCookie) -> bool:
        """True when the cookie verified only with a previous secret: reissue it with the current one."""
        return cookie.previous_secret

    def _remember(self, raw: str, cookie: AffinityCookie) -> None:
        try:
            self._cache[raw] = cookie
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        except KeyError:
            pass

    def _check_time(self, cookie: AffinityCookie, now: float) -> AffinityCookie | CookieProblem:
        if cookie.issued_at > now + MAX_FUTURE_SKEW:
            return CookieProblem.MALFORMED
        if now - cookie.issued_at > self.max_age:
            return CookieProblem.EXPIRED
        return cookie

    def _parse(self, raw: str, now: float) -> AffinityCookie | CookieProblem:
        if not raw or not _COOKIE_OCTETS.fullmatch(raw):
            return CookieProblem.MALFORMED
        if SEPARATOR not in raw:
            if not self.signed and is_valid_instance_id(raw):
                issued = int(now) if math.isfinite(now) else 0
                return AffinityCookie(InstanceId(raw), max(issued, 0), "")
            return CookieProblem.MALFORMED
        parts = raw.split(SEPARATOR)
        if not _VERSION_RE.fullmatch(parts[0]):
            return CookieProblem.MALFORMED
        if parts[0] != VERSION:
            return CookieProblem.UNKNOWN_VERSION
        if len(parts) not in (4, 5):
            return CookieProblem.MALFORMED
        _, instance, issued, digest = parts[:4]
        if not (is_valid_instance_id(instance) and _ISSUED_RE.fullmatch(issued) and _DIGEST_RE.fullmatch(digest)):
            return CookieProblem.MALFORMED
        previous = False
        if self.signed:
            if len(parts) != 5 or not _SIG_RE.fullmatch(parts[4]):
                return CookieProblem.BAD_SIGNATURE
            verified_with = self._verify(raw[: -(_SIG_LENGTH + 1)], parts[4])
            if verified_with is None:
                return CookieProblem.BAD_SIGNATURE
            previous = verified_with > 0
        elif len(parts) == 5 and not _ANY_SIG_RE.fullmatch(parts[4]):
            return CookieProblem.MALFORMED
        return AffinityCookie(InstanceId(instance), int(issued, 36), digest, previous)

    def _verify(self, body: str, sig: str) -> int | None:
        """Index of the secret that signed ``body`` (0 = current), or None."""
        for index, key in enumerate(self._keys):
            if hmac.compare_digest(self._sign(key, body), sig):
                return index
        return None


def set_cookie_value(
    name: str,
    value: str,
    *,
    max_age: int,
    path: str,
    domain: str | None,
    secure: bool,
    http_only: bool,
    same_site: str,
) -> str:
    """The full ``Set-Cookie`` header value. Raises ``ValueError`` on anything that could inject
    attributes or headers (bad name, non cookie-octet value, ';' or CTLs in path/domain).
    ``same_site`` is Strict, Lax or None (any case); ``""`` omits the attribute.
    """
    _check_name(name)
    if not _COOKIE_OCTETS.fullmatch(value):
        raise ValueError("cookie value must contain only RFC 6265 cookie-octets")
    prefix, suffix = set_cookie_template(name, max_age=max_age, path=path, domain=domain, secure=secure,
                                         http_only=http_only, same_site=same_site)
    return prefix + value + suffix


def set_cookie_template(
    name: str,
    *,
    max_age: int,
    path: str,
    domain: str | None,
    secure: bool,
    http_only: bool,
    same_site: str,
) -> tuple[str, str]:
    """``set_cookie_value`` in two parts, validated once (per config) so that minting a cookie is
    ``prefix + value + suffix``: ``prefix`` is ``name=``, ``suffix`` the attributes from ``; Max-Age``
    on. Raises ``ValueError`` as ``set_cookie_value`` does; the caller must only put a cookie-octet
    value between them (``CookieCodec.encode``'s are by construction)."""
    _check_name(name)
    if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 0:
        raise ValueError("max_age must be a non-negative int")
    attrs = ["", f"Max-Age={max_age}", *_scope(path, domain)]
    if secure:
        attrs.append("Secure")
    if http_only:
        attrs.append("HttpOnly")
    if same_site:
        canonical = _SAME_SITE.get(same_site.lower())
        if canonical is None:
            raise ValueError("same_site must be one of Strict, Lax, None")
        attrs.append(f"SameSite={canonical}")
    return f"{name}=", "; ".join(attrs)


def expire_cookie_value(name: str, path: str, domain: str | None) -> str:
    """A ``Set-Cookie`` header value that deletes the cookie (``Max-Age=0``)."""
    _check_name(name)
    return "; ".join([f"{name}=", "Max-Age=0", *_scope(path, domain)])


def _check_name(name: str) -> None:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid cookie name: {name!r}")


def _scope(path: str, domain: str | None) -> list[str]:
    if not _PATH_RE.fullmatch(path):
        raise ValueError("cookie path must be non-empty, without ';' or control characters")
    attrs = [f"Path={path}"]
    if domain:
        if not _DOMAIN_RE.fullmatch(domain):
            raise ValueError(f"invalid cookie domain: {domain!r}")
        attrs.append(f"Domain={domain}")
    return attrs
