"""chat.protocol: bytes in, events and bytes out. No sockets, no gevent.

Client frames are built here by a small helper with its own (slow, obviously correct)
masking, so the codec's fast masking and unmasking are checked against an independent
implementation. Most tests speak to the server side; the client side shares its parser,
and the properties at the end run the reference model against both.
"""

from __future__ import annotations

import base64
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.protocol import (
    BinaryMessage,
    ChatError,
    ClientProtocol,
    CloseCode,
    CloseReceived,
    Opcode,
    Ping,
    Pong,
    ProtocolError,
    ProtocolViolation,
    ServerProtocol,
    State,
    TextMessage,
    accept_key,
    encode_client_close,
    encode_client_frame,
    encode_close,
    encode_frame,
    encode_text,
    generate_key,
    handshake_request,
)

MASK = b"\x37\xfa\x21\x3d"
CONT, TEXT, BINARY = Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY
CLOSE, PING, PONG = Opcode.CLOSE, Opcode.PING, Opcode.PONG
RSV1, RSV2, RSV3 = 0x40, 0x20, 0x10


# -- helpers ---------------------------------------------------------------------------


def xor_mask(payload: bytes, mask: bytes) -> bytes:
    return bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK,
    length_form: int | None = None,
) -> bytes:
    """A client frame, masked unless ``mask`` is None; ``length_form`` 7/16/64 forces that form."""
    n = len(payload)
    form = length_form or (7 if n < 126 else 16 if n < 65536 else 64)
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if mask is not None else 0
    if form == 7:
        header = bytes((first, mask_bit | n))
    elif form == 16:
        header = bytes((first, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, mask_bit | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return header + payload
    return header + mask + xor_mask(payload, mask)


def client_header(opcode: int, length: int, *, fin: bool = True) -> bytes:
    """Just the header of a masked client frame announcing ``length`` bytes (64-bit form)."""
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | 127)) + length.to_bytes(8, "big") + MASK


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


def sent_frames(data: bytes, masked: bool = False) -> list[tuple[bool, int, bytes]]:
    """Split what one side sent into (fin, opcode, payload), checking the side's mask rule:
    a server never masks, a client always does (unmasked here with the test's own XOR)."""
    frames = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert bool(b1 & 0x80) == masked, "clients always mask, servers never do"
        assert not b0 & 0x70, "no reserved bits without an extension"
        n = b1 & 0x7F
        pos += 2
        if n == 126:
            n = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        elif n == 127:
            n = int.from_bytes(data[pos : pos + 8], "big")
            pos += 8
        mask = data[pos : pos + 4] if masked else None
        pos += 4 if masked else 0
        assert pos + n <= len(data), "truncated frame"
        payload = data[pos : pos + n]
        frames.append((bool(b0 & 0x80), b0 & 0x0F, xor_mask(payload, mask) if mask else payload))
        pos += n
    return frames


def server_frames(data: bytes) -> list[tuple[bool, int, bytes]]:
    """Split server output into (fin, opcode, payload), checking it is never masked."""
    return sent_frames(data, masked=False)


def comparable(events: list) -> list:
    """Events with each ProtocolViolation replaced by (code, reason): errors compare by identity."""
    return [
        ("violation", e.error.close_code, e.error.reason) if isinstance(e, ProtocolViolation) else e
        for e in events
    ]


def feed(protocol: ServerProtocol | ClientProtocol, chunks) -> tuple[list, bytes]:
    events: list = []
    sent = b""
    for chunk in chunks:
        events += protocol.receive_data(chunk)
        sent += protocol.data_to_send()
    return comparable(events), sent


def assert_failed_with(protocol: ServerProtocol, events: list, code: int) -> None:
    """The peer broke the protocol: one violation, our close frame with its code, CLOSING."""
    assert len(events) == 1
    (event,) = events
    assert isinstance(event, ProtocolViolation)
    assert event.error.close_code == code
    reason = event.error.reason.encode()
    assert 0 < len(reason) <= 123
    assert server_frames(protocol.data_to_send()) == [(True, CLOSE, close_payload(code, reason))]
    assert protocol.state is State.CLOSING
    assert protocol.close_code == code
    assert protocol.close_expected


def failing(data: bytes, code: int, max_message_size: int = 1 << 20) -> ServerProtocol:
    protocol = ServerProtocol(max_message_size)
    assert_failed_with(protocol, protocol.receive_data(data), code)
    return protocol


# -- messages --------------------------------------------------------------------------


def test_small_masked_text_frame_becomes_a_text_message():
    protocol = ServerProtocol()
    events = protocol.receive_data(client_frame(TEXT, "héllo ☃".encode()))
    assert events == [TextMessage("héllo ☃")]
    assert protocol.data_to_send() == b""
    assert protocol.state is State.OPEN
    assert not protocol.close_expected
    assert protocol.close_code is None


def test_binary_frame_becomes_a_binary_message():
    protocol = ServerProtocol()
    events = protocol.receive_data(client_frame(BINARY, b"\x00\xff\x10"))
    assert events == [BinaryMessage(b"\x00\xff\x10")]


def test_empty_text_and_binary_frames_are_empty_messages():
    protocol = ServerProtocol()
    events = protocol.receive_data(client_frame(TEXT) + client_frame(BINARY))
    assert events == [TextMessage(""), BinaryMessage(b"")]


def test_many_frames_in_one_call_give_events_in_order():
    protocol = ServerProtocol()
    data = b"".join(client_frame(TEXT, str(i).encode()) for i in range(50))
    assert protocol.receive_data(data) == [TextMessage(str(i)) for i in range(50)]


def test_idle_protocol_holds_no_buffer_and_has_no_instance_dict():
    protocol = ServerProtocol()
    protocol.receive_data(client_frame(TEXT, b"hi"))
    assert not hasattr(protocol, "__dict__")
    assert protocol._buffer == b"" and type(protocol._buffer) is bytes
    assert protocol._message is None


