"""Our ``Cookie`` header parser (``routing.cookie_header``): the grammar aiohttp's ``Request.cookies``
follows, case by case. ``tests/engines/test_cookie_header_parity.py`` checks the same answers
against a real aiohttp server."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from affinity_proxy.routing.cookie_header import _VALID_NAME, parse_cookie_header, unquote

#: (Cookie header value, what ``aiohttp.web.Request.cookies`` holds for it): aiohttp 3.14's answers.
CASES = [
    ("", {}),
    ("sid=abc", {"sid": "abc"}),
    ("  sid = abc  ", {"sid": "abc"}),
    ("a=1; b=2", {"a": "1", "b": "2"}),
    ("a=1;b=2", {"a": "1", "b": "2"}),
    ("a=1 ; b=2;", {"a": "1", "b": "2"}),
    ("a=1;;b=2", {"a": "1", "b": "2"}),
    (";a=1", {"a": "1"}),
    ("a=1\tb=2", {"a": "1", "b": "2"}),
    # quoted values: ``;`` inside, backslash escapes (octal too), empty, unclosed, trailing text
    ('a="x;y"; b=2', {"a": "x;y", "b": "2"}),
    ('a="q\\"uote"', {"a": 'q"uote'}),
    ('a="\\073"', {"a": ";"}),
    ('a=""', {"a": ""}),
    ('a="unclosed; b=2', {"a": '"unclosed', "b": "2"}),
    ('a="x"y; b=2', {"a": '"x"y', "b": "2"}),
    # no value, bare names, '=' inside the value
    ("a=", {"a": ""}),
    ("a", {"a": ""}),
    ("flag; a=1", {"flag": "", "a": "1"}),
    ("a=b=c", {"a": "b=c"}),
    # a repeated name: the last value wins, as in Request.cookies
    ("a=1; a=2", {"a": "2"}),
    ("sid=first; x=1; sid=second", {"sid": "second", "x": "1"}),
    # commas and spaces are not separators, but a space ends a token value
    ("a=1, b=2", {"a": "1,", "b": "2"}),
    ("a= 1 2 ; b=3", {"a": "1", "2": "", "b": "3"}),
    ("a b=1; c=2", {"a": "", "b": "1", "c": "2"}),
    ("bad name=1; a=2", {"bad": "", "name": "1", "a": "2"}),
    # relaxed names real sites send; names that are not kept
    ("[x]=1", {"[x]": "1"}),
    ("{x}=2", {"{x}": "2"}),
    ("$Version=1; a=1", {"$Version": "1", "a": "1"}),
    ("path=/; secure; b=1", {"path": "/", "secure": "", "b": "1"}),
    ("=1; a=2", {"a": "2"}),
    ('"a"=1; b=2', {"b": "2"}),
    # dates (which hold a comma and spaces) as values
    ("a=Mon, 01-Jan-2024 00:00:00 GMT; b=1", {"a": "Mon, 01-Jan-2024 00:00:00 GMT", "b": "1"}),
    ("a=Wed Jun  9 10:18:14 2021; b=1", {"a": "Wed Jun  9 10:18:14 2021", "b": "1"}),
    # malformed pairs do not hide the ones after them
    ("a=\u00e9; b=1", {"a": "\u00e9", "b": "1"}),
    ("a=\x01; b=2", {"a": "\x01", "b": "2"}),
]


@pytest.mark.parametrize(("header", "expected"), CASES)
def test_parses_like_aiohttp(header: str, expected: dict[str, str]) -> None:
    assert parse_cookie_header(header) == expected


def test_the_affinity_cookie_is_found_among_others() -> None:
    header = '_ga=GA1.2.3; prefs="{\\"dark\\":1}"; affinity_sid=v1.abc.def; theme=dark'
    assert parse_cookie_header(header)["affinity_sid"] == "v1.abc.def"


@pytest.mark.parametrize(("value", "expected"), [
    ("", ""), ('"', '"'), ('""', ""), ('"a"', "a"), ('"a', '"a'), ('a"', 'a"'),
    ('"\\\\"', "\\"), ('"\\012"', "\n"), ('"\\8"', "8"), ('"\\477"', "477"),
])
def test_unquote(value: str, expected: str) -> None:
    assert unquote(value) == expected


@given(st.lists(st.sampled_from([*'ab=; "\\,\t{}[]$07!~\u00e9', "sid", '"x;y"']), max_size=30).map("".join))
def test_any_header_gives_valid_names_and_never_raises(header: str) -> None:
    for name, value in parse_cookie_header(header).items():
        assert _VALID_NAME.fullmatch(name), name
        assert isinstance(value, str)
