"""Tests for logic.py: the Protocol V2 codec, the checksum and TLV policies, the typed TLV
helpers, the three domain logics and the name -> logic registry.

Frames that must be malformed are built here with ``struct`` directly, not with
``build_message``, so a bug in the encoder cannot hide the same bug in the decoder.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import random
import re
import struct
import time
import zlib
from array import array

import pytest

import logic
from logic import (
    MAGIC,
    MAX_MESSAGE_SIZE,
    ExecutionLogic,
    Header,
    MarketDataLogic,
    ProtocolError,
    RelayLogic,
    SignalLogic,
    build_message,
    checksum_ok,
    compute_checksum,
    decode_gap,
    decode_gas_price,
    decode_subscribe,
    decode_trade,
    first_tlv_type,
    gap_message,
    gas_price,
    get_logic,
    parse_message,
    register_logic,
    subscribe_message,
    tlvs_ok,
    trade,
    uses_default_filter,
    validate_logic,
    verify_checksum,
)

# The PROTOCOL.md test vector: one Trade message, 74 bytes, checksum 0xb442e24c.
VECTOR_HEX = (
    "efbeadde01010100010000000000000000002a36fe9c97172a0000004ce242b4"
    "0128341200000000000000c8e6bc1704000000e1f5050000000000002a36fe9c97176400320000000000"
)
VECTOR = bytes.fromhex(VECTOR_HEX)
VECTOR_TS = 1_700_000_000_000_000_000
VECTOR_TRADE = (0x1234, 4_500_000_000_000, 100_000_000, VECTOR_TS, 100, 50, 0)

WIRE_HEADER = struct.Struct("<IBBBBQQII")  # PROTOCOL.md, independent of logic.HEADER


def raw_frame(payload: bytes = b"", *, magic: int = MAGIC, domain: int = 1,
              version: int = 1, source: int = 1, flags: int = 0, sequence: int = 1,
              timestamp_ns: int = 7, payload_size: int | None = None,
              checksum: int = 0) -> bytes:
    """A frame packed by hand, so it can be wrong in exactly one chosen way."""
    if payload_size is None:
        payload_size = len(payload)
    return WIRE_HEADER.pack(magic, domain, version, source, flags, sequence, timestamp_ns,
                            payload_size, checksum) + payload


def with_crc(frame: bytes) -> bytes:
    """The frame with a correct CRC-32 written into its checksum field."""
    crc = zlib.crc32(frame[:28] + frame[32:])
    return frame[:28] + struct.pack("<I", crc) + frame[32:]


def with_stored_checksum(frame: bytes, value: int) -> bytes:
    return frame[:28] + struct.pack("<I", value) + frame[32:]


def build_vector() -> bytes:
    return build_message(1, source=1, tlvs=[trade(*VECTOR_TRADE)], sequence=1,
                         timestamp_ns=VECTOR_TS, checksum=True)


# ---------------------------------------------------------------------------------------
# The PROTOCOL.md test vector
# ---------------------------------------------------------------------------------------


def test_trade_message_matches_the_protocol_test_vector_byte_for_byte():
    message = build_vector()
    assert len(message) == 74
    assert message.hex() == VECTOR_HEX
    assert message == VECTOR


def test_test_vector_parses_back_to_every_header_field():
    header, tlvs = parse_message(VECTOR)
    assert header.magic == 0xDEADBEEF
    assert header.relay_domain == 1
    assert header.version == 1
    assert header.source == 1
    assert header.flags == 0
    assert header.sequence == 1
    assert header.timestamp_ns == VECTOR_TS
    assert header.payload_size == 42
    assert header.checksum == 0xB442E24C
    assert tlvs == [(1, VECTOR[34:])]
    assert len(tlvs[0][1]) == 40


def test_test_vector_trade_decodes_to_the_fields_it_was_built_from():
    (_, value), = parse_message(VECTOR).tlvs
    decoded = decode_trade(value)
    assert tuple(decoded) == VECTOR_TRADE
    assert decoded.asset_id == 0x1234
    assert decoded.price == 4_500_000_000_000
    assert decoded.volume == 100_000_000
    assert decoded.execution_timestamp_ns == VECTOR_TS
    assert decoded.venue_id == 100
    assert decoded.asset_type == 50
    assert decoded.side == 0


def test_test_vector_checksum_is_the_documented_crc():
    assert compute_checksum(VECTOR) == 0xB442E24C
    assert verify_checksum(VECTOR)
    assert checksum_ok(VECTOR, "require")


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------

INTERESTING_LENGTHS = (0, 1, 2, 40, 254, 255, 256, 257, 1000, 65_535)


def random_tlvs(rng: random.Random) -> list[tuple[int, bytes]]:
    tlvs = []
    for _ in range(rng.randint(0, 5)):
        length = rng.choice(INTERESTING_LENGTHS) if rng.random() < 0.6 else rng.randint(0, 300)
        tlvs.append((rng.randint(0, 254), rng.randbytes(length)))
    return tlvs


def expected_tlv_bytes(tlvs: list[tuple[int, bytes]]) -> bytes:
    """The payload as PROTOCOL.md describes it, written out independently."""
    out = bytearray()
    for tlv_type, value in tlvs:
        if len(value) <= 255:
            out += bytes((tlv_type, len(value)))
        else:
            out += bytes((0xFF, 0x00, tlv_type)) + len(value).to_bytes(2, "little")
        out += value
    return bytes(out)


def test_random_messages_round_trip_through_bytes_bytearray_and_memoryview():
    rng = random.Random(20240611)
    seen_lengths = set()
    for _ in range(300):
        tlvs = random_tlvs(rng)
        domain, source, flags = rng.randrange(256), rng.randrange(256), rng.randrange(256)
        sequence, timestamp_ns = rng.randrange(1 << 64), rng.randrange(1 << 64)
        want_checksum = rng.random() < 0.5
        message = build_message(domain, source, tlvs, sequence=sequence,
                                timestamp_ns=timestamp_ns, flags=flags,
                                checksum=want_checksum)
        payload = expected_tlv_bytes(tlvs)
        assert len(message) == 32 + len(payload)
        assert message[32:] == payload
        seen_lengths.update(len(v) for _, v in tlvs)

        crc = zlib.crc32(message[:28] + message[32:]) if want_checksum else 0
        expected_header = Header(magic=MAGIC, relay_domain=domain, version=1, source=source,
                                 flags=flags, sequence=sequence, timestamp_ns=timestamp_ns,
                                 payload_size=len(payload), checksum=crc)
        for data in (message, bytearray(message), memoryview(message)):
            header, parsed = parse_message(data)
            assert header == expected_header
            assert parsed == tlvs
            assert all(type(value) is bytes for _, value in parsed)
        assert verify_checksum(message) is want_checksum
        assert checksum_ok(message, "verify")
        assert checksum_ok(message, "require") is want_checksum
    assert {0, 1, 255, 256, 65_535} <= seen_lengths


def test_each_tlv_is_encoded_standard_up_to_255_bytes_and_extended_above():
    rng = random.Random(7)
    for length in (0, 1, 254, 255, 256, 257, 65_534, 65_535):
        value = rng.randbytes(length)
        prefix = (9, b"ab")  # a TLV before it, so the offset of the one under test is 36
        message = build_message(1, 1, [prefix, (77, value)], timestamp_ns=0)
        at = 32 + 4
        if length <= 255:
            assert message[at:at + 2] == bytes((77, length))
            assert message[at + 2:] == value
        else:
            assert message[at:at + 5] == b"\xff\x00\x4d" + struct.pack("<H", length)
            assert message[at + 5:] == value
        assert parse_message(message).tlvs == [prefix, (77, value)]


def test_a_single_tlv_encodes_the_same_whichever_container_holds_it():
    # build_message has a fast path for a one-element list; it must agree with the
    # general encoder on every input.
    rng = random.Random(3)
    for length in (0, 1, 40, 255, 256, 65_535):
        tlv = (rng.randrange(255), rng.randbytes(length))
        kw = dict(sequence=5, timestamp_ns=11, flags=3)
        for checksum in (False, True):
            from_list = build_message(2, 9, [tlv], checksum=checksum, **kw)
            assert from_list == build_message(2, 9, (tlv,), checksum=checksum, **kw)
            assert from_list == build_message(2, 9, iter([tlv]), checksum=checksum, **kw)


def test_tlv_values_may_be_given_as_bytearray_or_memoryview():
    for length in (0, 3, 255, 256):
        value = bytes(i % 256 for i in range(length))
        for given in (bytearray(value), memoryview(value)):
            for tlvs in ([(5, given)], [(5, given), (6, b"x")]):
                parsed = parse_message(build_message(1, 1, tlvs, timestamp_ns=0)).tlvs
                assert parsed[0] == (5, value)


def test_a_value_given_as_a_non_byte_memoryview_is_encoded_by_its_byte_length():
    # A memoryview of uint16s has len() 3 but 6 bytes: writing 3 as the TLV length
    # corrupts the frame (here it silently parses back as different TLVs).
    value = memoryview(array("H", [1, 2, 3]))
    for tlvs in ([(7, value)], [(7, value), (8, b"")]):
        try:
            message = build_message(1, 1, tlvs, timestamp_ns=0)
        except (ProtocolError, TypeError):
            continue  # refusing it is fine too
        assert parse_message(message).tlvs[0] == (7, value.tobytes())


def test_timestamp_defaults_to_now():
    before = time.time_ns()
    header = parse_message(build_message(1, 1, [])).header
    assert before <= header.timestamp_ns <= time.time_ns()


def test_message_without_tlvs_round_trips_as_an_empty_payload():
    message = build_message(3, 42, [], sequence=9, timestamp_ns=1)
    assert len(message) == 32
    header, tlvs = parse_message(message)
    assert header.payload_size == 0 and tlvs == []


# ---------------------------------------------------------------------------------------
# Encoder refuses what does not fit
# ---------------------------------------------------------------------------------------


def test_value_of_65536_bytes_is_refused():
    with pytest.raises(ProtocolError, match="65536"):
        build_message(1, 1, [(1, bytes(65_536))], timestamp_ns=0)
    with pytest.raises(ProtocolError, match="65536"):
        build_message(1, 1, [(1, b"a"), (1, bytes(65_536))], timestamp_ns=0)


@pytest.mark.parametrize("tlv_type", [255, -1, 256])
@pytest.mark.parametrize("length", [0, 10, 300])
def test_tlv_type_outside_0_to_254_is_refused(tlv_type, length):
    with pytest.raises(ProtocolError):
        build_message(1, 1, [(tlv_type, bytes(length))], timestamp_ns=0)
    with pytest.raises(ProtocolError):
        build_message(1, 1, [(1, b""), (tlv_type, bytes(length))], timestamp_ns=0)


@pytest.mark.parametrize("field, bad", [
    ("source", 256), ("source", -1), ("domain", 256), ("flags", 256),
    ("sequence", 1 << 64), ("sequence", -1), ("timestamp_ns", 1 << 64),
])
@pytest.mark.parametrize("tlvs", [[], [(1, b"abc")], [(1, b"a"), (2, b"b")]],
                         ids=["no-tlv", "one-tlv", "two-tlvs"])
def test_header_field_out_of_range_is_refused(field, bad, tlvs):
    kwargs = dict(domain=1, source=1, tlvs=tlvs, sequence=0, timestamp_ns=0, flags=0)
    kwargs[field] = bad
    with pytest.raises(ProtocolError, match="out of range"):
        build_message(**kwargs)


def test_message_over_max_message_size_is_refused_by_the_builder():
    with pytest.raises(ProtocolError, match="MAX_MESSAGE_SIZE"):
        build_message(1, 1, [(1, bytes(65_535))] * 17, timestamp_ns=0)


# ---------------------------------------------------------------------------------------
# Parser refuses malformed input, naming the problem and the value
# ---------------------------------------------------------------------------------------


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)
    with pytest.raises(ValueError):
        parse_message(b"")


def test_bad_magic_is_refused_naming_the_magic():
    with pytest.raises(ProtocolError, match=r"bad magic 0x00000000"):
        parse_message(raw_frame(b"\x01\x00", magic=0))
    with pytest.raises(ProtocolError, match=r"(?i)magic 0xdeadbeee"):
        parse_message(raw_frame(b"", magic=0xDEADBEEE))


def test_bad_magic_is_refused_even_when_the_sizes_are_also_wrong():
    with pytest.raises(ProtocolError, match="magic"):
        parse_message(raw_frame(b"", magic=0x12345678, payload_size=3))


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version_is_refused_naming_the_version(version):
    with pytest.raises(ProtocolError, match=rf"version {version}\b"):
        parse_message(raw_frame(b"", version=version))


@pytest.mark.parametrize("length", [0, 1, 31])
def test_truncated_header_is_refused_naming_its_length(length):
    for data in (VECTOR[:length], bytearray(VECTOR[:length]), memoryview(VECTOR)[:length]):
        with pytest.raises(ProtocolError, match=rf"truncated header: {length} bytes"):
            parse_message(data)


def test_payload_shorter_than_payload_size_is_refused():
    with pytest.raises(ProtocolError, match=r"shorter than payload_size.*\b42\b") as info:
        parse_message(VECTOR[:-1])
    assert "41" in str(info.value)  # the bytes actually there
    with pytest.raises(ProtocolError, match="shorter"):
        parse_message(VECTOR[:32])


@pytest.mark.parametrize("extra", [1, 2, 74])
def test_bytes_left_over_after_the_message_are_refused(extra):
    with pytest.raises(ProtocolError, match=rf"\b{extra} bytes? left over") as info:
        parse_message(VECTOR + bytes(extra))
    assert "42" in str(info.value)


def test_standard_tlv_running_past_the_payload_end_is_refused():
    # type 1 says 5 bytes of value, the payload has 3
    with pytest.raises(ProtocolError, match=r"TLV type 1 .*runs past the payload end"):
        parse_message(raw_frame(b"\x01\x05abc"))
    # second TLV overruns
    with pytest.raises(ProtocolError, match=r"TLV type 9 .*runs past"):
        parse_message(raw_frame(b"\x01\x00\x09\x02a"))
    # a lone type byte: the TLV header itself is cut
    with pytest.raises(ProtocolError, match=r"TLV header .*runs past"):
        parse_message(raw_frame(b"\x01"))


def test_extended_tlv_running_past_the_payload_end_is_refused():
    with pytest.raises(ProtocolError, match=r"TLV type 7 .*runs past the payload end"):
        parse_message(raw_frame(b"\xff\x00\x07" + struct.pack("<H", 300) + bytes(299)))
    for cut in (b"\xff", b"\xff\x00", b"\xff\x00\x07", b"\xff\x00\x07\x01"):
        with pytest.raises(ProtocolError, match=r"extended TLV header .*runs past"):
            parse_message(raw_frame(cut))


@pytest.mark.parametrize("second", [0x01, 0x80, 0xFF])
def test_extended_marker_followed_by_non_zero_is_refused(second):
    payload = bytes((0xFF, second, 7)) + struct.pack("<H", 1) + b"x"
    with pytest.raises(ProtocolError, match=rf"bad extended TLV marker.*0x{second:02x}"):
        parse_message(raw_frame(payload))


def test_message_over_max_message_size_is_refused_by_the_parser():
    payload_size = MAX_MESSAGE_SIZE - 32 + 1
    # header only (the payload never arrives) and the whole over-long message
    for data in (raw_frame(b"", payload_size=payload_size),
                 raw_frame(bytes(payload_size))):
        with pytest.raises(ProtocolError, match="MAX_MESSAGE_SIZE") as info:
            parse_message(data)
        assert str(payload_size) in str(info.value)


def test_message_of_exactly_max_message_size_is_accepted():
    payload = (b"\xff\x00\x01" + struct.pack("<H", 65_535) + bytes(65_535)) * 15
    rest = MAX_MESSAGE_SIZE - 32 - len(payload)
    payload += b"\xff\x00\x02" + struct.pack("<H", rest - 5) + bytes(rest - 5)
    header, tlvs = parse_message(raw_frame(payload))
    assert header.payload_size + 32 == MAX_MESSAGE_SIZE
    assert len(tlvs) == 16


# ---------------------------------------------------------------------------------------
# Checksum
# ---------------------------------------------------------------------------------------


def test_checksum_changes_when_any_single_bit_flips():
    original = compute_checksum(VECTOR)
    for byte in [*range(0, 28), *range(32, len(VECTOR))]:
        for bit in range(8):
            flipped = bytearray(VECTOR)
            flipped[byte] ^= 1 << bit
            assert compute_checksum(flipped) != original, (byte, bit)
            assert not verify_checksum(flipped), (byte, bit)


def test_checksum_ignores_its_own_field():
    rng = random.Random(99)
    for _ in range(50):
        garbage = rng.randbytes(4)
        tampered = VECTOR[:28] + garbage + VECTOR[32:]
        assert compute_checksum(tampered) == 0xB442E24C
    assert compute_checksum(with_stored_checksum(VECTOR, 0)) == 0xB442E24C


def test_checksum_is_crc32_of_the_message_with_the_field_skipped():
    rng = random.Random(5)
    for _ in range(30):
        message = build_message(rng.randrange(5), rng.randrange(256), random_tlvs(rng)[:2],
                                sequence=rng.randrange(1 << 64), timestamp_ns=0)
        want = zlib.crc32(message[:28] + message[32:])
        for data in (message, bytearray(message), memoryview(message)):
            assert compute_checksum(data) == want


def test_checksum_policy_off_passes_everything():
    good = VECTOR
    for frame in (good, with_stored_checksum(good, 0), with_stored_checksum(good, 1)):
        assert checksum_ok(frame, "off")


def test_checksum_policy_verify_passes_zero_and_correct_and_fails_wrong():
    assert checksum_ok(VECTOR, "verify")
    assert checksum_ok(with_stored_checksum(VECTOR, 0), "verify")
    assert not checksum_ok(with_stored_checksum(VECTOR, 0xB442E24D), "verify")
    assert not checksum_ok(with_stored_checksum(VECTOR, 1), "verify")


def test_checksum_policy_require_passes_only_a_correct_checksum():
    assert checksum_ok(VECTOR, "require")
    assert not checksum_ok(with_stored_checksum(VECTOR, 0), "require")
    assert not checksum_ok(with_stored_checksum(VECTOR, 0xB442E24D), "require")
    corrupted = bytearray(VECTOR)
    corrupted[40] ^= 0x10
    assert not checksum_ok(corrupted, "require")


def test_checksum_policies_apply_to_one_frame_inside_a_buffer_of_several():
    correct = VECTOR
    zero = with_crc(raw_frame(b"\x14\x02hi", domain=2))[:28] + b"\0\0\0\0" + b"\x14\x02hi"
    wrong = with_stored_checksum(with_crc(raw_frame(b"\x28\x00", domain=3)), 12345)
    big_correct = build_message(1, 1, [(200, bytes(range(256)) * 4)], timestamp_ns=3,
                                checksum=True)
    frames = [correct, zero, wrong, big_correct]
    expected = {
        "off": [True, True, True, True],
        "verify": [True, True, False, True],
        "require": [True, False, False, True],
    }
    prefix = b"\xaa" * 13  # not at offset 0, and garbage around the frames
    buffer = prefix + b"".join(frames) + b"\xbb" * 7
    for data in (buffer, bytearray(buffer), memoryview(buffer)):
        for policy, wants in expected.items():
            offset = len(prefix)
            for frame, want in zip(frames, wants, strict=True):
                end = offset + len(frame)
                assert checksum_ok(data, policy, offset, end) is want, (policy, offset)
                assert checksum_ok(data, policy, offset) is want, (policy, offset)
                offset = end


def test_checksum_policy_does_not_read_the_next_frame():
    # the same correct frame must pass whatever follows it in the buffer
    for tail in (b"", VECTOR, b"\xff" * 100):
        assert checksum_ok(VECTOR + tail, "require", 0, len(VECTOR))
        assert checksum_ok(VECTOR + tail, "require")


# ---------------------------------------------------------------------------------------
# TLV policy
# ---------------------------------------------------------------------------------------


def test_tlv_policy_passes_when_every_tlv_is_in_range():
    frame = build_message(2, 20, [(20, b"x" * 16), (39, b""), (25, b"abc")], timestamp_ns=0)
    assert tlvs_ok(frame, range(20, 40))
    assert tlvs_ok(build_message(2, 20, [], timestamp_ns=0), range(20, 40))


@pytest.mark.parametrize("outsider", [19, 40, 0, 254])
@pytest.mark.parametrize("position", [0, 1, 2])
def test_tlv_policy_fails_when_one_tlv_is_out_of_range(outsider, position):
    tlvs = [(20, b"a"), (30, b"bb"), (39, b"")]
    tlvs[position] = (outsider, tlvs[position][1])
    assert not tlvs_ok(build_message(2, 20, tlvs, timestamp_ns=0), range(20, 40))


def test_tlv_policy_works_on_extended_tlvs():
    inside = build_message(3, 40, [(40, bytes(300)), (41, b"ok")], timestamp_ns=0)
    assert inside[32] == 0xFF  # really extended
    assert tlvs_ok(inside, range(40, 80))
    outside = build_message(3, 40, [(41, b"ok"), (80, bytes(65_535))], timestamp_ns=0)
    assert not tlvs_ok(outside, range(40, 80))
    assert tlvs_ok(outside, range(40, 81))


@pytest.mark.parametrize("payload", [
    b"\x14\x05abc",                                         # value past the end
    b"\x14\x00\x15",                                        # header cut
    b"\xff\x00\x14" + struct.pack("<H", 10) + b"abc",       # extended value past the end
    b"\xff\x00\x14",                                        # extended header cut
    b"\xff\x01\x14" + struct.pack("<H", 1) + b"x",          # bad extended marker
    b"\x14\x00\xff\x07\x15\x00\x00",                        # bad marker after a good TLV
], ids=["standard-overrun", "standard-cut", "extended-overrun", "extended-cut",
        "bad-marker", "bad-marker-second"])
def test_tlv_policy_fails_for_a_malformed_payload(payload):
    frame = raw_frame(payload, domain=2)
    assert not tlvs_ok(frame, range(0, 255))
    # even when the bytes after the frame would make it look complete
    assert not tlvs_ok(frame + bytes(400), range(0, 255), 0, len(frame))


def test_tlv_policy_applies_to_one_frame_inside_a_buffer_of_several():
    good = build_message(2, 20, [(20, b"x"), (21, bytes(256))], timestamp_ns=0)
    bad = build_message(2, 20, [(20, b"x"), (50, b"y")], timestamp_ns=0)
    malformed = raw_frame(b"\x14\x09", domain=2)
    buffer = b"\x00" * 5 + good + bad + malformed + good
    offset, wants = 5, []
    for frame in (good, bad, malformed, good):
        wants.append(tlvs_ok(memoryview(buffer), range(20, 40), offset, offset + len(frame)))
        assert tlvs_ok(bytearray(buffer), range(20, 40), offset) is wants[-1]
        offset += len(frame)
    assert wants == [True, False, False, True]


# ---------------------------------------------------------------------------------------
# first_tlv_type
# ---------------------------------------------------------------------------------------


def test_first_tlv_type_reads_standard_extended_and_empty_payloads():
    standard = build_message(1, 1, [(18, bytes(32)), (1, b"")], timestamp_ns=0)
    extended = build_message(1, 1, [(203, bytes(1000)), (1, b"")], timestamp_ns=0)
    empty = build_message(1, 1, [], timestamp_ns=0)
    assert first_tlv_type(standard) == 18
    assert first_tlv_type(extended) == 203
    assert first_tlv_type(empty) is None
    assert first_tlv_type(VECTOR) == 1


def test_first_tlv_type_reads_the_frame_at_an_offset():
    standard = build_message(1, 1, [(18, bytes(32))], timestamp_ns=0)
    extended = build_message(1, 1, [(203, bytes(1000))], timestamp_ns=0)
    empty = build_message(1, 1, [], timestamp_ns=0)
    buffer = bytearray(b"\x07" * 3 + empty + extended + standard)
    assert first_tlv_type(buffer, 3) is None
    assert first_tlv_type(memoryview(buffer), 3 + len(empty)) == 203
    assert first_tlv_type(bytes(buffer), 3 + len(empty) + len(extended)) == 18


# ---------------------------------------------------------------------------------------
# Typed TLV helpers
# ---------------------------------------------------------------------------------------


def test_trades_round_trip_through_their_40_byte_value():
    rng = random.Random(11)
    for _ in range(200):
        fields = (rng.randrange(1 << 64), rng.randrange(-(1 << 63), 1 << 63),
                  rng.randrange(-(1 << 63), 1 << 63), rng.randrange(1 << 64),
                  rng.randrange(1 << 16), rng.randrange(256), rng.randrange(2))
        tlv_type, value = trade(*fields)
        assert tlv_type == 1 and len(value) == 40
        assert tuple(decode_trade(value)) == fields
        assert tuple(decode_trade(memoryview(bytearray(value)))) == fields


def test_gas_prices_round_trip_through_their_32_byte_value():
    rng = random.Random(12)
    for _ in range(200):
        fields = (rng.randrange(1 << 64), rng.randrange(1 << 64), rng.randrange(1 << 32),
                  rng.randrange(1 << 32), rng.randrange(1 << 32), rng.randrange(1 << 16))
        tlv_type, value = gas_price(*fields)
        assert tlv_type == 18 and len(value) == 32
        assert value[30:] == b"\0\0"  # reserved
        assert tuple(decode_gas_price(value)) == fields
        assert tuple(decode_gas_price(bytearray(value))) == fields


@pytest.mark.parametrize("decode, size", [
    (decode_trade, 40), (decode_gas_price, 32), (decode_gap, 16),
])
def test_typed_value_of_the_wrong_length_is_refused(decode, size):
    for length in (0, size - 1, size + 1):
        with pytest.raises(ProtocolError, match=rf"{length} bytes, expected {size}"):
            decode(bytes(length))


def test_typed_helper_field_out_of_range_is_refused():
    with pytest.raises(ProtocolError):
        trade(-1, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ProtocolError):
        trade(0, 0, 0, 0, 1 << 16, 0, 0)
    with pytest.raises(ProtocolError):
        gas_price(0, 0, 1 << 32, 0, 0, 0)


@pytest.mark.parametrize("mode, types, gap", [
    (0, (), False), (0, (), True), (1, (1, 18, 2), False), (1, (254, 0), True),
    (2, (), False), (2, (), True),
])
def test_subscribe_frame_carries_mode_gap_flag_and_types(mode, types, gap):
    frame = subscribe_message(mode, types, gap, source=60)
    header, tlvs = parse_message(frame)
    assert header.relay_domain == 4
    assert header.source == 60
    assert first_tlv_type(frame) == 113
    (tlv_type, value), = tlvs
    assert tlv_type == 113
    assert value[0] == mode and value[1] == (1 if gap else 0)
    assert sorted(value[2:]) == sorted(set(types))
    subscription = decode_subscribe(value)
    assert subscription.mode == mode
    assert subscription.gap_notices is gap
    assert subscription.tlv_types == frozenset(types)


def test_subscribe_defaults_to_receiving_everything_without_gap_notices():
    (_, value), = parse_message(subscribe_message()).tlvs
    assert value == b"\x00\x00"
    assert decode_subscribe(value) == (0, False, frozenset(), False)


@pytest.mark.parametrize("flags, bridge", [(0x00, False), (0x01, False), (0x02, True),
                                           (0x03, True), (0xFD, False)])
def test_flag_bit_1_marks_a_bridge(flags, bridge):
    assert decode_subscribe(bytes((0, flags))).bridge is bridge


@pytest.mark.parametrize("flags, gap", [(0x00, False), (0x01, True), (0x02, False),
                                        (0x03, True), (0xFE, False), (0xFF, True)])
def test_only_flag_bit_0_asks_for_gap_notices(flags, gap):
    assert decode_subscribe(bytes((0, flags, 5))).gap_notices is gap


@pytest.mark.parametrize("mode", [3, 255, -1])
def test_unknown_subscribe_mode_is_refused(mode):
    with pytest.raises(ProtocolError, match=rf"mode {mode}\b"):
        subscribe_message(mode)
    if 0 <= mode <= 255:
        with pytest.raises(ProtocolError, match=rf"mode {mode}\b"):
            decode_subscribe(bytes((mode, 0)))


def test_subscribe_value_too_short_or_with_bad_types_is_refused():
    with pytest.raises(ProtocolError):
        decode_subscribe(b"\x00")
    with pytest.raises(ProtocolError):
        subscribe_message(1, [255])


def test_gap_notice_is_a_domain_4_frame_with_dropped_and_total():
    rng = random.Random(13)
    for _ in range(50):
        dropped, total = rng.randrange(1 << 64), rng.randrange(1 << 64)
        frame = gap_message(dropped, total, source=82, sequence=4)
        header, tlvs = parse_message(frame)
        assert header.relay_domain == 4
        assert header.source == 82 and header.sequence == 4
        assert tlvs == [(114, struct.pack("<QQ", dropped, total))]
        gap = decode_gap(tlvs[0][1])
        assert (gap.dropped, gap.total_dropped) == (dropped, total)


def test_gap_notice_comes_from_the_market_data_relay_by_default():
    assert parse_message(gap_message(1, 2)).header.source == 80


# ---------------------------------------------------------------------------------------
# The three domain logics
# ---------------------------------------------------------------------------------------

SPEC_TABLE = [
    (MarketDataLogic, "market_data", 1, "/tmp/torq/market_data.sock", "drop_oldest", "off",
     None, 65_536),
    (SignalLogic, "signal", 2, "/tmp/torq/signals.sock", "disconnect", "verify",
     range(20, 40), 32_768),
    (ExecutionLogic, "execution", 3, "/tmp/torq/execution.sock", "backpressure", "require",
     range(40, 80), 16_384),
]


@pytest.mark.parametrize("cls, name, domain, socket_path, overflow, checksum, tlv_types, "
                         "max_size", SPEC_TABLE, ids=[row[1] for row in SPEC_TABLE])
def test_domain_logic_has_the_spec_table_values(cls, name, domain, socket_path, overflow,
                                                checksum, tlv_types, max_size):
    logic_ = cls()
    assert logic_.name == name
    assert logic_.domain == domain
    assert logic_.socket_path == socket_path
    assert logic_.overflow == overflow
    assert logic_.checksum == checksum
    assert logic_.tlv_types == tlv_types
    assert logic_.max_message_size == max_size
    assert isinstance(logic_, RelayLogic)
    assert validate_logic(logic_) is logic_
    assert uses_default_filter(logic_)


@pytest.mark.parametrize("cls", [MarketDataLogic, SignalLogic, ExecutionLogic])
def test_domain_logic_forwards_its_own_domain_only(cls):
    logic_ = cls()
    for domain in range(0, 6):
        header = parse_message(build_message(domain, 1, [], timestamp_ns=0)).header
        assert logic_.should_forward(header) is (domain == logic_.domain)


def test_subclass_overriding_should_forward_does_not_use_the_default_filter():
    class OnlyBinance(MarketDataLogic):
        def should_forward(self, header):
            return header.source == 1

    only = OnlyBinance()
    assert not uses_default_filter(only)
    assert only.should_forward(parse_message(VECTOR).header)


def test_subclass_keeping_should_forward_uses_the_default_filter():
    class Quiet(SignalLogic):
        name = "quiet"
        overflow = "drop_oldest"

    assert uses_default_filter(Quiet())


def test_filter_set_on_an_instance_is_not_mistaken_for_the_default():
    # The engine skips should_forward when uses_default_filter says it is the default;
    # a filter attached to the instance would then silently never run.
    market = MarketDataLogic()
    market.should_forward = lambda header: header.source == 2
    assert not uses_default_filter(market)


# ---------------------------------------------------------------------------------------
# RelayLogic protocol, validation and registry
# ---------------------------------------------------------------------------------------


class PlainLogic:
    """A user's domain written without subclassing anything."""

    name = "plain_test_domain"
    domain = 7
    socket_path = "/tmp/torq/plain.sock"
    overflow = "disconnect"
    checksum = "verify"
    tlv_types = range(200, 255)
    max_message_size = 4096

    def should_forward(self, header):
        return header.relay_domain == 7 and header.flags == 0


