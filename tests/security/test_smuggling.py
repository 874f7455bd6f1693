"""Request smuggling: defparam/smuggler's Transfer-Encoding mutations, re-expressed as test cases.

smuggler (https://github.com/defparam/smuggler, MIT licence, (c) 2020 Evan Custodio) hides a
``Transfer-Encoding: chunked`` header in one of many mutated spellings (``configs/default.py``:
odd bytes before, inside and after the name and value, line folding, case, quoting, duplicates)
next to a ``Content-Length``, and sends two probes per mutation: CL.TE (``Content-Length`` 4 or 11,
body ``1\\r\\nZ\\r\\n0\\r\\n\\r\\n``) and TE.CL (``Content-Length`` 5 or 6, body ``0\\r\\n\\r\\nX``).
A front end and a back end that disagree on where such a request ends leave bytes that the back
end takes as the start of the next request: a desync.

Here every probe is followed on the same connection by a plain ``GET /after``, and the proxy sits
in front of a strict recording backend (its own parser). No desync means: the backend never sees
a malformed request or both framings at once, every request it gets is the probe (at most once,
with a body that is one of the two readings of the bytes sent) or ``/after``, the client gets
exactly one response per forwarded request, in order, and any other answer is a 400 or 501 after
which the connection closes.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from affinity_proxy.config import InstanceConfig
from tests.robustness.conftest import RecordingBackend
from tests.robustness.rawhttp import Hang, RawResponse, close, read_response, wait_closed
from tests.support.backends import Backends, make_config
from tests.support.engine import proxy_factory

END_CHUNK = "0\r\n\r\n"
PROBES = {
    # name: (Content-Length, body), as smuggler's _check_clte / _check_tecl send them
    "clte-timeout": (4, "1\r\nZ\r\n" + END_CHUNK),
    "clte-edge": (11, "1\r\nZ\r\n" + END_CHUNK),
    "tecl-timeout": (6, END_CHUNK + "X"),
    "tecl-edge": (5, END_CHUNK + "X"),
}
AFTER = b"GET /after HTTP/1.1\r\nHost: proxy.test\r\n\r\n"


def _mutations() -> dict[str, str]:
    """The Transfer-Encoding gadgets of smuggler's ``configs/default.py`` (byte loop included)."""
    m = {
        "nameprefix1": " Transfer-Encoding: chunked",
        "tabprefix1": "Transfer-Encoding:\tchunked",
        "tabprefix2": "Transfer-Encoding\t:\tchunked",
        "spacejoin1": "Transfer Encoding: chunked",
        "underjoin1": "Transfer_Encoding: chunked",
        "smashed": "Transfer Encoding:chunked",
        "space1": "Transfer-Encoding : chunked",
        "valueprefix1": "Transfer-Encoding:  chunked",
        "vertprefix1": "Transfer-Encoding:\u000bchunked",
        "commaCow": "Transfer-Encoding: chunked, cow",
        "cowComma": "Transfer-Encoding: cow, chunked",
        "contentEnc": "Content-Encoding: chunked",
        "linewrapped1": "Transfer-Encoding:\n chunked",
        "quoted": 'Transfer-Encoding: "chunked"',
        "aposed": "Transfer-Encoding: 'chunked'",
        "lazygrep": "Transfer-Encoding: chunk",
        "sarcasm": "TrAnSFer-EnCODinG: cHuNkeD",
        "yelling": "TRANSFER-ENCODING: CHUNKED",
        "0dsuffix": "Transfer-Encoding: chunked\r",
        "tabsuffix": "Transfer-Encoding: chunked\t",
        "revdualchunk": "Transfer-Encoding: cow\r\nTransfer-Encoding: chunked",
        "0dspam": "Transfer\r-Encoding: chunked",
        "nested": "Transfer-Encoding: cow chunked bar",
        "spaceFF": "Transfer-Encoding:\xffchunked",
        "accentCH": "Transfer-Encoding: ch\x96nked",
        "accentTE": "Transf\x82r-Encoding: chunked",
        "x-rout": "X:X\rTransfer-Encoding: chunked",
        "x-nout": "X:X\nTransfer-Encoding: chunked",
        "plain": "Transfer-Encoding: chunked",
        "dualchunk": "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        "gzipchunked": "Transfer-Encoding: gzip, chunked",
    }
    for i in (0x1, 0x4, 0x8, 0x9, 0xA, 0xB, 0xC, 0xD, 0x1F, 0x20, 0x7F, 0xA0, 0xFF):
        c = chr(i)
        m[f"midspace-{i:02x}"] = f"Transfer-Encoding:{c}chunked"
        m[f"postspace-{i:02x}"] = f"Transfer-Encoding{c}: chunked"
        m[f"prespace-{i:02x}"] = f"{c}Transfer-Encoding: chunked"
        m[f"endspace-{i:02x}"] = f"Transfer-Encoding: chunked{c}"
        m[f"xprespace-{i:02x}"] = f"X: X{c}Transfer-Encoding: chunked"
        m[f"endspacex-{i:02x}"] = f"Transfer-Encoding: chunked{c}X: X"
        m[f"rxprespace-{i:02x}"] = f"X: X\r{c}Transfer-Encoding: chunked"
        m[f"xnprespace-{i:02x}"] = f"X: X{c}\nTransfer-Encoding: chunked"
        m[f"endspacerx-{i:02x}"] = f"Transfer-Encoding: chunked\r{c}X: X"
        m[f"endspacexn-{i:02x}"] = f"Transfer-Encoding: chunked{c}\nX: X"
    return m


