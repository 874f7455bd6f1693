"""Extracting the user key (the identity used for pinning and hashing) from a request's parts.

Pure: stdlib only. Takes plain mappings (aiohttp's CIMultiDict/MultiDictProxy fit), so it knows
nothing of aiohttp; only ``.get`` is used on them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MAX_USER_KEY_LENGTH = 256
USER_KEY_KINDS = frozenset({"header", "query", "cookie"})


@dataclass(frozen=True, slots=True)
class UserKeySource:
    """One configured place to look for the user key: a header, query parameter or cookie name.

    Raises ``ValueError`` for an unknown ``kind`` or an empty ``name``.
    """

    kind: str
    name: str

    def __post_init__(self) -> None:
        if self.kind not in USER_KEY_KINDS:
            raise ValueError(f"user key source kind must be one of header, query, cookie (got {self.kind!r})")
        if not self.name:
            raise ValueError("user key source name must not be empty")


def clean_user_key(value: object) -> str | None:
    """``value`` stripped, or None when it is not a usable key (not a str, empty, longer than
    ``MAX_USER_KEY_LENGTH``, or containing control/non-printable characters). Never raises.
    """
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or len(value) > MAX_USER_KEY_LENGTH or not value.isprintable():
        return None
    return value


def extract_user_key(
    sources: Sequence[UserKeySource],
    headers: Mapping[str, str],
    query: Mapping[str, str],
    cookies: Mapping[str, str],
) -> str | None:
    """The first usable user key among ``sources`` in order, or None (an anonymous request).

    A present but unusable value is skipped as if absent. No I/O; O(len(sources)); never raises.
    """
    by_kind = {"header": headers, "query": query, "cookie": cookies}
    for source in sources:
        mapping = by_kind.get(source.kind)
        if mapping is None:
            continue
        try:
            value = mapping.get(source.name)
        except Exception:  # a hostile or odd mapping must not break routing
            continue
        key = clean_user_key(value)
        if key is not None:
            return key
    return None