class NoFilterLogic:
    name = "no_filter"
    domain = 7
    socket_path = "/tmp/torq/nofilter.sock"
    overflow = "disconnect"
    checksum = "verify"
    tlv_types = None
    max_message_size = 4096


def test_plain_user_class_with_the_right_members_is_a_relay_logic():
    plain = PlainLogic()
    assert isinstance(plain, RelayLogic)
    assert validate_logic(plain) is plain
    assert not uses_default_filter(plain)


def test_object_missing_should_forward_is_not_a_relay_logic():
    assert not isinstance(NoFilterLogic(), RelayLogic)
    with pytest.raises(ValueError, match="should_forward"):
        validate_logic(NoFilterLogic())
    assert not isinstance(object(), RelayLogic)


@pytest.mark.parametrize("name, cls", [
    ("market_data", MarketDataLogic), ("signal", SignalLogic), ("execution", ExecutionLogic),
])
def test_get_logic_finds_the_built_in_domains(name, cls):
    found = get_logic(name)
    assert type(found) is cls
    assert found.name == name
    assert get_logic(name) is not found  # a fresh object each time


def test_unknown_domain_name_is_refused_listing_the_known_ones():
    with pytest.raises(ValueError) as info:
        get_logic("nope")
    text = str(info.value)
    assert "nope" in text
    for known in ("market_data", "signal", "execution"):
        assert known in text


