"""FrameScanner: what the byte relay forwards, holds back and refuses, fed in every split."""

from __future__ import annotations

import os

import pytest

from affinity_proxy.proxy.ws_frames import FrameScanner, close_frame, frame


def data_frame(payload: bytes, *, opcode: int = 0x2, fin: bool = True, masked: bool = True) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    mask = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mask | n))
    elif n < 65536:
        head = bytes((b0, mask | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mask | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def feed_in_pieces(scanner: FrameScanner, stream: bytes, size: int) -> bytes:
    out = b""
    for i in range(0, len(stream), size):
        out += scanner.feed(stream[i:i + size])
    return out


STREAM = (data_frame(b"a" * 64) + data_frame(b"b" * 300) + frame(0x9, b"hi", masked=True)
          + data_frame(b"c" * 70000, masked=False) + close_frame(1000, b"bye", masked=True))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 70, 1000, len(STREAM)])
def test_every_split_forwards_the_stream_unchanged(size: int) -> None:
    scanner = FrameScanner(max_message=100_000)
    assert feed_in_pieces(scanner, STREAM, size) == STREAM
    assert scanner.at_boundary and scanner.close_seen and not scanner.violation


def test_a_split_header_is_held_back_until_whole() -> None:
    scanner = FrameScanner()
    whole = data_frame(b"x" * 200)  # 2 + 2 + 4 header bytes
    assert scanner.feed(whole[:3]) == b""
    assert not scanner.at_boundary
    assert scanner.feed(whole[3:]) == whole
    assert scanner.at_boundary


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_an_oversize_message_is_refused_before_any_byte_of_its_frame(size: int) -> None:
    ok = data_frame(b"o" * 100)
    stream = ok + data_frame(b"x" * 2000) + close_frame(1000, masked=True)
    scanner = FrameScanner(max_message=1024)
    assert feed_in_pieces(scanner, stream, size) == ok
    assert scanner.violation == 1009
    assert scanner.close_seen  # still read after the refusal (the endpoint's answer to our CLOSE)


def test_the_limit_counts_a_fragmented_message_whole_and_control_frames_not() -> None:
    first = data_frame(b"a" * 600, fin=False)
    ping = frame(0x9, b"p" * 100, masked=True)
    second = data_frame(b"b" * 600, opcode=0x0)
    scanner = FrameScanner(max_message=1024)
    assert scanner.feed(first + ping) == first + ping
    assert scanner.feed(second) == b""
    assert scanner.violation == 1009


def test_a_new_message_starts_the_count_again() -> None:
    scanner = FrameScanner(max_message=1024)
    stream = b"".join(data_frame(b"m" * 1000) for _ in range(5))
    assert scanner.feed(stream) == stream and not scanner.violation


def test_no_limit_and_an_impossible_length() -> None:
    big = data_frame(b"z" * 70000)
    assert FrameScanner().feed(big) == big
    bogus = bytes((0x82, 127)) + (1 << 63).to_bytes(8, "big")
    scanner = FrameScanner()
    assert scanner.feed(bogus) == b""
    assert scanner.violation == 1002


def test_close_frame_masking_and_reason_cut() -> None:
    unmasked = close_frame(4001, b"r" * 200, masked=False)
    assert unmasked[:2] == bytes((0x88, 125)) and unmasked[2:4] == (4001).to_bytes(2, "big")
    masked = close_frame(1001, masked=True)
    key = masked[2:6]
    assert masked[:2] == bytes((0x88, 0x82))
    assert bytes(b ^ key[i & 3] for i, b in enumerate(masked[6:])) == (1001).to_bytes(2, "big")


def test_after_a_refusal_the_forwarded_stream_ends_on_a_boundary_while_the_frame_still_comes() -> None:
    scanner = FrameScanner(max_message=1024)
    big = data_frame(b"x" * 100_000)
    assert scanner.feed(big[:5000]) == b""
    assert scanner.violation == 1009 and scanner.need > 0
    assert scanner.at_boundary  # nothing of the refused frame went on: a CLOSE of ours may follow
    assert scanner.feed(big[5000:] + close_frame(1000, masked=True)) == b""
    assert scanner.close_seen


def test_one_small_frame_per_read_the_usual_case() -> None:
    scanner = FrameScanner(max_message=100)
    first, cont = data_frame(b"a" * 60, fin=False), data_frame(b"b" * 30, opcode=0x0, fin=False)
    ping, pong = frame(0x9, b"", masked=False), frame(0xA, b"x", masked=True)
    for f in (first, ping, cont, pong):
        assert scanner.feed(f) == f and scanner.at_boundary
    assert scanner.message == 90 and not scanner.close_seen
    assert scanner.feed(data_frame(b"c" * 20, opcode=0x0)) == b""  # 110 bytes: over the limit
    assert scanner.violation == 1009
    closing = close_frame(1000, masked=True)
    assert scanner.feed(closing) == b"" and scanner.close_seen
    fresh = FrameScanner(max_message=100)
    assert fresh.feed(closing) == closing and fresh.close_seen