MUTATIONS = _mutations()


def _probe(name: str, gadget: str, length: int, body: str) -> bytes:
    """smuggler's ``render_template``: the gadget first, then Host, a browser's headers, Content-Length."""
    head = (f"POST /probe?cb={name} HTTP/1.1\r\n{gadget}\r\nHost: proxy.test\r\n"
            "User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
            "Content-type: application/x-www-form-urlencoded; charset=UTF-8\r\n"
            f"Content-Length: {length}\r\n\r\n{body}")
    return head.encode("latin-1")


def _readings(length: int, body: str) -> set[bytes]:
    """The request bodies a consistent hop may have forwarded: by Content-Length or by chunks."""
    raw = body.encode("latin-1")
    return {raw[:length], b"Z" if raw.startswith(b"1\r\nZ") else b""}


async def _responses(reader: asyncio.StreamReader) -> list[RawResponse] | str:
    """Responses until the second one, or until an error answer and the close after it. A
    hang (the proxy waiting for bytes that were all sent) is a problem of its own."""
    found: list[RawResponse] = []
    while len(found) < 2:
        try:
            resp = await read_response(reader, within=15)
        except (asyncio.IncompleteReadError, ConnectionError):
            return found
        except Hang:
            return f"hung after {len(found)} responses"
        found.append(resp)
        if resp.status != 200:
            try:
                if await wait_closed(reader, within=15):
                    return f"bytes after a {resp.status}"
            except Hang:
                return f"open after a {resp.status}"
            return found
    return found


async def _check(port: int, backend: RecordingBackend, name: str, probe: str) -> str | None:
    """Send one probe and ``/after``; return what is wrong, or None."""
    length, body = PROBES[probe]
    before_req, before_err = len(backend.requests), len(backend.errors)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_probe(f"{name}-{probe}", MUTATIONS[name], length, body) + AFTER)
        responses = await _responses(reader)
    finally:
        await close(writer)
    if isinstance(responses, str):
        return responses
    got = backend.requests[before_req:]
    if backend.errors[before_err:]:
        return f"backend parse error {backend.errors[before_err:]}"
    forwarded = [r for r in responses if r.status == 200]
    if len(forwarded) != len(got):
        return f"{len(forwarded)} 200 responses for {len(got)} forwarded requests"
    for recorded in got:
        headers = {n.lower() for n, _ in recorded.headers}
        if recorded.target.startswith("/probe"):
            if recorded.body not in _readings(length, body):
                return f"probe forwarded with body {recorded.body!r}"
        elif recorded.target != "/after":
            return f"backend saw a request for {recorded.method} {recorded.target!r}"
        if "transfer-encoding" in headers and "content-length" in headers:
            return "forwarded with both Content-Length and Transfer-Encoding"
    if [r.target.split("?")[0] for r in got].count("/probe") > 1:
        return "probe forwarded twice"
    for i, resp in enumerate(responses):
        if resp.status != 200:
            if resp.status not in (400, 501):
                return f"answered {resp.status}"
            if i != len(responses) - 1:
                return f"{resp.status} not followed by a close"
    if not responses:
        return "no answer at all"
    return None


@pytest.mark.parametrize("engine", ["fast", "aiohttp"])
@pytest.mark.parametrize("probe", list(PROBES))
async def test_smuggler_mutations_do_not_desync(recording_backend, engine: str, probe: str) -> None:  # type: ignore[no-untyped-def]
    backend: RecordingBackend = await recording_backend()
    async with AsyncExitStack() as stack:
        start = await stack.enter_async_context(proxy_factory(engine))
        server = await start(make_config(Backends(), instances=(InstanceConfig("rec", backend.url),)))
        problems = {}
        outcomes: dict[str, int] = {}
        for name in MUTATIONS:
            before = len(backend.requests)
            problem = await _check(server.main_port, backend, name, probe)
            if problem is not None:
                problems[name] = problem
            kind = "forwarded" if any(r.target.startswith("/probe") for r in backend.requests[before:]) else "rejected"
            outcomes[kind] = outcomes.get(kind, 0) + 1
        print(f"{engine} {probe}: {len(MUTATIONS)} mutations, {outcomes}")
        assert not problems, problems