def test_registered_user_domain_is_found_by_name(monkeypatch):
    monkeypatch.setattr(logic, "LOGICS", dict(logic.LOGICS))
    register_logic(PlainLogic)
    found = get_logic("plain_test_domain")
    assert isinstance(found, PlainLogic)
    register_logic(PlainLogic, name="alias")
    assert isinstance(get_logic("alias"), PlainLogic)
    with pytest.raises(ValueError, match="plain_test_domain"):
        get_logic("still-unknown")  # the error lists the new name too


def test_registering_changes_only_a_copy_here():
    # the previous test's registration was undone by monkeypatch
    assert "plain_test_domain" not in logic.LOGICS
    assert sorted(logic.LOGICS) == ["execution", "market_data", "signal"]


def test_registering_without_a_name_is_refused(monkeypatch):
    monkeypatch.setattr(logic, "LOGICS", dict(logic.LOGICS))
    with pytest.raises(ValueError):
        register_logic(lambda: PlainLogic())


def test_registered_domain_with_a_bad_policy_is_refused_when_looked_up(monkeypatch):
    class Bad(PlainLogic):
        name = "bad_policy"
        overflow = "explode"

    monkeypatch.setattr(logic, "LOGICS", dict(logic.LOGICS))
    register_logic(Bad)
    with pytest.raises(ValueError, match="explode"):
        get_logic("bad_policy")


