"""User key extraction: first usable source wins; unusable values are skipped; never raises."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from affinity_proxy.routing.userkey import MAX_USER_KEY_LENGTH, UserKeySource, clean_user_key, extract_user_key

H = UserKeySource("header", "X-User-Id")
Q = UserKeySource("query", "userId")
C = UserKeySource("cookie", "uid")
ALL = (H, Q, C)


@pytest.mark.parametrize(
    ("sources", "headers", "query", "cookies", "expected"),
    [
        pytest.param(ALL, {}, {}, {}, None, id="nothing-present"),
        pytest.param((), {"X-User-Id": "alice"}, {}, {}, None, id="no-sources"),
        pytest.param(ALL, {"X-User-Id": "alice"}, {"userId": "bob"}, {"uid": "carol"}, "alice", id="header-first"),
        pytest.param(ALL, {}, {"userId": "bob"}, {"uid": "carol"}, "bob", id="query-second"),
        pytest.param(ALL, {}, {}, {"uid": "carol"}, "carol", id="cookie-third"),
        pytest.param((C, Q, H), {"X-User-Id": "alice"}, {"userId": "bob"}, {"uid": "carol"}, "carol", id="order"),
        pytest.param(ALL, {"X-User-Id": "  alice  "}, {}, {}, "alice", id="stripped"),
        pytest.param(ALL, {"X-User-Id": "Alice Smith"}, {}, {}, "Alice Smith", id="inner-space-kept"),
        pytest.param(ALL, {"X-User-Id": "zoë-日本"}, {}, {}, "zoë-日本", id="printable-unicode"),
        pytest.param(ALL, {"X-User-Id": ""}, {"userId": "bob"}, {}, "bob", id="empty-skipped"),
        pytest.param(ALL, {"X-User-Id": "   "}, {"userId": "bob"}, {}, "bob", id="blank-skipped"),
        pytest.param(ALL, {"X-User-Id": "a\r\nSet-Cookie: x"}, {"userId": "bob"}, {}, "bob", id="crlf-skipped"),
        pytest.param(ALL, {"X-User-Id": "a\x00b"}, {}, {}, None, id="nul-skipped"),
        pytest.param(ALL, {"X-User-Id": "a\tb"}, {}, {}, None, id="tab-skipped"),
        pytest.param(ALL, {"X-User-Id": "a\x7fb"}, {}, {}, None, id="del-skipped"),
        pytest.param(ALL, {"X-User-Id": "a\u2028b"}, {}, {}, None, id="line-separator-skipped"),
        pytest.param(ALL, {"X-User-Id": "a\u200bb"}, {}, {}, None, id="zero-width-skipped"),
        pytest.param(ALL, {"X-User-Id": "x" * MAX_USER_KEY_LENGTH}, {}, {}, "x" * 256, id="max-length"),
        pytest.param(ALL, {"X-User-Id": "x" * 257}, {"userId": "bob"}, {}, "bob", id="too-long-skipped"),
        pytest.param(ALL, {"X-User-Id": " " + "x" * 256 + " "}, {}, {}, "x" * 256, id="length-after-strip"),
        pytest.param(ALL, {"X-User-Id": None}, {"userId": 7}, {"uid": "carol"}, "carol", id="non-str-skipped"),
        pytest.param((H,), {"x-user-id": "alice"}, {}, {}, None, id="plain-dict-is-case-sensitive"),
    ],
)
def test_extract_user_key_table(sources, headers, query, cookies, expected) -> None:
    assert extract_user_key(sources, headers, query, cookies) == expected


def test_case_insensitive_headers_mapping_is_used_via_get() -> None:
    class CaseInsensitive(dict):
        def get(self, key, default=None):
            return super().get(key.lower(), default)

    headers = CaseInsensitive({"x-user-id": "alice"})
    assert extract_user_key((H,), headers, {}, {}) == "alice"


def test_a_mapping_that_raises_is_skipped() -> None:
    class Broken(dict):
        def get(self, key, default=None):
            raise RuntimeError("boom")

    assert extract_user_key(ALL, Broken(), Broken(), {"uid": "carol"}) == "carol"


@pytest.mark.parametrize(("kind", "name"), [("body", "x"), ("Header", "x"), ("header", "")])
def test_user_key_source_rejects_bad_definitions(kind: str, name: str) -> None:
    with pytest.raises(ValueError):
        UserKeySource(kind, name)


@given(
    header=st.one_of(st.none(), st.text()),
    query=st.one_of(st.none(), st.text()),
    cookie=st.one_of(st.none(), st.text()),
)
def test_never_raises_and_never_returns_control_characters(header, query, cookie) -> None:
    def present(value):
        return {} if value is None else {"k": value}

    sources = (UserKeySource("header", "k"), UserKeySource("query", "k"), UserKeySource("cookie", "k"))
    key = extract_user_key(sources, present(header), present(query), present(cookie))
    cleaned = [clean_user_key(v) for v in (header, query, cookie)]
    assert key == next((c for c in cleaned if c is not None), None)
    if key is None:
        return
    assert key == key.strip() and 0 < len(key) <= MAX_USER_KEY_LENGTH
    assert key.isprintable()
    assert not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key)