def test_events_are_frozen_and_slotted():
    event = TextMessage("x")
    assert not hasattr(event, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.text = "y"  # type: ignore[misc]


def test_receive_data_copies_a_mutable_buffer_it_keeps():
    protocol = ServerProtocol()
    frame = bytearray(client_frame(TEXT, b"hello"))
    assert protocol.receive_data(frame[:4]) == []
    frame[:] = bytes(len(frame))  # the caller reuses its buffer
    assert protocol.receive_data(bytes(client_frame(TEXT, b"hello")[4:])) == [TextMessage("hello")]


# -- lengths ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 16383, 16384, 65535, 65536, 70001])
def test_client_frames_of_every_length_form_are_unmasked_correctly(size):
    payload = bytes(i * 7 % 251 for i in range(size))
    protocol = ServerProtocol()
    assert protocol.receive_data(client_frame(BINARY, payload)) == [BinaryMessage(payload)]


@pytest.mark.parametrize("form", [16, 64])
def test_non_minimal_length_encodings_are_accepted(form):
    protocol = ServerProtocol()
    frame = client_frame(TEXT, b"short", length_form=form)
    assert protocol.receive_data(frame) == [TextMessage("short")]


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x82\x00"),
        (125, b"\x82\x7d"),
        (126, b"\x82\x7e\x00\x7e"),
        (65535, b"\x82\x7e\xff\xff"),
        (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_server_frames_use_the_shortest_length_form_and_are_never_masked(size, header):
    payload = b"x" * size
    frame = encode_frame(BINARY, payload)
    assert frame == header + payload
    assert server_frames(frame) == [(True, BINARY, payload)]


@pytest.mark.parametrize("text", ["", "hi ☃", "é" * 63, "x" * 126, "y" * 70000])
def test_encode_text_equals_encode_frame_of_the_utf8_bytes(text):
    assert encode_text(text) == encode_frame(TEXT, text.encode())


def test_encode_frame_without_fin_clears_the_fin_bit():
    assert encode_frame(TEXT, b"ab", fin=False) == b"\x01\x02ab"
    assert encode_frame(CONT, b"cd") == b"\x80\x02cd"


@pytest.mark.parametrize(
    ("opcode", "payload", "fin"),
    [
        (PING, b"x" * 126, True),
        (CLOSE, b"x" * 126, True),
        (PONG, b"", False),
        (3, b"", True),
        (0xB, b"", True),
    ],
)
def test_encode_frame_refuses_frames_we_must_not_send(opcode, payload, fin):
    with pytest.raises(ValueError):
        encode_frame(opcode, payload, fin)


def test_encode_close_forms():
    assert encode_close() == b"\x88\x02\x03\xe8"
    assert encode_close(None) == b"\x88\x00"
    assert encode_close(4000, "é") == b"\x88\x04\x0f\xa0\xc3\xa9"
    assert len(encode_close(1000, "r" * 123)) == 127


@pytest.mark.parametrize(
    ("code", "reason"),
    [(None, "why"), (1005, ""), (1006, ""), (999, ""), (5000, ""), (1000, "r" * 124)],
)
def test_encode_close_refuses_codes_and_reasons_we_must_not_send(code, reason):
    with pytest.raises(ValueError):
        encode_close(code, reason)


# -- fragmentation ---------------------------------------------------------------------


def test_fragmented_text_is_reassembled_with_characters_split_across_fragments():
    data = "snow ☃ man".encode()
    cut = data.index(b"\xe2") + 1  # inside the snowman
    protocol = ServerProtocol()
    assert protocol.receive_data(client_frame(TEXT, data[:cut], fin=False)) == []
    assert protocol.receive_data(client_frame(CONT, data[cut : cut + 1], fin=False)) == []
    events = protocol.receive_data(client_frame(CONT, data[cut + 1 :]))
    assert events == [TextMessage("snow ☃ man")]
    assert protocol._message is None


def test_a_message_cut_into_one_byte_and_empty_fragments_is_reassembled():
    data = "héllo ☃".encode()
    frames = [client_frame(TEXT, data[:1], fin=False)]
    for byte in data[1:]:
        frames.append(client_frame(CONT, b"", fin=False))
        frames.append(client_frame(CONT, bytes((byte,)), fin=False))
    frames.append(client_frame(CONT))
    protocol = ServerProtocol()
    assert protocol.receive_data(b"".join(frames)) == [TextMessage("héllo ☃")]


def test_fragmented_binary_is_reassembled():
    protocol = ServerProtocol()
    data = (
        client_frame(BINARY, b"ab", fin=False)
        + client_frame(CONT, b"", fin=False)
        + client_frame(CONT, b"cd")
    )
    assert protocol.receive_data(data) == [BinaryMessage(b"abcd")]


def test_control_frames_between_fragments_are_handled_at_once():
    protocol = ServerProtocol()
    data = (
        client_frame(TEXT, b"he", fin=False)
        + client_frame(PING, b"p1")
        + client_frame(CONT, b"ll", fin=False)
        + client_frame(PONG, b"p2")
        + client_frame(CONT, b"o")
    )
    assert protocol.receive_data(data) == [Ping(b"p1"), Pong(b"p2"), TextMessage("hello")]
    assert protocol.data_to_send() == b"\x8a\x02p1"


def test_close_between_fragments_drops_the_unfinished_message():
    protocol = ServerProtocol()
    data = client_frame(TEXT, b"he", fin=False) + client_frame(CLOSE, close_payload(1001))
    assert protocol.receive_data(data) == [CloseReceived(1001, "")]
    assert protocol.state is State.CLOSED
    assert protocol._message is None


# -- control frames --------------------------------------------------------------------


def test_ping_is_answered_with_a_pong_carrying_the_same_payload():
    protocol = ServerProtocol()
    assert protocol.receive_data(client_frame(PING, b"ping!")) == [Ping(b"ping!")]
    assert protocol.data_to_send() == b"\x8a\x05ping!"
    assert protocol.data_to_send() == b""


def test_empty_and_largest_pings_are_answered():
    protocol = ServerProtocol()
    big = bytes(range(125))
    events = protocol.receive_data(client_frame(PING) + client_frame(PING, big))
    assert events == [Ping(b""), Ping(big)]
    assert server_frames(protocol.data_to_send()) == [(True, PONG, b""), (True, PONG, big)]


def test_pong_is_reported_and_not_answered():
    protocol = ServerProtocol()
    assert protocol.receive_data(client_frame(PONG, b"beat")) == [Pong(b"beat")]
    assert protocol.data_to_send() == b""


# -- closing handshake -----------------------------------------------------------------


def test_client_close_is_echoed_and_closes_the_codec():
    protocol = ServerProtocol()
    events = protocol.receive_data(client_frame(CLOSE, close_payload(1000, "bye ☃".encode())))
    assert events == [CloseReceived(1000, "bye ☃")]
    assert protocol.data_to_send() == b"\x88\x02\x03\xe8"
    assert protocol.state is State.CLOSED
    assert protocol.close_code == 1000
    assert protocol.close_expected


def test_client_close_without_payload_is_answered_with_an_empty_close():
    protocol = ServerProtocol()
    assert protocol.receive_data(client_frame(CLOSE)) == [CloseReceived(None, "")]
    assert protocol.data_to_send() == b"\x88\x00"
    assert protocol.state is State.CLOSED
    assert protocol.close_code == CloseCode.NO_STATUS_RCVD


VALID_CLOSE_CODES = [*range(1000, 1004), *range(1007, 1015), 3000, 3999, 4000, 4999]
INVALID_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
def test_every_valid_close_code_is_echoed(code):
    protocol = ServerProtocol()
    events = protocol.receive_data(client_frame(CLOSE, close_payload(code, b"r")))
    assert events == [CloseReceived(code, "r")]
    assert server_frames(protocol.data_to_send()) == [(True, CLOSE, close_payload(code))]


def test_input_after_the_closing_handshake_is_ignored():
    protocol = ServerProtocol()
    data = client_frame(CLOSE, close_payload(1000)) + client_frame(TEXT, b"late")
    assert protocol.receive_data(data) == [CloseReceived(1000, "")]
    protocol.data_to_send()
    assert protocol.receive_data(client_frame(TEXT, b"later") + b"\xff\xff") == []
    assert protocol.data_to_send() == b""
    assert protocol._buffer == b""


def test_server_close_waits_for_the_client_close_and_sends_no_second_frame():
    protocol = ServerProtocol()
    protocol.send_close(CloseCode.GOING_AWAY, "restart")
    assert protocol.data_to_send() == encode_close(1001, "restart")
    assert protocol.state is State.CLOSING
    assert protocol.close_code == 1001
    assert not protocol.close_expected
    events = protocol.receive_data(client_frame(CLOSE, close_payload(1001)))
    assert events == [CloseReceived(1001, "")]
    assert protocol.data_to_send() == b""
    assert protocol.state is State.CLOSED
    assert protocol.close_expected
    assert protocol.close_code == 1001


def test_messages_after_server_close_are_still_delivered_but_pings_are_not_answered():
    protocol = ServerProtocol()
    protocol.send_close()
    protocol.data_to_send()
    data = client_frame(TEXT, b"in flight") + client_frame(PING, b"p")
    assert protocol.receive_data(data) == [TextMessage("in flight"), Ping(b"p")]
    assert protocol.data_to_send() == b""


def test_malformed_close_answering_a_server_close_still_completes_the_handshake():
    protocol = ServerProtocol()
    protocol.send_close()
    protocol.data_to_send()
    assert protocol.receive_data(client_frame(CLOSE, b"\x03")) == [CloseReceived(None, "")]
    assert protocol.state is State.CLOSED
    assert protocol.data_to_send() == b""


def test_violation_after_server_close_is_reported_without_a_second_close_frame():
    protocol = ServerProtocol()
    protocol.send_close(1001)
    protocol.data_to_send()
    events = protocol.receive_data(client_frame(TEXT, b"x", mask=None) + client_frame(TEXT, b"y"))
    assert comparable(events) == [("violation", 1002, "client frame not masked")]
    assert protocol.data_to_send() == b""
    assert protocol.close_code == 1001
    events = protocol.receive_data(client_frame(CLOSE, close_payload(1000)))
    assert events == [CloseReceived(1000, "")]
    assert protocol.state is State.CLOSED


def test_sending_close_twice_is_a_local_error():
    protocol = ServerProtocol()
    protocol.send_close()
    with pytest.raises(RuntimeError):
        protocol.send_close()


def test_sending_close_after_the_handshake_is_a_local_error():
    protocol = ServerProtocol()
    protocol.receive_data(client_frame(CLOSE))
    with pytest.raises(RuntimeError):
        protocol.send_close()


@pytest.mark.parametrize(("code", "reason"), [(1005, ""), (999, ""), (1000, "r" * 124)])
def test_send_close_refuses_what_may_not_be_sent_and_stays_open(code, reason):
    protocol = ServerProtocol()
    with pytest.raises(ValueError):
        protocol.send_close(code, reason)
    assert protocol.state is State.OPEN
    assert protocol.data_to_send() == b""


# -- protocol violations: 1002 -----------------------------------------------------------


def test_unmasked_frame_is_closed_with_1002():
    failing(client_frame(TEXT, b"hello", mask=None), 1002)


@pytest.mark.parametrize("rsv", [RSV1, RSV2, RSV3])
def test_reserved_bit_without_extension_is_closed_with_1002(rsv):
    failing(client_frame(TEXT, b"hello", rsv=rsv), 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcode_is_closed_with_1002(opcode):
    failing(client_frame(opcode, b"x"), 1002)


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_control_frame_over_125_bytes_is_closed_with_1002(opcode):
    failing(client_frame(opcode, close_payload(1000, b"x" * 124)), 1002)


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_fragmented_control_frame_is_closed_with_1002(opcode):
    failing(client_frame(opcode, b"", fin=False), 1002)


def test_continuation_without_a_message_in_progress_is_closed_with_1002():
    failing(client_frame(CONT, b"orphan"), 1002)


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_new_message_inside_a_fragmented_message_is_closed_with_1002(opcode):
    failing(client_frame(BINARY, b"part", fin=False) + client_frame(opcode, b"new"), 1002)


def test_64_bit_length_with_the_high_bit_set_is_closed_with_1002():
    failing(client_header(BINARY, 1 << 63), 1002)


def test_close_frame_of_one_byte_is_closed_with_1002():
    failing(client_frame(CLOSE, b"\x03"), 1002)


@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
def test_invalid_close_code_is_closed_with_1002(code):
    failing(client_frame(CLOSE, close_payload(code)), 1002)


# -- protocol violations: 1007 -----------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"\xff", b"abc\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"],
    ids=["invalid-byte", "truncated", "surrogate", "above-U+10FFFF", "overlong"],
)
def test_invalid_utf8_text_is_closed_with_1007(payload):
    failing(client_frame(TEXT, payload), 1007)


@pytest.mark.parametrize(
    "bad", [b"\xed\xa0", b"\xed\xa0\x80", b"\xf4\x90", b"\xe0\x80", b"\xc0", b"\xff"],
    ids=["surrogate-start", "surrogate", "above-U+10FFFF-start", "overlong-start", "c0", "ff"],
)
def test_invalid_utf8_fails_at_the_fragment_where_it_occurs(bad):
    protocol = ServerProtocol()
    assert protocol.receive_data(client_frame(TEXT, b"ok", fin=False)) == []
    events = protocol.receive_data(client_frame(CONT, "κόσμε".encode() + bad, fin=False))
    assert_failed_with(protocol, events, 1007)


def test_invalid_utf8_in_the_first_fragment_fails_at_once():
    failing(client_frame(TEXT, b"ok\xed\xa0", fin=False), 1007)


def test_text_message_ending_inside_a_character_is_closed_with_1007():
    protocol = ServerProtocol()
    data = client_frame(TEXT, b"ok", fin=False) + client_frame(CONT, b"\xe2\x98")
    assert_failed_with(protocol, protocol.receive_data(data), 1007)


def test_close_reason_that_is_not_utf8_is_closed_with_1007():
    failing(client_frame(CLOSE, close_payload(1000, b"\xce\xba\xed\xa0\x80")), 1007)


def test_invalid_utf8_in_binary_messages_is_fine():
    protocol = ServerProtocol()
    assert protocol.receive_data(client_frame(BINARY, b"\xff\xfe")) == [BinaryMessage(b"\xff\xfe")]


# -- protocol violations: 1009 -----------------------------------------------------------


def test_frame_of_exactly_the_maximum_size_is_accepted():
    protocol = ServerProtocol(max_message_size=10)
    events = protocol.receive_data(client_frame(BINARY, b"0123456789"))
    assert events == [BinaryMessage(b"0123456789")]


def test_frame_over_the_maximum_is_closed_with_1009_from_its_header_alone():
    protocol = ServerProtocol(max_message_size=1000)
    assert_failed_with(protocol, protocol.receive_data(client_header(BINARY, 1001)), 1009)
    for _ in range(10):  # the announced payload arrives, and is skipped, not buffered
        assert protocol.receive_data(b"\x00" * 100) == []
        assert len(protocol._buffer) == 0
    assert protocol.receive_data(b"\x00" + client_frame(CLOSE)) == [CloseReceived(None, "")]
    assert protocol.state is State.CLOSED


def test_huge_announced_frame_is_closed_with_1009_not_buffered():
    failing(client_header(TEXT, 1 << 40), 1009)


def test_fragments_adding_up_to_over_the_maximum_are_closed_with_1009():
    protocol = ServerProtocol(max_message_size=10)
    data = client_frame(TEXT, b"12345", fin=False) + client_frame(CONT, b"67890", fin=False)
    assert protocol.receive_data(data) == []
    assert_failed_with(protocol, protocol.receive_data(client_header(CONT, 1)), 1009)


def test_fragments_adding_up_to_exactly_the_maximum_are_accepted():
    protocol = ServerProtocol(max_message_size=10)
    data = client_frame(TEXT, b"12345", fin=False) + client_frame(CONT, b"67890")
    assert protocol.receive_data(data) == [TextMessage("1234567890")]


def test_control_frames_do_not_count_towards_the_message_size():
    protocol = ServerProtocol(max_message_size=4)
    data = (
        client_frame(TEXT, b"12", fin=False)
        + client_frame(PING, b"x" * 100)
        + client_frame(CONT, b"34")
    )
    assert protocol.receive_data(data) == [Ping(b"x" * 100), TextMessage("1234")]


# -- after a violation -------------------------------------------------------------------


def test_input_after_a_violation_is_ignored_until_the_peer_closes():
    protocol = failing(client_frame(TEXT, b"\xff"), 1007)
    ignored = (
        client_frame(TEXT, b"more") + client_frame(PING, b"p") + client_frame(BINARY, b"b" * 300)
    )
    assert protocol.receive_data(ignored) == []
    assert protocol.data_to_send() == b""  # no pong, no second close frame
    assert protocol.state is State.CLOSING
    data = client_frame(CLOSE, close_payload(1002)) + client_frame(TEXT, b"x")
    events = protocol.receive_data(data)
    assert events == [CloseReceived(1002, "")]
    assert protocol.data_to_send() == b""
    assert protocol.state is State.CLOSED
    assert protocol.close_code == 1007


def test_a_violation_is_reported_only_once():
    data = (
        client_frame(TEXT, b"x", mask=None)
        + client_frame(7)
        + client_frame(CONT, b"x")
        + client_frame(TEXT, b"\xff")
    )
    failing(data, 1002)


def test_unmasked_close_after_a_violation_still_ends_the_connection():
    protocol = failing(client_frame(9, b"x" * 126), 1002)
    events = protocol.receive_data(client_frame(CLOSE, close_payload(1000), mask=None))
    assert events == [CloseReceived(1000, "")]
    assert protocol.state is State.CLOSED


def test_protocol_error_carries_its_close_code_and_reason():
    error = ProtocolError(CloseCode.PROTOCOL_ERROR, "client frame not masked")
    assert isinstance(error, ChatError)
    assert (error.close_code, error.reason) == (1002, "client frame not masked")
    assert "client frame not masked" in str(error) and "1002" in str(error)


# -- incremental parsing ---------------------------------------------------------------

def make_stream(mask: bytes | None = MASK) -> bytes:
    """A valid conversation from the peer: masked from a client, ``mask=None`` from a server."""
    return b"".join(
        [
            client_frame(TEXT, "héllo".encode(), mask=mask),
            client_frame(TEXT, "snow ☃".encode()[:6], fin=False, mask=mask),
            client_frame(PING, b"ping", mask=mask),
            client_frame(CONT, "snow ☃".encode()[6:], fin=False, length_form=16, mask=mask),
            client_frame(CONT, b"!", mask=mask),
            client_frame(BINARY, bytes(range(200)) + bytes(100), mask=mask),
            client_frame(BINARY, b"tiny", length_form=64, mask=mask),
            client_frame(PONG, mask=mask),
            client_frame(TEXT, mask=mask),
            client_frame(CLOSE, close_payload(1000, b"done"), mask=mask),
            client_frame(TEXT, b"after close", mask=mask),
        ]
    )


STREAM = make_stream()
STREAM_EVENTS = [
    TextMessage("héllo"),
    Ping(b"ping"),
    TextMessage("snow ☃!"),
    BinaryMessage(bytes(range(200)) + bytes(100)),
    BinaryMessage(b"tiny"),
    Pong(b""),
    TextMessage(""),
    CloseReceived(1000, "done"),
]
STREAM_SENT = encode_frame(PONG, b"ping") + encode_close(1000)

def make_bad_stream(mask: bytes | None = MASK) -> bytes:
    """A conversation with one violation in the middle, from a client or (``None``) a server."""
    return b"".join(
        [
            client_frame(TEXT, b"fine", mask=mask),
            client_frame(BINARY, b"a", fin=False, mask=mask),
            client_frame(CONT, b"b" * 130, fin=False, mask=mask),
            client_frame(TEXT, b"\xe2\x82", fin=False, mask=mask),  # a new message mid-message
            client_frame(PING, b"ignored", mask=mask),
            client_frame(TEXT, b"ignored" * 40, mask=mask),
            client_frame(CLOSE, close_payload(1000), mask=mask),
            client_frame(TEXT, b"after close", mask=mask),
        ]
    )


BAD_STREAM = make_bad_stream()
BAD_STREAM_EVENTS = [
    TextMessage("fine"),
    ("violation", 1002, "new message inside a fragmented one"),
    CloseReceived(1000, ""),
]
BAD_STREAM_SENT = encode_close(1002, "new message inside a fragmented one")


@pytest.mark.parametrize(
    ("stream", "expected_events", "expected_sent"),
    [(STREAM, STREAM_EVENTS, STREAM_SENT), (BAD_STREAM, BAD_STREAM_EVENTS, BAD_STREAM_SENT)],
    ids=["valid", "violation"],
)
def test_a_stream_split_at_every_byte_boundary_gives_the_same_events(
    stream, expected_events, expected_sent
):
    expected = (expected_events, expected_sent)
    assert feed(ServerProtocol(), [stream]) == expected
    for cut in range(len(stream) + 1):
        assert feed(ServerProtocol(), [stream[:cut], stream[cut:]]) == expected, cut


@pytest.mark.parametrize(
    ("stream", "expected_events", "expected_sent"),
    [(STREAM, STREAM_EVENTS, STREAM_SENT), (BAD_STREAM, BAD_STREAM_EVENTS, BAD_STREAM_SENT)],
    ids=["valid", "violation"],
)
def test_a_stream_fed_byte_by_byte_gives_the_same_events(stream, expected_events, expected_sent):
    chunks = [stream[i : i + 1] for i in range(len(stream))]
    assert feed(ServerProtocol(), chunks) == (expected_events, expected_sent)


def test_a_large_frame_arriving_in_small_reads_is_reassembled():
    payload = bytes(i % 256 for i in range(40000))  # above the translate threshold
    frame = client_frame(BINARY, payload)
    protocol = ServerProtocol()
    events = []
    for i in range(0, len(frame), 1448):
        events += protocol.receive_data(frame[i : i + 1448])
    assert events == [BinaryMessage(payload)]
    assert protocol._buffer == b""


# -- the client side ------------------------------------------------------------------
#
# ClientProtocol is the same parser with the mask rule turned around; these tests pin
# what differs (masks both ways, what it sends back) and the round trips between sides.

RFC_KEY, RFC_ACCEPT = "dGhlIHNhbXBsZSBub25jZQ==", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3


def test_accept_key_gives_the_answer_of_the_rfc_example():
    assert accept_key(RFC_KEY) == RFC_ACCEPT
    assert accept_key(RFC_KEY.encode()) == RFC_ACCEPT


def test_generate_key_gives_16_fresh_random_bytes_in_base64():
    keys = {generate_key() for _ in range(10)}
    assert len(keys) == 10
    assert all(len(base64.b64decode(key, validate=True)) == 16 for key in keys)


def test_handshake_request_is_the_upgrade_rfc_6455_asks_for():
    request = handshake_request("example.com:8080", "/rooms/a?x=1", RFC_KEY)
    head, rest = request.split(b"\r\n\r\n")
    assert rest == b""
    request_line, *lines = head.decode().split("\r\n")
    assert request_line == "GET /rooms/a?x=1 HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in lines)
    assert headers == {"Host": "example.com:8080", "Upgrade": "websocket",
                       "Connection": "Upgrade", "Sec-WebSocket-Key": RFC_KEY,
                       "Sec-WebSocket-Version": "13"}


@pytest.mark.parametrize("size", [0, 1, 3, 125, 126, 16383, 16384, 65535, 65536, 70001])
def test_client_frames_are_masked_like_the_tests_own_xor_in_every_length_form(size):
    payload = bytes(i * 7 % 251 for i in range(size))
    assert encode_client_frame(BINARY, payload, mask=MASK) == client_frame(BINARY, payload)
    fragment = encode_client_frame(TEXT, payload, fin=False, mask=MASK)
    assert fragment == client_frame(TEXT, payload, fin=False)


def test_client_frames_get_a_fresh_random_mask_each():
    frames = [encode_client_frame(TEXT, b"same") for _ in range(10)]
    assert len({frame[2:6] for frame in frames}) > 1
    for frame in frames:
        assert sent_frames(frame, masked=True) == [(True, TEXT, b"same")]


@pytest.mark.parametrize(
    ("opcode", "payload", "fin", "mask"),
    [
        (PING, b"x" * 126, True, None),
        (CLOSE, b"", False, None),
        (3, b"", True, None),
        (TEXT, b"x", True, b"abc"),
        (TEXT, b"x", True, b"abcde"),
    ],
)
def test_encode_client_frame_refuses_frames_and_masks_we_must_not_send(opcode, payload, fin, mask):
    with pytest.raises(ValueError):
        encode_client_frame(opcode, payload, fin, mask)


def test_encode_client_close_forms():
    assert encode_client_close(mask=MASK) == client_frame(CLOSE, close_payload(1000))
    assert encode_client_close(None, mask=MASK) == client_frame(CLOSE)
    close = encode_client_close(4000, "é", mask=MASK)
    assert close == client_frame(CLOSE, close_payload(4000, "é".encode()))
    assert sent_frames(encode_client_close(1001), masked=True) == [(True, CLOSE, b"\x03\xe9")]
    for code, reason in [(None, "why"), (1005, ""), (1000, "r" * 124)]:
        with pytest.raises(ValueError):
            encode_client_close(code, reason)


def test_server_frames_become_the_same_events_on_the_client():
    protocol = ClientProtocol()
    data = (
        encode_text("héllo ☃")
        + encode_frame(BINARY, b"\x00\xff")
        + encode_frame(TEXT, b"frag", fin=False)
        + encode_frame(PONG, b"beat")
        + encode_frame(CONT, "ment é".encode())
        + encode_text("x" * 70000)
    )
    assert protocol.receive_data(data) == [
        TextMessage("héllo ☃"), BinaryMessage(b"\x00\xff"), Pong(b"beat"),
        TextMessage("fragment é"), TextMessage("x" * 70000),
    ]
    assert protocol.data_to_send() == b""
    assert not hasattr(protocol, "__dict__")
    assert protocol._buffer == b"" and protocol.state is State.OPEN


def test_a_masked_server_frame_is_closed_with_1002_by_a_masked_close():
    protocol = ClientProtocol()
    events = comparable(protocol.receive_data(client_frame(TEXT, b"masked")))
    assert events == [("violation", 1002, "server frame masked")]
    assert sent_frames(protocol.data_to_send(), masked=True) == [
        (True, CLOSE, close_payload(1002, b"server frame masked"))
    ]
    assert protocol.state is State.CLOSING and protocol.close_expected


def test_the_client_answers_a_ping_with_a_masked_pong():
    protocol = ClientProtocol()
    assert protocol.receive_data(encode_frame(PING, b"are you there")) == [Ping(b"are you there")]
    assert sent_frames(protocol.data_to_send(), masked=True) == [(True, PONG, b"are you there")]


@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
def test_the_client_echoes_every_valid_server_close_code_masked(code):
    protocol = ClientProtocol()
    events = protocol.receive_data(encode_frame(CLOSE, close_payload(code, b"bye")))
    assert events == [CloseReceived(code, "bye")]
    assert sent_frames(protocol.data_to_send(), masked=True) == [(True, CLOSE, close_payload(code))]
    assert protocol.state is State.CLOSED and protocol.close_code == code


def test_the_client_answers_an_empty_server_close_with_an_empty_masked_close():
    protocol = ClientProtocol()
    assert protocol.receive_data(encode_close(None)) == [CloseReceived(None, "")]
    assert sent_frames(protocol.data_to_send(), masked=True) == [(True, CLOSE, b"")]
    assert protocol.close_code == CloseCode.NO_STATUS_RCVD


@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
def test_an_invalid_server_close_code_is_closed_with_1002_by_the_client(code):
    protocol = ClientProtocol()
    events = comparable(protocol.receive_data(encode_frame(CLOSE, close_payload(code))))
    assert events == [("violation", 1002, f"invalid close code {code}")]
    ((fin, opcode, payload),) = sent_frames(protocol.data_to_send(), masked=True)
    assert (opcode, payload[:2]) == (CLOSE, close_payload(1002))


def feed_both_ways(client: ClientProtocol, server: ServerProtocol, rounds: int = 4) -> list:
    """Carry each side's data_to_send() to the other, a bounded number of times; the events."""
    events = []
    for _ in range(rounds):
        to_server, to_client = client.data_to_send(), server.data_to_send()
        events += [("server", e) for e in server.receive_data(to_server)]
        events += [("client", e) for e in client.receive_data(to_client)]
    return events


def test_a_close_started_by_the_client_completes_on_both_sides():
    client, server = ClientProtocol(), ServerProtocol()
    client.send_close(CloseCode.GOING_AWAY, "leaving")
    assert client.state is State.CLOSING and not client.close_expected
    events = feed_both_ways(client, server)
    assert events == [
        ("server", CloseReceived(1001, "leaving")), ("client", CloseReceived(1001, ""))
    ]
    assert client.state is server.state is State.CLOSED
    assert client.close_expected and server.close_expected


def test_a_close_started_by_the_server_completes_on_both_sides():
    client, server = ClientProtocol(), ServerProtocol()
    server.send_close(CloseCode.SERVICE_RESTART)
    events = feed_both_ways(client, server)
    assert events == [("client", CloseReceived(1012, "")), ("server", CloseReceived(1012, ""))]
    assert client.state is server.state is State.CLOSED


def test_pings_both_ways_are_answered_across_the_link():
    client, server = ClientProtocol(), ServerProtocol()
    to_server = encode_client_frame(PING, b"c?") + encode_client_frame(TEXT, "hé".encode())
    assert server.receive_data(to_server) == [Ping(b"c?"), TextMessage("hé")]
    assert client.receive_data(server.data_to_send() + encode_frame(PING, b"s?")) == [
        Pong(b"c?"), Ping(b"s?")
    ]
    assert server.receive_data(client.data_to_send()) == [Pong(b"s?")]


def test_a_server_stream_split_at_every_byte_boundary_gives_the_client_the_same_events():
    for stream, expected_events, expected_sent in [
        (make_stream(None), STREAM_EVENTS, [(True, PONG, b"ping"), (True, CLOSE, b"\x03\xe8")]),
        (make_bad_stream(None), BAD_STREAM_EVENTS,
         [(True, CLOSE, close_payload(1002, b"new message inside a fragmented one"))]),
    ]:
        for cut in range(len(stream) + 1):
            events, sent = feed(ClientProtocol(), [stream[:cut], stream[cut:]])
            assert (events, sent_frames(sent, masked=True)) == (expected_events, expected_sent), cut
        events, sent = feed(ClientProtocol(), [stream[i : i + 1] for i in range(len(stream))])
        assert (events, sent_frames(sent, masked=True)) == (expected_events, expected_sent)


# -- properties ------------------------------------------------------------------------


def cut_into(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@settings(max_examples=200, deadline=None)
@given(
    message=st.one_of(st.text(max_size=300), st.binary(max_size=300)),
    mask=st.binary(min_size=4, max_size=4),
    fragment_cuts=st.lists(st.integers(min_value=0), max_size=4),
    read_cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_any_message_survives_masking_fragmentation_and_arbitrary_reads_both_ways(
    message, mask, fragment_cuts, read_cuts
):
    """To the server: frames masked by the tests' own XOR and by the codec's encoder (with
    ``mask`` and with a random key); to the client: the server's encoder."""
    is_text = isinstance(message, str)
    payload = message.encode() if is_text else message
    pieces = cut_into(payload, fragment_cuts)  # may split a character across fragments
    fragments = [(CONT if i else TEXT if is_text else BINARY, piece, i == len(pieces) - 1)
                 for i, piece in enumerate(pieces)]
    expected = ([TextMessage(message) if is_text else BinaryMessage(message)], b"")
    encoders = [
        lambda opcode, piece, fin: client_frame(opcode, piece, fin=fin, mask=mask),
        lambda opcode, piece, fin: encode_client_frame(opcode, piece, fin, mask),
        encode_client_frame,  # a random key for each frame
    ]
    for encode in encoders:
        frames = b"".join(encode(*fragment) for fragment in fragments)
        assert feed(ServerProtocol(), cut_into(frames, read_cuts)) == expected
    to_client = b"".join(encode_frame(*fragment) for fragment in fragments)
    assert feed(ClientProtocol(), cut_into(to_client, read_cuts)) == expected


# -- properties: fuzzing against a reference model ----------------------------------------
#
# The codec parses incrementally, with a fast path, skipping and buffering; the model
# below reads the whole stream at once, frame by frame, with RFC 6455's rules written
# out plainly and its own UTF-8 prefix check. Hypothesis feeds both random, mutated and
# valid streams, the codec in random read sizes, and the two must agree on every event,
# every close code and every frame sent back.

VALID_CODES = frozenset([1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)])
# Every way to finish a character cut short: the second byte's range depends on the
# lead byte (E0: A0-BF, ED: 80-9F, F0: 90-BF, F4: 80-8F), later bytes are 80-BF.
UTF8_COMPLETIONS = [b""] + [
    bytes((second,)) + b"\x80" * more
    for second in (0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF)
    for more in range(3)
]


def is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def is_utf8_prefix(data: bytes) -> bool:
    """True when some bytes appended to ``data`` make valid UTF-8."""
    return any(is_utf8(data + completion) for completion in UTF8_COMPLETIONS)


def frame_error(
    b0: int, b1: int, length: int, message: tuple | None, max_size: int, client: bool
) -> int | None:
    """The close code a frame header earns, or None: framing errors beat size (1002, 1009).

    ``client``: we are the client, so frames must come unmasked (masked to a server).
    """
    fin, rsv, opcode, masked = b0 & 0x80, b0 & 0x70, b0 & 0x0F, bool(b1 & 0x80)
    known = opcode in (CONT, TEXT, BINARY, CLOSE, PING, PONG)
    if length >= 1 << 63 or rsv or masked == client or not known:
        return 1002
    if opcode >= CLOSE:
        return 1002 if not fin or length > 125 else None
    if (opcode == CONT) != (message is not None):
        return 1002  # a continuation with no message, or a new message inside one
    if length + (len(message[1]) if opcode == CONT else 0) > max_size:
        return 1009
    return None


def reference(
    stream: bytes, max_size: int, closing: bool = False, client: bool = False
) -> tuple[list, list]:
    """(events, frames sent back) for ``stream`` read whole; a violation is ("violation", code).

    ``closing``: we sent our close frame (1001) before the stream arrived. ``client``: we
    are the client side (the peer must not mask).
    """
    events: list = []
    sent: list = []
    state = State.CLOSING if closing else State.OPEN
    failed = False
    message: tuple[bool, bytearray] | None = None  # (is text, bytes so far)

    def fail(code: int) -> None:
        nonlocal state, failed, message
        events.append(("violation", code))
        if state is State.OPEN:
            sent.append(("close", code))
            state = State.CLOSING
        failed, message = True, None

    def complete(is_text: bool, data: bytes) -> None:
        if not is_text:
            events.append(BinaryMessage(data))
        elif is_utf8(data):
            events.append(TextMessage(data.decode()))
        else:
            fail(1007)

    pos = 0
    while state is not State.CLOSED and len(stream) - pos >= 2:
        b0, b1 = stream[pos], stream[pos + 1]
        opcode, fin = b0 & 0x0F, b0 & 0x80
        length, header = b1 & 0x7F, 2
        if length >= 126:
            header = 4 if length == 126 else 10
            if len(stream) - pos < header:
                break
            length = int.from_bytes(stream[pos + 2 : pos + header], "big")
        mask_size = 4 if b1 & 0x80 else 0
        end = pos + header + mask_size + length
        if failed:  # only the peer's close still matters, masked or not
            if opcode != CLOSE or length > 125:
                pos = end
                continue
        else:
            code = frame_error(b0, b1, length, message, max_size, client)
            if code is not None:
                fail(code)
                pos = end
                continue
        if end > len(stream):
            break
        payload = stream[end - length : end]
        if mask_size:
            payload = xor_mask(payload, stream[end - length - 4 : end - length])
        pos = end
        if opcode in (TEXT, BINARY):
            if fin:
                complete(opcode == TEXT, payload)
            elif opcode == TEXT and not is_utf8_prefix(payload):
                fail(1007)
            else:
                message = (opcode == TEXT, bytearray(payload))
        elif opcode == CONT:
            assert message is not None
            is_text, data = message
            data += payload
            if is_text and not (is_utf8(data) if fin else is_utf8_prefix(data)):
                fail(1007)
            elif fin:
                message = None
                complete(is_text, bytes(data))
        elif opcode == PING:
            if state is State.OPEN:
                sent.append((PONG, payload))
            events.append(Ping(payload))
        elif opcode == PONG:
            events.append(Pong(payload))
        elif state is not State.OPEN:  # our close is out: any close completes the handshake
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            events.append(CloseReceived(code, payload[2:].decode(errors="replace")))
            state = State.CLOSED
        elif len(payload) == 1 or len(payload) >= 2 and int.from_bytes(payload[:2], "big") not in VALID_CODES:
            fail(1002)
        elif not is_utf8(payload[2:]):
            fail(1007)
        else:
            code = int.from_bytes(payload[:2], "big") if payload else None
            events.append(CloseReceived(code, payload[2:].decode()))
            sent.append(("close", code))
            state = State.CLOSED
    return events, sent


def run_codec(
    stream: bytes, cuts: list[int], max_size: int, closing: bool = False, client: bool = False
):
    """Feed ``stream`` to a fresh codec in reads cut at ``cuts``; (events, sent) as the model gives them."""
    protocol = (ClientProtocol if client else ServerProtocol)(max_message_size=max_size)
    if closing:
        protocol.send_close(CloseCode.GOING_AWAY)
        protocol.data_to_send()
    events, sent = feed(protocol, cut_into(stream, cuts))
    check_invariants(protocol, events, sent)
    events = [e[:2] if isinstance(e, tuple) else e for e in events]  # reasons are ours to word
    frames = []
    for fin, opcode, payload in sent_frames(sent, masked=client):
        assert fin
        if opcode == CLOSE:
            frames.append(("close", int.from_bytes(payload[:2], "big") if payload else None))
        else:
            frames.append((opcode, payload))
    return events, frames


def check_invariants(protocol: ServerProtocol | ClientProtocol, events: list, sent: bytes) -> None:
    """What holds whatever the input: one violation at most, nothing after a close."""
    violations = [e for e in events if isinstance(e, tuple)]
    assert len(violations) <= 1
    assert all(code in (1002, 1007, 1009) for _, code, _ in violations)
    if violations:
        after = events[events.index(violations[0]) + 1 :]
        assert all(isinstance(e, CloseReceived) for e in after)
        assert protocol.close_expected
    closes = [e for e in events if isinstance(e, CloseReceived)]
    assert len(closes) <= 1 and (not closes or events[-1] is closes[0])
    frames = sent_frames(sent, masked=isinstance(protocol, ClientProtocol))
    close_frames = [f for f in frames if f[1] == CLOSE]
    assert len(close_frames) <= 1 and (not close_frames or frames[-1] == close_frames[0])


def test_the_reference_model_agrees_with_the_hand_written_streams():
    """The model is checked too, on the streams whose events are spelled out above."""
    assert reference(STREAM, 1 << 20) == (STREAM_EVENTS, [(PONG, b"ping"), ("close", 1000)])
    violation = [e[:2] if isinstance(e, tuple) else e for e in BAD_STREAM_EVENTS]
    assert reference(BAD_STREAM, 1 << 20) == (violation, [("close", 1002)])
    assert reference(client_frame(TEXT, b"ok\xed\xa0", fin=False), 100) == ([("violation", 1007)],
                                                                             [("close", 1007)])
    assert reference(client_header(BINARY, 101), 100) == ([("violation", 1009)], [("close", 1009)])
    assert reference(make_stream(None), 1 << 20, client=True) == reference(STREAM, 1 << 20)
    masked_to_a_client = ([("violation", 1002), CloseReceived(1000, "done")], [("close", 1002)])
    assert reference(STREAM, 1 << 20, client=True) == masked_to_a_client


reads = st.lists(st.integers(min_value=0), max_size=8)
masks = st.one_of(st.binary(min_size=4, max_size=4), st.just(b"\x00\x00\x00\x00"))
length_forms = st.sampled_from([None, None, None, 16, 64])
max_sizes = st.sampled_from([1 << 20, 100, 10])
BAD_UTF8 = [b"\xff", b"\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xa0",
            b"\xf4\x90\x80\x80", b"\xf4\x90", b"\xe2\x82", b"\xf0\x9f\x98"]
close_payloads = st.builds(
    lambda code, reason: code.to_bytes(2, "big") + reason,
    st.sampled_from(VALID_CLOSE_CODES + INVALID_CLOSE_CODES),
    st.one_of(st.text(max_size=20).map(str.encode), st.sampled_from(BAD_UTF8)),
)
payloads = st.one_of(
    st.binary(max_size=140),
    st.text(max_size=40).map(str.encode),
    st.builds(lambda a, bad, b: a.encode() + bad + b.encode(),
              st.text(max_size=8), st.sampled_from(BAD_UTF8), st.text(max_size=8)),
    close_payloads,
    st.sampled_from([b"", b"\x03"]),
)


def peer_frames(client: bool = False) -> st.SearchStrategy[bytes]:
    """Random frames, three in four with the mask rule of the peer (a client masks; to a
    ``client`` codec the peer is a server, which does not)."""
    right, wrong = (st.none(), masks) if client else (masks, st.none())
    return st.builds(
        lambda opcode, fin, rsv, mask, payload, form: client_frame(
            opcode, payload, fin=fin, rsv=rsv, mask=mask, length_form=form),
        st.one_of(st.sampled_from([CONT, TEXT, BINARY, CLOSE, PING, PONG]), st.integers(0, 15)),
        st.sampled_from([True, True, False]),
        st.sampled_from([0] * 12 + [RSV1, RSV2, RSV3]),
        st.one_of(right, right, right, wrong),
        payloads,
        length_forms,
    )


frames = peer_frames()


@st.composite
def valid_streams(draw, bad_utf8: bool = False, masked: bool = True) -> tuple[bytes, list]:
    """Valid client frames (fragmented messages with pings and pongs between the
    fragments, any mask, any length form) and the events they must give.

    ``bad_utf8``: the text messages get an invalid UTF-8 sequence at a random place,
    and the expected events are left to the reference model. ``masked`` False: server
    frames instead (never masked).
    """
    peer_mask = masks if masked else st.none()
    stream = b""
    expected: list = []
    for _ in range(draw(st.integers(1, 4))):
        message = draw(st.one_of(st.text(max_size=80), st.binary(max_size=200)))
        is_text = isinstance(message, str)
        payload = message.encode() if is_text else message
        if is_text and bad_utf8:
            at = draw(st.integers(0, len(payload)))
            cut = len(payload[:at].decode(errors="ignore").encode())  # between characters
            payload = payload[:cut] + draw(st.sampled_from(BAD_UTF8)) + payload[cut:]
        pieces = cut_into(payload, draw(st.lists(st.integers(min_value=0), max_size=3)))
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            opcode = CONT if i else TEXT if is_text else BINARY
            stream += client_frame(opcode, piece, fin=last, mask=draw(peer_mask),
                                   length_form=draw(length_forms))
            if last:
                expected.append(TextMessage(message) if is_text else BinaryMessage(message))
            if draw(st.integers(0, 3)) == 0:
                control = draw(st.sampled_from([PING, PONG]))
                data = draw(st.binary(max_size=125))
                stream += client_frame(control, data, mask=draw(peer_mask))
                expected.append(Ping(data) if control == PING else Pong(data))
    if draw(st.booleans()) and not bad_utf8:
        code = draw(st.sampled_from(VALID_CLOSE_CODES))
        reason = draw(st.text(max_size=30).filter(lambda r: len(r.encode()) <= 123))
        stream += client_frame(CLOSE, close_payload(code, reason.encode()), mask=draw(peer_mask))
        expected.append(CloseReceived(code, reason))
    return stream, expected


@pytest.mark.slow
@settings(max_examples=600, deadline=None)
@given(valid=valid_streams(), cuts=reads)
def test_valid_streams_give_the_same_events_however_the_reads_split_them(valid, cuts):
    stream, expected = valid
    whole = run_codec(stream, [], 1 << 20)
    assert whole[0] == expected
    assert run_codec(stream, cuts, 1 << 20) == whole
    one_byte_reads = range(0, len(stream), max(1, len(stream) // 50))  # up to 50 tiny reads
    assert run_codec(stream, [*one_byte_reads, *(c + 1 for c in one_byte_reads)], 1 << 20) == whole


@pytest.mark.slow
@settings(max_examples=1200, deadline=None)
@given(stream=st.lists(frames, max_size=8).map(b"".join), cuts=reads, max_size=max_sizes,
       closing=st.sampled_from([False, False, False, True]))
def test_random_frames_give_the_events_and_close_codes_the_rfc_demands(
    stream, cuts, max_size, closing
):
    expected = reference(stream, max_size, closing)
    assert run_codec(stream, cuts, max_size, closing) == expected


@settings(max_examples=500, deadline=None)
@given(stream=valid_streams(bad_utf8=True), cuts=reads)
def test_invalid_utf8_anywhere_in_a_text_message_fails_with_1007_at_the_frame_that_has_it(
    stream, cuts
):
    """The model fails at the first fragment that cannot start valid UTF-8; so must the codec."""
    data, would_be = stream
    expected = reference(data, 1 << 20)
    assert run_codec(data, cuts, 1 << 20) == expected
    if any(isinstance(event, TextMessage) for event in would_be):  # one was corrupted
        assert ("violation", 1007) in expected[0]


@settings(max_examples=400, deadline=None)
@given(
    code=st.one_of(st.integers(0, 65535), st.sampled_from(VALID_CLOSE_CODES + INVALID_CLOSE_CODES)),
    reason=st.one_of(st.text(max_size=40).map(str.encode), payloads),
    before=valid_streams(),
    closing=st.booleans(),
    cuts=reads,
)
def test_close_frames_with_any_code_and_reason_get_the_answer_the_rfc_demands(
    code, reason, before, closing, cuts
):
    stream = before[0] + client_frame(CLOSE, code.to_bytes(2, "big") + reason[:123])
    expected = reference(stream, 1 << 20, closing)
    assert run_codec(stream, cuts, 1 << 20, closing) == expected


mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
              st.integers(min_value=0), st.integers(0, 255)),
    min_size=1, max_size=4,
)


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    """Apply byte-level edits: flip a bit, set a byte, insert, delete, truncate."""
    out = bytearray(data)
    for kind, position, value in edits:
        at = position % (len(out) + 1)
        if kind == "insert":
            out[at:at] = bytes((value,)) * (1 + value % 3)
        elif kind == "truncate":
            del out[at:]
        elif at < len(out):
            if kind == "flip":
                out[at] ^= 1 << (value % 8)
            elif kind == "set":
                out[at] = value
            else:
                del out[at : at + 1 + value % 4]
    return bytes(out)


@pytest.mark.slow
@settings(max_examples=1200, deadline=None)
@given(valid=valid_streams(), edits=mutations, cuts=reads, max_size=max_sizes)
def test_mutated_valid_streams_give_the_events_and_close_codes_the_rfc_demands(
    valid, edits, cuts, max_size
):
    stream = mutate(valid[0], edits)
    assert run_codec(stream, cuts, max_size) == reference(stream, max_size)


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=400), cuts=reads, max_size=st.sampled_from([64, 1 << 20]))
def test_random_garbage_gives_the_events_and_close_codes_the_rfc_demands(garbage, cuts, max_size):
    assert run_codec(garbage, cuts, max_size) == reference(garbage, max_size)


# The client side: the same model with the mask rule turned around, fed server streams.


@settings(max_examples=400, deadline=None)
@given(valid=valid_streams(masked=False), cuts=reads)
def test_valid_server_streams_give_the_client_the_same_events_however_the_reads_split_them(
    valid, cuts
):
    stream, expected = valid
    whole = run_codec(stream, [], 1 << 20, client=True)
    assert whole[0] == expected
    assert run_codec(stream, cuts, 1 << 20, client=True) == whole


@settings(max_examples=400, deadline=None)
@given(stream=st.lists(peer_frames(client=True), max_size=8).map(b"".join), cuts=reads,
       max_size=max_sizes, closing=st.sampled_from([False, False, False, True]))
def test_random_server_frames_give_the_client_the_events_and_close_codes_the_rfc_demands(
    stream, cuts, max_size, closing
):
    expected = reference(stream, max_size, closing, client=True)
    assert run_codec(stream, cuts, max_size, closing, client=True) == expected


@settings(max_examples=400, deadline=None)
@given(valid=valid_streams(masked=False), edits=mutations, cuts=reads, max_size=max_sizes)
def test_mutated_server_streams_give_the_client_the_events_and_close_codes_the_rfc_demands(
    valid, edits, cuts, max_size
):
    stream = mutate(valid[0], edits)
    expected = reference(stream, max_size, client=True)
    assert run_codec(stream, cuts, max_size, client=True) == expected