def test_unknown_overflow_policy_is_refused_with_the_choices():
    class Bad(PlainLogic):
        overflow = "drop_newest"

    with pytest.raises(ValueError, match="overflow") as info:
        validate_logic(Bad())
    text = str(info.value)
    assert "drop_newest" in text
    for policy in ("drop_oldest", "disconnect", "backpressure"):
        assert policy in text


def test_unknown_checksum_policy_is_refused_with_the_choices():
    class Bad(PlainLogic):
        checksum = "sometimes"

    with pytest.raises(ValueError, match="checksum") as info:
        validate_logic(Bad())
    text = str(info.value)
    assert "sometimes" in text
    for policy in ("off", "verify", "require"):
        assert policy in text


@pytest.mark.parametrize("attr, value", [
    ("domain", 256), ("domain", -1), ("max_message_size", 31),
    ("max_message_size", MAX_MESSAGE_SIZE + 1),
])
def test_domain_or_size_that_cannot_work_is_refused(attr, value):
    bad = PlainLogic()
    setattr(bad, attr, value)
    with pytest.raises(ValueError, match=re.escape(str(value))):
        validate_logic(bad)


# ---------------------------------------------------------------------------------------
# Header is a frozen dataclass
# ---------------------------------------------------------------------------------------

HEADER_FIELDS = ("magic", "relay_domain", "version", "source", "flags", "sequence",
                 "timestamp_ns", "payload_size", "checksum")


