"""Parse a request's ``Cookie`` header into ``{name: value}``, exactly as the aiohttp engine sees it.

The aiohttp engine reads cookies with aiohttp's public ``Request.cookies``; the fast engine gets raw
header bytes and needs the same answer, or a request could stick to different instances on the two
engines. aiohttp's parser lives in a private module (``aiohttp._cookie_helpers``) that may change
without notice, so this is our own implementation of the same grammar: ``;``-separated pairs with
optional whitespace, double-quoted values (which may hold ``;`` and backslash escapes, octal
included), an unclosed quote running to the next ``;``, the relaxed name characters real sites use,
a bare name without ``=`` (an empty value), names outside the allowed set (skipped), and a malformed pair that
does not stop the pairs after it. A name given twice keeps its LAST value, as ``Request.cookies``
does. ``tests/routing/test_cookie_header.py`` holds the cases and a parity test against aiohttp.
Pure: no I/O.
"""

from __future__ import annotations

import re

_NAME_CHARS = r"\w!#$%&'~`><@,:/*+\-.^|)(?}{\[\]"
#: One cookie pair at a position: name, optional ``= value``, then whitespace, ``;`` or the end.
_PAIR = re.compile(
    rf"""\s*(?P<key>[{_NAME_CHARS}]+)
    (?:\s*=\s*(?P<val>
        "(?:[^\\"]|\\.)*"                                              # a closed quoted string
        |"[^";]*                                                       # an unclosed quote
        |(?:\w{{3,6}}day|\w{{3}}),\s[\w\s-]{{9,11}}\s[\d:]{{8}}\s(?:GMT|[+-]\d{{4}})  # an HTTP date
        |\w{{3}}\s+\w{{3}}\s+[\s\d]\d\s+\d{{2}}:\d{{2}}:\d{{2}}\s+\d{{4}}  # an asctime() date
        |[{_NAME_CHARS}=]*                                             # a token, maybe empty
    ))?
    \s*(?:\s+|;|$)""",
    re.VERBOSE | re.ASCII,
)
#: Names kept: RFC 6265 token characters plus the brackets, braces and the like real cookies use.
_VALID_NAME = re.compile(r"[!#$%&'()*+\-./0-9:<=>?@A-Z\[\]^_`a-z{|}~]+")
_ESCAPE = re.compile(r"\\(?:([0-3][0-7][0-7])|(.))")


def _unescape(m: re.Match[str]) -> str:
    return chr(int(m[1], 8)) if m[1] else m[2]


def unquote(value: str) -> str:
    """A cookie value without its surrounding double quotes and backslash escapes (``\\"``, ``\\073``)."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    return _ESCAPE.sub(_unescape, value[1:-1])


def parse_cookie_header(header: str) -> dict[str, str]:
    """Every well-formed ``name=value`` of a ``Cookie`` header value; the last of a repeated name wins."""
    cookies: dict[str, str] = {}
    i, n = 0, len(header)
    while i < n:
        match = _PAIR.match(header, i)
        if match is None:
            # Malformed here: take a plain ``name=value`` up to the next ``;`` if there is one, and
            # go on after that ``;`` (one bad pair must not hide the affinity cookie after it).
            semi, eq = header.find(";", i), header.find("=", i)
            if eq != -1 and (semi == -1 or eq < semi):
                name = header[i:eq].strip()
                if _VALID_NAME.fullmatch(name):
                    cookies[name] = unquote(header[eq + 1:semi if semi != -1 else n].strip())
            i = semi + 1 if semi != -1 else n
            continue
        i = match.end()
        name = match["key"]
        if _VALID_NAME.fullmatch(name):
            cookies[name] = unquote(match["val"] or "")
    return cookies