def vector_header() -> Header:
    return parse_message(VECTOR).header


def test_header_is_a_dataclass_with_the_spec_fields_in_order():
    header = vector_header()
    assert dataclasses.is_dataclass(header)
    assert tuple(f.name for f in dataclasses.fields(Header)) == HEADER_FIELDS
    assert dataclasses.asdict(header)["checksum"] == 0xB442E24C


def test_header_cannot_be_assigned_to():
    header = vector_header()
    for name in HEADER_FIELDS:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(header, name, 5)
    assert header.sequence == 1


def test_header_can_be_built_by_keyword_and_equals_the_parsed_one():
    built = Header(magic=MAGIC, relay_domain=1, version=1, source=1, flags=0, sequence=1,
                   timestamp_ns=VECTOR_TS, payload_size=42, checksum=0xB442E24C)
    parsed = vector_header()
    assert built == parsed
    assert hash(built) == hash(parsed)
    assert {built: "x"}[parsed] == "x"
    assert built.message_size == 74


def test_headers_that_differ_in_one_field_are_not_equal():
    header = vector_header()
    for name in HEADER_FIELDS:
        other = dataclasses.replace(header, **{name: getattr(header, name) + 1})
        assert other != header
        assert getattr(other, name) == getattr(header, name) + 1
        assert len({header, other}) == 2


def test_replace_makes_a_changed_copy_and_leaves_the_original():
    header = vector_header()
    changed = dataclasses.replace(header, sequence=2, flags=9)
    assert type(changed) is Header
    assert (changed.sequence, changed.flags) == (2, 9)
    assert (header.sequence, header.flags) == (1, 0)
    assert changed.timestamp_ns == header.timestamp_ns


def test_header_survives_copy_deepcopy_and_pickle():
    # Any frozen dataclass can be copied and pickled (multiprocessing queues, caches);
    # Header must be no exception, nor a Message that holds one.
    header = vector_header()
    assert copy.copy(header) == header
    assert copy.deepcopy(header) == header
    assert pickle.loads(pickle.dumps(header)) == header
    message = parse_message(VECTOR)
    assert pickle.loads(pickle.dumps(message)) == message
