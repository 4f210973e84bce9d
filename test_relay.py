"""Tests for relay.py: the engine (``Relay``) and the blocking client (``RelayClient``).

Every test runs a real relay in a thread on a real Unix socket in a fresh temp directory
(the ``start_relay`` fixture of conftest.py) and judges it by what clients receive and by
``relay.stats()``, never by private attributes. Every socket has a timeout and every loop
is bounded, so a broken relay fails a test instead of hanging the suite.

Synchronisation without blind sleeps: the relay counts every byte it reads (``bytes_in``)
and every frame it reads, control frames included (``messages_in``), so a test waits on
those counters to know the relay has read what it sent (a split frame's first piece, a
``RELAY_SUBSCRIBE``) before it goes on. Only a relay in another process (the command
line tests) has no counters to wait on; those tests say how they cope.

Client ids in log lines: the relay numbers its clients 1, 2, 3, ... in the order it
accepts them, so a test that connects clients one by one knows each one's id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import resource
import selectors
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest

import logic
from conftest import (
    SHORT_S,
    TIMEOUT_S,
    TS,
    Reader,
    RunningRelay,
    StartRelay,
    assert_nothing_more,
    connect_raw,
    cpu_ticks,
    domain_of,
    leave_stale_socket,
    sequence_of,
    source_of,
    wait_for_socket,
    wait_until,
)
from logic import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    RELAY_GAP,
    RELAY_SUBSCRIBE,
    SUBSCRIBE_ALL,
    SUBSCRIBE_TYPES,
    TLV_GAS_PRICE,
    TLV_TRADE,
    Domain,
    ExecutionLogic,
    MarketDataLogic,
    SignalLogic,
    build_message,
    decode_gap,
    gas_price,
    parse_message,
    subscribe_message,
    trade,
)
from relay import BUFFER_SIZE, Relay, RelayClient, RelayError

DATA_TLV = {Domain.MARKET_DATA: TLV_TRADE, Domain.SIGNAL: 20, Domain.EXECUTION: 40}


# ---------------------------------------------------------------------------------------
# Helpers: frames, reading, waiting
# ---------------------------------------------------------------------------------------


def make_frame(seq: int, *, domain: int = Domain.MARKET_DATA, size: int = 64, source: int = 1,
               tlv_type: int | None = None, checksum: bool | None = None,
               random_fill: bool = False) -> bytes:
    """One valid data frame of ``domain`` of exactly ``size`` bytes (header included).

    The payload is one standard TLV up to 289 bytes, extended TLVs above (several for
    frames over 64 KiB). Execution frames carry a checksum unless told otherwise.
    """
    if tlv_type is None:
        tlv_type = DATA_TLV[Domain(domain)]
    if checksum is None:
        checksum = domain == Domain.EXECUTION
    rng = random.Random(seq * 1_000_003 + size)
    remaining = size - HEADER_SIZE
    tlvs: list[tuple[int, bytes]] = []
    while remaining:
        if remaining <= 257:
            length = remaining - 2
        else:
            length = min(60_000, remaining - 5)
            if 0 < remaining - 5 - length < 300:
                length -= 300  # leave the last TLV room to be a valid one
        value = (rng.randbytes(length) if random_fill
                 else (seq.to_bytes(8, "little") * (length // 8 + 1))[:length])
        tlvs.append((tlv_type, value))
        remaining -= length + (2 if length <= 255 else 5)
    frame = build_message(domain, source, tlvs, sequence=seq, timestamp_ns=TS,
                          checksum=checksum)
    assert len(frame) == size, f"make_frame cannot build a {size}-byte frame"
    return frame


def raw_frame(domain: int, payload: bytes, *, seq: int = 1, source: int = 1,
              magic: int = MAGIC, version: int = 1, payload_size: int | None = None,
              checksum: int = 0) -> bytes:
    """A frame packed by hand, so it can be as malformed as a test needs."""
    size = len(payload) if payload_size is None else payload_size
    return HEADER.pack(magic, domain, version, source, 0, seq, TS, size, checksum) + payload


def recv_n(client: RelayClient, count: int, timeout: float = TIMEOUT_S) -> list[bytes]:
    """Exactly ``count`` frames from ``client``; each wait bounded by ``timeout``."""
    return [client.recv(timeout=timeout) for _ in range(count)]


def read_until_closed(client: RelayClient) -> list[bytes]:
    """Every whole frame until the relay closes the connection (cleanly or mid-frame)."""
    frames = []
    for _ in range(10_000_000):
        try:
            frames.append(client.recv(timeout=TIMEOUT_S))
        except (EOFError, ConnectionError):
            return frames
    raise AssertionError("the relay never closed the connection")


def wait_in(relay: RunningRelay, messages: int) -> None:
    """Wait until the relay has read ``messages`` frames (control frames included).

    The relay counts a read's frames after forwarding them, so a consumer may hold a
    frame before the counter moves: counters are waited on, not read at once.
    """
    relay.wait_for(lambda: relay.stats().messages_in >= messages)


def wait_stat(relay: RunningRelay, name: str, value: int) -> None:
    """Wait until ``relay.stats().<name> == value`` (see ``wait_in``)."""
    relay.wait_for(lambda: getattr(relay.stats(), name) == value)


def send_in_pieces(relay: RunningRelay, sock: socket.socket, data: bytes,
                   cuts: Iterable[int]) -> None:
    """Send ``data`` cut at ``cuts``, waiting after each piece until the relay has read
    it: each piece reaches the relay in reads of its own."""
    start = relay.stats().bytes_in
    pos = 0
    for cut in [*cuts, len(data)]:
        sock.sendall(data[pos:cut])
        wait_until(lambda cut=cut: relay.stats().bytes_in >= start + cut,
                   f"the relay to read up to byte {cut}", poll_s=0.0002)  # byte-at-a-time
        pos = cut


def relay_warnings(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "relay" and r.levelno >= level]


# Relay configurations that take different read paths: the fast loop (market data), the
# checked loop without policies (market data with a max below the buffer size), and the
# checked loop with checksum and TLV policies (signal, execution).
CONFIGS: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "market_data": (MarketDataLogic, {}),
    "market_data_small_max": (MarketDataLogic, {"max_message_size": 4096}),
    "signal": (SignalLogic, {}),
    "execution": (ExecutionLogic, {}),
}


def start_config(start_relay: StartRelay, name: str, **extra: Any) -> tuple[RunningRelay, int]:
    factory, overrides = CONFIGS[name]
    logic_ = factory()
    return start_relay(logic_, **{**overrides, **extra}), int(logic_.domain)


# ---------------------------------------------------------------------------------------
# Reading: split, coalesced, byte-at-a-time and oversized frames arrive whole
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["market_data", "signal", "execution"])
@pytest.mark.parametrize("cuts", [[1], [10], [31], [32], [33], [63], [64], [65], [96], [137],
                                  [20, 64, 100], [5, 40, 70, 90, 120]],
                         ids=lambda cuts: "cut-" + "-".join(map(str, cuts)))
def test_frames_split_across_reads_arrive_whole_and_byte_identical(start_relay, config, cuts):
    relay, domain = start_config(start_relay, config)
    consumer = relay.client()
    publisher = connect_raw(relay.path)
    relay.wait_clients(2)
    frames = [make_frame(1, domain=domain, size=64), make_frame(2, domain=domain, size=74)]
    send_in_pieces(relay, publisher, b"".join(frames), cuts)
    assert recv_n(consumer, 2) == frames
    wait_stat(relay, "messages_in", 2)
    publisher.close()


@pytest.mark.parametrize("config", ["market_data", "signal"])
def test_frames_sent_one_byte_at_a_time_arrive_whole(start_relay, config):
    relay, domain = start_config(start_relay, config)
    consumer = relay.client()
    publisher = connect_raw(relay.path)
    relay.wait_clients(2)
    frames = [make_frame(1, domain=domain, size=64), make_frame(2, domain=domain, size=81)]
    # A control frame between them, byte by byte too: applied, never forwarded.
    data = frames[0] + subscribe_message(SUBSCRIBE_ALL) + frames[1]
    send_in_pieces(relay, publisher, data, range(1, len(data)))
    assert recv_n(consumer, 2) == frames
    wait_stat(relay, "messages_in", 3)
    assert relay.stats().messages_invalid == 0
    publisher.close()


@pytest.mark.parametrize("config", ["market_data", "market_data_small_max", "signal",
                                    "execution"])
def test_many_frames_coalesced_in_one_send_all_arrive_in_order(start_relay, config):
    relay, domain = start_config(start_relay, config)
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    rng = random.Random(3)
    # Runs of same-size frames (the relay may check those a column at a time) mixed
    # with frames of random sizes, all in one send of about 400 KB.
    frames = []
    for seq in range(1, 3001):
        size = 64 if (seq // 100) % 2 else rng.choice([34, 40, 64, 100, 200, 289, 400, 1000])
        frames.append(make_frame(seq, domain=domain, size=size))
    publisher.send_many(frames)
    received = recv_n(consumer, len(frames))
    assert received == frames
    wait_stat(relay, "messages_in", len(frames))
    stats = relay.stats()
    assert stats.bytes_in == sum(map(len, frames))
    assert stats.messages_invalid == stats.messages_filtered == stats.protocol_errors == 0


@pytest.mark.parametrize("config", ["market_data", "signal", "execution"])
def test_frame_larger_than_the_read_buffer_arrives_whole_and_byte_identical(start_relay,
                                                                            config):
    relay, domain = start_config(start_relay, config, max_message_size=200_000)
    consumer = relay.client()
    publisher = connect_raw(relay.path)
    relay.wait_clients(2)
    big = [make_frame(seq, domain=domain, size=size, random_fill=True)
           for seq, size in ((2, 100_000), (4, 150_000), (5, 200_000), (7, BUFFER_SIZE + 1))]
    small = [make_frame(seq, domain=domain, size=80) for seq in (1, 3, 6, 8)]
    frames = [small[0], big[0], small[1], big[1], big[2], small[2], big[3], small[3]]
    assert all(len(frame) > BUFFER_SIZE for frame in big)
    data = b"".join(frames)
    publisher.sendall(data)  # all at once: the relay sees them in 64 KiB reads
    assert recv_n(consumer, len(frames)) == frames
    send_in_pieces(relay, publisher, data, range(7_777, len(data), 33_333))  # odd cuts
    assert recv_n(consumer, len(frames)) == frames
    assert relay.stats().protocol_errors == 0
    publisher.close()


@pytest.mark.parametrize("config", ["market_data", "signal"])
def test_frame_of_exactly_max_message_size_passes_and_one_byte_more_is_a_protocol_error(
        start_relay, config):
    relay, domain = start_config(start_relay, config)
    max_size = relay.relay.max_message_size
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    largest = make_frame(1, domain=domain, size=max_size, random_fill=True)
    publisher.send(largest)
    assert consumer.recv() == largest
    publisher.send(raw_frame(domain, b"", payload_size=max_size - HEADER_SIZE + 1))
    relay.wait_for(lambda: relay.stats().protocol_errors == 1)
    with pytest.raises((EOFError, ConnectionError)):
        publisher.recv()


@pytest.mark.parametrize("domain, size", [(Domain.MARKET_DATA, 74), (Domain.EXECUTION, 66)],
                         ids=["market_data", "execution"])
def test_a_run_of_same_size_frames_over_max_message_size_is_a_protocol_error(
        start_relay, domain, size):
    """Twenty frames one byte over the limit in one send (the column-checked path) are
    refused exactly as one such frame would be."""
    logic_ = MarketDataLogic() if domain == Domain.MARKET_DATA else ExecutionLogic()
    relay = start_relay(logic_, max_message_size=size - 1)
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    publisher.send_many([make_frame(seq, domain=domain, size=size) for seq in range(1, 21)])
    relay.wait_for(lambda: relay.stats().protocol_errors == 1)
    with pytest.raises((EOFError, ConnectionError)):
        publisher.recv()
    assert_nothing_more(consumer)
    assert relay.stats().messages_out == 0


def test_a_system_domain_logic_applies_control_frames_and_never_forwards_them(start_relay):
    class SystemLogic(logic.BaseLogic):
        name = "system"
        domain = Domain.SYSTEM
        max_message_size = 4096

    relay = start_relay(SystemLogic())
    listener = relay.client()
    quiet = relay.client(publish_only=True)  # a RELAY_SUBSCRIBE in a domain-4 relay
    relay.wait_clients(2)
    wait_in(relay, 1)
    heartbeats = [build_message(Domain.SYSTEM, 60, [logic.heartbeat(TS, seq)], sequence=seq,
                                timestamp_ns=TS) for seq in range(1, 41)]
    quiet.send_many(heartbeats)  # a same-size run: the column-checked path
    assert recv_n(listener, 40) == heartbeats
    listener.send(heartbeats[0])
    wait_in(relay, 42)
    assert_nothing_more(quiet)  # publish-only was applied, and it was never forwarded
    assert_nothing_more(listener)


def test_same_size_runs_with_a_foreign_frame_and_a_control_frame_inside_forward_the_rest(
        start_relay):
    relay = start_relay(MarketDataLogic())
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    run1 = [make_frame(seq) for seq in range(1, 21)]
    run2 = [make_frame(seq) for seq in range(21, 41)]
    run3 = [make_frame(seq) for seq in range(41, 61)]
    foreign = make_frame(99, domain=Domain.SIGNAL, size=64)  # same size, other domain
    publisher.send_many([*run1, foreign, *run2, subscribe_message(SUBSCRIBE_ALL), *run3])
    assert recv_n(consumer, 60) == run1 + run2 + run3
    wait_stat(relay, "messages_in", 62)
    assert relay.stats().messages_filtered == 1
    assert_nothing_more(consumer)


# ---------------------------------------------------------------------------------------
# Validation: framing errors close only that client; policies drop only that frame
# ---------------------------------------------------------------------------------------


def _corrupt(frame: bytes, how: str, max_size: int) -> tuple[bytes, str]:
    """The frame broken as ``how`` says, and the bad value the log line must name."""
    data = bytearray(frame)
    if how == "bad_magic":
        struct.pack_into("<I", data, 0, 0x12345678)
        return bytes(data), "0x12345678"
    if how == "version_2":
        data[5] = 2
        return bytes(data), "version 2"
    payload_size = max_size - HEADER_SIZE + 1  # one byte over the limit
    struct.pack_into("<I", data, 24, payload_size)
    return bytes(data), str(payload_size)


@pytest.mark.parametrize("how", ["bad_magic", "version_2", "over_max_message_size"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_framing_error_closes_only_that_client_after_forwarding_the_frames_before_it(
        start_relay, caplog, config, how):
    caplog.set_level(logging.INFO, logger="relay")
    relay, domain = start_config(start_relay, config)
    consumer = relay.client()  # client 1
    relay.wait_clients(1)
    other = relay.client()  # client 2: another publisher that must keep flowing
    relay.wait_clients(2)
    bad_client = relay.client()  # client 3
    relay.wait_clients(3)
    before = [make_frame(seq, domain=domain, source=3) for seq in range(1, 21)]
    bad, bad_value = _corrupt(make_frame(21, domain=domain, source=3), how,
                              relay.relay.max_message_size)
    after = make_frame(22, domain=domain, source=3)
    # Five frames in a read of their own, then fifteen more, the bad one and one more in
    # one send: the log line must give the offset in the stream, not in the read.
    bad_client.send_many(before[:5])
    relay.wait_for(lambda: relay.stats().messages_in >= 5)
    bad_client.send_many([*before[5:], bad, after])

    relay.wait_for(lambda: relay.stats().protocol_errors == 1)
    with pytest.raises(EOFError):
        bad_client.recv()
    assert recv_n(consumer, 20) == before
    assert recv_n(other, 20) == before
    relay.wait_for(lambda: relay.stats().connections_active == 2)
    # The frame after the bad one was never forwarded: the next frame is the sentinel.
    sentinel = make_frame(1, domain=domain, source=2)
    other.send(sentinel)
    assert consumer.recv() == sentinel
    offset = 20 * 64
    lines = [m for m in relay_warnings(caplog)
             if re.search(r"\bclient 3\b", m) and re.search(rf"\boffset {offset}\b", m)]
    assert lines, f"no warning names client 3 and offset {offset}: {relay_warnings(caplog)}"
    assert bad_value in lines[0]
    stats = relay.stats()
    assert stats.protocol_errors == 1
    assert stats.messages_invalid == stats.messages_filtered == 0


def test_signal_relay_passes_zero_and_correct_checksums_and_drops_a_wrong_one(start_relay,
                                                                             caplog):
    relay = start_relay(SignalLogic())
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    zero = make_frame(1, domain=Domain.SIGNAL, checksum=False)
    correct = make_frame(2, domain=Domain.SIGNAL, checksum=True)
    wrong = bytearray(make_frame(3, domain=Domain.SIGNAL, checksum=True))
    wrong[28] ^= 0x01
    after = make_frame(4, domain=Domain.SIGNAL)
    publisher.send_many([zero, correct, bytes(wrong), after])
    assert recv_n(consumer, 3) == [zero, correct, after]
    relay.wait_for(lambda: relay.stats().messages_invalid == 1)
    # The connection stays usable, and 200 more bad frames log nothing above DEBUG.
    caplog.set_level(logging.INFO, logger="relay")
    caplog.clear()
    publisher.send_many([bytes(wrong)] * 200)
    relay.wait_for(lambda: relay.stats().messages_invalid == 201)
    publisher.send(make_frame(5, domain=Domain.SIGNAL))
    assert sequence_of(consumer.recv()) == 5
    assert relay_warnings(caplog, logging.INFO) == []
    stats = relay.stats()
    assert stats.protocol_errors == stats.messages_filtered == 0
    assert stats.connections_active == 2


def test_execution_relay_requires_a_checksum_so_zero_and_wrong_ones_are_dropped(start_relay):
    relay = start_relay(ExecutionLogic())
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    zero = make_frame(1, domain=Domain.EXECUTION, checksum=False)
    correct = make_frame(2, domain=Domain.EXECUTION, checksum=True)
    wrong = bytearray(make_frame(3, domain=Domain.EXECUTION, checksum=True))
    wrong[40] ^= 0xFF  # payload changed after the checksum was computed
    after = make_frame(4, domain=Domain.EXECUTION)
    publisher.send_many([zero, correct, bytes(wrong), after])
    assert recv_n(consumer, 2) == [correct, after]
    relay.wait_for(lambda: relay.stats().messages_invalid == 2)
    publisher.send(make_frame(5, domain=Domain.EXECUTION))
    assert sequence_of(consumer.recv()) == 5
    assert relay.stats().protocol_errors == 0
    assert relay.stats().connections_active == 2


BAD_SIGNAL_PAYLOADS = {
    # TLV type outside the signal range 20..39
    "market_data_type": logic.encode_tlvs([(TLV_TRADE, bytes(40))]),
    "system_type": logic.encode_tlvs([(100, bytes(16))]),
    "second_tlv_out_of_range": logic.encode_tlvs([(20, bytes(16)), (5, bytes(4))]),
    "extended_tlv_out_of_range": logic.encode_tlvs([(1, bytes(300))]),
    # malformed payloads
    "length_past_the_payload_end": bytes([20, 10]) + bytes(5),
    "one_stray_byte_after_a_tlv": bytes([20, 2, 0, 0, 21]),
    "extended_marker_second_byte_not_0": bytes([0xFF, 0x01, 20, 2, 0]) + bytes(2),
    "truncated_extended_header": bytes([20, 0, 0xFF, 0x00, 20]),
    "extended_length_past_the_end": bytes([0xFF, 0x00, 20, 0x00, 0x10]) + bytes(300),
}


@pytest.mark.parametrize("payload", list(BAD_SIGNAL_PAYLOADS.values()),
                         ids=list(BAD_SIGNAL_PAYLOADS))
def test_frame_failing_the_tlv_policy_is_dropped_and_counted_and_the_connection_stays(
        start_relay, payload):
    relay = start_relay(SignalLogic())
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    good1 = make_frame(1, domain=Domain.SIGNAL)
    good2 = make_frame(3, domain=Domain.SIGNAL)
    publisher.send_many([good1, raw_frame(Domain.SIGNAL, payload, seq=2), good2])
    assert recv_n(consumer, 2) == [good1, good2]
    relay.wait_for(lambda: relay.stats().messages_invalid == 1)
    stats = relay.stats()
    assert stats.protocol_errors == stats.messages_filtered == 0
    assert stats.connections_active == 2
    publisher.send(make_frame(4, domain=Domain.SIGNAL))
    assert sequence_of(consumer.recv()) == 4


@pytest.mark.parametrize(("config", "foreign_domain"),
                         [("market_data", Domain.SIGNAL), ("market_data", Domain.SYSTEM),
                          ("market_data_small_max", Domain.EXECUTION),
                          ("signal", Domain.MARKET_DATA), ("execution", Domain.SIGNAL)])
def test_frame_of_another_domain_is_filtered_and_counted(start_relay, config, foreign_domain):
    relay, domain = start_config(start_relay, config)
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    # Well formed, in the relay's TLV range and checksummed: only the domain byte is wrong.
    foreign = make_frame(2, domain=domain, checksum=True)
    foreign = foreign[:4] + bytes([foreign_domain]) + foreign[5:]
    foreign = foreign[:28] + struct.pack("<I", logic.compute_checksum(foreign)) + foreign[32:]
    good1, good2 = make_frame(1, domain=domain), make_frame(3, domain=domain)
    publisher.send_many([good1, foreign, good2])
    assert recv_n(consumer, 2) == [good1, good2]
    relay.wait_for(lambda: relay.stats().messages_filtered == 1)
    assert relay.stats().messages_invalid == 0
    assert relay.stats().protocol_errors == 0


class EvenSequencesOnly:
    """A user's own domain, written as a plain class (no BaseLogic) with a custom filter."""

    name = "even"
    domain = 1
    socket_path = "/tmp/torq/even.sock"
    overflow = "drop_oldest"
    checksum = "off"
    tlv_types = None
    max_message_size = 65536

    def should_forward(self, header: logic.Header) -> bool:
        return header.sequence % 2 == 0


def test_user_logic_with_a_custom_should_forward_is_honoured(start_relay):
    relay = start_relay(EvenSequencesOnly())
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    frames = [make_frame(seq) for seq in range(1, 41)]  # one run of same-size frames
    publisher.send_many(frames)
    assert recv_n(consumer, 20) == frames[1::2]
    wait_stat(relay, "messages_in", 40)
    assert relay.stats().messages_filtered == 20
    assert_nothing_more(consumer)

# ---------------------------------------------------------------------------------------
# The read path against a frame-by-frame reference model (seeded fuzz)
# ---------------------------------------------------------------------------------------


def _model_forward(stream: bytes, logic_: logic.RelayLogic) -> tuple[bytes, bool]:
    """What a consumer must receive when one publisher sends ``stream``, walking the
    frames one at a time exactly as SPEC.md describes; and whether the relay must close
    the publisher (a framing error)."""
    out = []
    pos = 0
    while pos + logic.HEADER_SIZE <= len(stream):
        header = logic.HEADER.unpack_from(stream, pos)
        size = logic.HEADER_SIZE + header[7]
        if header[0] != logic.MAGIC or header[2] != 1 or size > logic_.max_message_size:
            return b"".join(out), True
        if pos + size > len(stream):
            break
        frame = stream[pos:pos + size]
        pos += size
        if header[1] == logic.Domain.SYSTEM and logic.first_tlv_type(frame) == RELAY_SUBSCRIBE:
            continue
        if (logic.checksum_ok(frame, logic_.checksum)
                and (logic_.tlv_types is None or logic.tlvs_ok(frame, logic_.tlv_types))
                and header[1] == logic_.domain):
            out.append(frame)
    return b"".join(out), False


def _random_stream(rng: random.Random, logic_: logic.RelayLogic) -> bytes:
    """Runs of same-size frames (the column-checked path), odd sizes, frames of other
    domains, bad checksums or TLV types, control frames, and sometimes one corrupt byte."""
    domain = int(logic_.domain)
    low = logic_.tlv_types.start if logic_.tlv_types else 1
    frames: list[bytes] = []
    sequence = 0
    for _ in range(rng.randrange(1, 8)):
        kind = rng.random()
        run = rng.choice((1, 2, 17, 40, 300))
        value = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 30, 200, 255))))
        for _ in range(run):
            sequence += 1
            tlv_type = low if kind < 0.8 else rng.randrange(0, 255)
            frame_domain = domain if kind < 0.9 else rng.choice((1, 2, 3))
            frame = build_message(frame_domain, 1, [(tlv_type, value)], sequence=sequence,
                                  timestamp_ns=0, checksum=rng.random() < 0.7)
            if rng.random() < 0.02:
                frame = frame[:28] + b"\x01\x02\x03\x04" + frame[32:]  # wrong checksum
            frames.append(frame)
        if rng.random() < 0.2:
            frames.append(logic.subscribe_message(0))
    stream = bytearray(b"".join(frames))
    if rng.random() < 0.3:
        stream[rng.randrange(len(stream))] ^= 1 << rng.randrange(8)
    if rng.random() < 0.2:
        del stream[rng.randrange(len(stream)):]
    return bytes(stream)


@pytest.mark.parametrize("logic_", [logic.MarketDataLogic(), logic.SignalLogic()],
                         ids=["market_data", "signal"])
def test_every_random_stream_is_forwarded_exactly_as_the_frame_by_frame_model_says(
        start_relay: Callable[..., RunningRelay], logic_: logic.RelayLogic) -> None:
    rng = random.Random(20261124)
    relay = start_relay(logic_, queue_limit=1_000_000)
    consumer = connect_raw(relay.path)
    relay.wait_clients(1)
    for case in range(120):
        stream = _random_stream(rng, logic_)
        expected, closes = _model_forward(stream, logic_)
        publisher = connect_raw(relay.path)
        pos = 0
        try:
            while pos < len(stream):
                piece = rng.choice((1, 7, 64, 1000, 70_000))
                publisher.sendall(stream[pos:pos + piece])
                pos += piece
        except (BrokenPipeError, ConnectionResetError):
            assert closes, f"case {case}: relay closed a publisher with a valid stream"
        received = bytearray()
        while len(received) < len(expected):
            data = consumer.recv(1 << 20)
            assert data, f"case {case}: consumer closed"
            received += data
        assert bytes(received) == expected, f"case {case}: forwarded bytes differ"
        if closes:  # a framing error: the relay closes the publisher
            publisher.settimeout(TIMEOUT_S)
            try:
                assert publisher.recv(1) == b""
            except ConnectionResetError:
                pass
        publisher.close()
    consumer.settimeout(0.2)
    with pytest.raises(TimeoutError):
        consumer.recv(1)  # nothing beyond what the model says
    consumer.close()


# ---------------------------------------------------------------------------------------
# Fan-out: every other client, never the sender, order kept per publisher
# ---------------------------------------------------------------------------------------


def test_every_message_reaches_every_other_client_and_never_its_sender(start_relay):
    relay = start_relay()
    clients = [relay.client() for _ in range(3)]
    relay.wait_clients(3)
    for source, client in enumerate(clients, 1):
        client.send(make_frame(1, source=source))
    relay.wait_for(lambda: relay.stats().messages_out >= 6)
    for source, client in enumerate(clients, 1):
        received = recv_n(client, 2)
        assert sorted(map(source_of, received)) == [s for s in (1, 2, 3) if s != source]
        assert_nothing_more(client)
    assert relay.stats().messages_out == 6


def test_three_concurrent_publishers_keep_their_order_and_interleave_only_at_frame_boundaries(
        start_relay):
    relay = start_relay(queue_limit=1_000_000)
    per_publisher = 3000
    consumers = [relay.client(), relay.client()]
    publishers = [relay.client() for _ in range(3)]
    relay.wait_clients(5)
    rng = random.Random(11)
    sizes = [34, 50, 64, 74, 120, 200, 289, 300, 512, 1500]
    sent: dict[tuple[int, int], bytes] = {}
    streams = []
    for source in (1, 2, 3):
        frames = [make_frame(seq, source=source, size=rng.choice(sizes))
                  for seq in range(1, per_publisher + 1)]
        sent.update(((source, seq), frame) for seq, frame in enumerate(frames, 1))
        streams.append(b"".join(frames))
    errors: list[BaseException] = []

    def publish(client: RelayClient, data: bytes, seed: int) -> None:
        # Random cuts, most of them inside frames: the relay must reassemble each
        # publisher's frames and never splice another publisher's bytes into one.
        cuts = random.Random(seed)
        pos = 0
        try:
            while pos < len(data):
                step = cuts.randint(1, 5000)
                client.send(data[pos:pos + step])
                pos += step
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(client, stream, index), daemon=True)
               for index, (client, stream) in enumerate(zip(publishers, streams, strict=True))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S * 2)
        assert not thread.is_alive()
    assert not errors, errors

    def check(frames: list[bytes], sources: set[int]) -> None:
        next_seq = dict.fromkeys(sources, 1)
        for frame in frames:
            header, _ = parse_message(frame)  # every frame parses: no torn frames
            assert header.source in sources
            assert header.sequence == next_seq[header.source]
            assert frame == sent[(header.source, header.sequence)]
            next_seq[header.source] += 1

    for consumer in consumers:
        check(recv_n(consumer, 3 * per_publisher), {1, 2, 3})
    for source, publisher in enumerate(publishers, 1):  # no echo among publishers either
        check(recv_n(publisher, 2 * per_publisher), {1, 2, 3} - {source})
    wait_stat(relay, "messages_out", 4 * 3 * per_publisher)
    assert relay.stats().messages_dropped == 0


# ---------------------------------------------------------------------------------------
# Overflow: drop_oldest, disconnect, backpressure
# ---------------------------------------------------------------------------------------


def _publish_past_a_slow_consumer(relay: RunningRelay, domain: int, total: int,
                                  batch: int = 50) -> tuple[RelayClient, RelayClient]:
    """Publish ``total`` frames (seq 1..total) in batches while a fast consumer reads
    each batch before the next is sent (the clients already connected are the slow
    ones). The fast one must get everything, in order. Returns ``(fast, publisher)``:
    keep them referenced, or garbage collection closes them."""
    before = relay.stats()
    fast = relay.client()
    publisher = relay.client(publish_only=True)
    relay.wait_clients(before.connections_total + 2)
    wait_in(relay, before.messages_in + 1)  # publish_only is in force
    frames = [make_frame(seq, domain=domain) for seq in range(1, total + 1)]
    for start in range(0, total, batch):
        publisher.send_many(frames[start:start + batch])
        received = recv_n(fast, len(frames[start:start + batch]))
        assert received == frames[start:start + batch]
    wait_in(relay, before.messages_in + 1 + total)  # every drop for the slow one is done
    return fast, publisher


def test_slow_consumer_gets_whole_frames_in_order_with_a_counted_gap(start_relay, caplog):
    caplog.set_level(logging.WARNING, logger="relay")
    started = time.monotonic()
    relay = start_relay(queue_limit=100)
    slow = relay.client()  # never reads until the end
    relay.wait_clients(1)
    total = 20_000
    fast, _publisher = _publish_past_a_slow_consumer(relay, Domain.MARKET_DATA, total)
    dropped = relay.stats().messages_dropped
    assert dropped > 0
    received = recv_n(slow, total - dropped)
    assert_nothing_more(slow)
    sequences = [sequence_of(frame) for frame in received]
    assert all(domain_of(frame) == Domain.MARKET_DATA for frame in received)  # no notices
    assert all(frame == make_frame(sequence_of(frame)) for frame in received)  # whole frames
    assert sequences == sorted(set(sequences))  # increasing, no duplicates
    assert sequences[-1] == total  # the newest data is never the one dropped
    assert any(b - a > 1 for a, b in zip(sequences, sequences[1:], strict=False))
    wait_stat(relay, "messages_out", total + len(received))  # deliveries: fast + slow
    stats = relay.stats()
    assert stats.messages_dropped == total - len(received)
    assert stats.bytes_out == 64 * (total + len(received))
    assert_nothing_more(fast)
    # The drop is logged, naming the client, but at most once a second.
    drop_lines = [m for m in relay_warnings(caplog) if "drop" in m]
    assert drop_lines and all(m.startswith("client 1") for m in drop_lines)
    assert len(drop_lines) <= 1 + (time.monotonic() - started)


def test_queue_bytes_limit_also_drops_the_oldest_whole_frames(start_relay):
    relay = start_relay(queue_bytes=6400)  # 100 frames of 64 bytes; message limit 10,000
    slow = relay.client()
    relay.wait_clients(1)
    total = 20_000
    _clients = _publish_past_a_slow_consumer(relay, Domain.MARKET_DATA, total)
    dropped = relay.stats().messages_dropped
    assert dropped > 0
    received = recv_n(slow, total - dropped)
    assert_nothing_more(slow)
    sequences = [sequence_of(frame) for frame in received]
    assert sequences == sorted(set(sequences)) and sequences[-1] == total
    assert all(frame == make_frame(sequence_of(frame)) for frame in received)


def check_gap_stream(frames: list[bytes], total: int, size: int = 64) -> tuple[list[int], int]:
    """Check what a consumer with gap notices received from a publisher of seq 1..total:
    whole data frames in increasing order, and right before the first data after each
    gap, notices (domain 4, the relay's source, one RELAY_GAP TLV) that announce exactly
    the messages missing there, with a correct running total. Returns the data
    sequences and the total the notices announced."""
    data: list[int] = []
    run = 0  # messages announced by the notices since the last data frame
    announced = 0
    for frame in frames:
        header, tlvs = parse_message(frame)
        if header.relay_domain == Domain.SYSTEM:
            assert header.source == logic.Source.MARKET_DATA_RELAY
            assert [t for t, _ in tlvs] == [RELAY_GAP]
            gap = decode_gap(tlvs[0][1])
            announced += gap.dropped
            assert gap.total_dropped == announced  # the running total for this client
            run += gap.dropped
            continue
        assert frame == make_frame(header.sequence, size=size)  # whole, byte-identical
        previous = data[-1] if data else 0
        assert header.sequence - previous - 1 == run, (
            f"{header.sequence - previous - 1} messages missing before seq "
            f"{header.sequence}, but the notices right before it announce {run}")
        run = 0
        data.append(header.sequence)
    assert run == 0  # no notice left without the data it announces
    assert data[-1] == total  # the newest data is never the one dropped
    return data, announced


def test_gap_notices_arrive_right_before_the_data_after_each_gap_and_add_up(start_relay):
    relay = start_relay(queue_limit=100)
    slow = relay.client(gap_notices=True)
    relay.wait_clients(1)
    wait_in(relay, 1)
    total = 20_000
    _clients = _publish_past_a_slow_consumer(relay, Domain.MARKET_DATA, total)
    dropped = relay.stats().messages_dropped
    assert dropped > 0
    frames: list[bytes] = []
    data_frames = 0
    while data_frames < total - dropped:
        frames.append(slow.recv())
        data_frames += domain_of(frames[-1]) == Domain.MARKET_DATA
        assert len(frames) <= 2 * total
    assert_nothing_more(slow)
    data, announced = check_gap_stream(frames, total)
    assert len(frames) > len(data)  # there were notices
    assert announced == dropped == total - len(data)


class SlowReader(Reader):
    """Reads every frame until the one with sequence ``last``, pausing 1 ms every 100
    frames: the relay's writes to it are often cut short inside a chunk."""

    def __init__(self, client: RelayClient, last: int) -> None:
        super().__init__(client, count=0)
        self.last = last

    def run(self) -> None:
        try:
            for index in range(10_000_000):
                frame = self.client.recv(timeout=TIMEOUT_S)
                self.frames.append(frame)
                if domain_of(frame) != Domain.SYSTEM and sequence_of(frame) == self.last:
                    return
                if index % 100 == 99:
                    time.sleep(0.001)
        except BaseException as exc:
            self.error = exc


def test_consumer_reading_slowly_never_gets_a_torn_frame_and_its_gap_notices_add_up(
        start_relay):
    # 2 KB frames and a 200-frame limit: more pending than one kernel write takes, so
    # the relay is often in the middle of a chunk when it has to drop (a chunk that
    # must not be dropped); with 64-byte frames every write is all or nothing.
    relay = start_relay(queue_limit=200)
    slow = relay.client(gap_notices=True)
    publisher = relay.client(publish_only=True)
    relay.wait_clients(2)
    wait_in(relay, 2)
    total, size = 10_000, 2048
    reader = SlowReader(slow, total)
    reader.start()
    frames = [make_frame(seq, size=size) for seq in range(1, total + 1)]
    for start in range(0, total, 50):
        publisher.send_many(frames[start:start + 50])
    received = reader.finish()
    wait_in(relay, total + 2)
    assert_nothing_more(slow)
    data, announced = check_gap_stream(received, total, size)
    assert announced == relay.stats().messages_dropped == total - len(data)


@pytest.mark.parametrize(("factory", "overrides"),
                         [(SignalLogic, {}), (MarketDataLogic, {"overflow": "disconnect"})],
                         ids=["signal", "market_data_overridden"])
def test_slow_consumer_is_disconnected_and_a_fast_consumer_alongside_gets_everything(
        start_relay, caplog, factory, overrides):
    caplog.set_level(logging.WARNING, logger="relay")
    logic_ = factory()
    relay = start_relay(logic_, queue_limit=100, **overrides)
    slow = relay.client()
    relay.wait_clients(1)
    total = 20_000
    _clients = _publish_past_a_slow_consumer(relay, int(logic_.domain), total)
    relay.wait_for(lambda: relay.stats().slow_disconnects == 1)
    relay.wait_for(lambda: relay.stats().connections_active == 2)
    got = [sequence_of(frame) for frame in read_until_closed(slow)]
    assert got == list(range(1, len(got) + 1))  # a prefix: nothing dropped before the cut
    assert len(got) < total
    assert relay.stats().messages_dropped == 0
    assert any(m.startswith("client 1") for m in relay_warnings(caplog))


@pytest.mark.parametrize(("factory", "overrides"),
                         [(ExecutionLogic, {}), (MarketDataLogic, {"overflow": "backpressure"})],
                         ids=["execution", "market_data_overridden"])
def test_backpressure_loses_nothing_when_the_consumer_reads_in_bursts_with_pauses(
        start_relay, factory, overrides):
    logic_ = factory()
    domain = int(logic_.domain)
    # The pauses add up to more than stall_timeout, but each burst is write progress.
    relay = start_relay(logic_, queue_limit=500, stall_timeout=1.0, **overrides)
    consumer = relay.client()
    publisher = relay.client(publish_only=True)
    relay.wait_clients(2)
    wait_in(relay, 1)
    total = 50_000
    reader = Reader(consumer, total, burst=2000, pause_s=0.05)
    reader.start()
    frames = [make_frame(seq, domain=domain) for seq in range(1, total + 1)]
    for start in range(0, total, 1000):
        publisher.send_many(frames[start:start + 1000])
    received = reader.finish()
    assert [sequence_of(frame) for frame in received] == list(range(1, total + 1))
    assert received == frames
    stats = relay.stats()
    assert stats.backpressure_pauses > 0
    assert stats.messages_dropped == stats.slow_disconnects == 0
    assert stats.connections_active == 2


def test_backpressure_disconnects_a_consumer_that_never_reads_and_then_the_others_flow(
        start_relay, caplog):
    caplog.set_level(logging.WARNING, logger="relay")
    relay = start_relay(ExecutionLogic(), queue_limit=100, stall_timeout=1.0)
    stuck = relay.client()  # client 1: never reads
    relay.wait_clients(1)
    active = relay.client()
    publisher = relay.client(publish_only=True)
    relay.wait_clients(3)
    wait_in(relay, 1)
    total = 20_000
    reader = Reader(active, total)
    reader.start()
    frames = [make_frame(seq, domain=Domain.EXECUTION) for seq in range(1, total + 1)]
    for start in range(0, total, 1000):
        publisher.send_many(frames[start:start + 1000])  # blocks while the relay pauses
    assert reader.finish() == frames
    relay.wait_for(lambda: relay.stats().slow_disconnects == 1)
    assert relay.stats().backpressure_pauses >= 1
    assert relay.stats().connections_active == 2
    got = [sequence_of(frame) for frame in read_until_closed(stuck)]
    assert got == list(range(1, len(got) + 1))  # backpressure never drops, it cut the tail
    assert any(m.startswith("client 1") for m in relay_warnings(caplog))


def test_publish_only_clients_never_read_and_yet_never_stall_a_backpressure_domain(
        start_relay):
    # A stall would need stall_timeout (30 s) to clear: the publisher's 5 s send timeout
    # turns one into a failure.
    relay = start_relay(ExecutionLogic(), queue_limit=100, stall_timeout=30)
    quiet = relay.client(publish_only=True)  # publishes a little, never reads
    consumer = relay.client()
    publisher = relay.client(publish_only=True)  # publishes a lot, never reads
    relay.wait_clients(3)
    wait_in(relay, 2)
    total = 20_000
    reader = Reader(consumer, total + 10)
    reader.start()
    quiet.send_many([make_frame(seq, domain=Domain.EXECUTION, source=7) for seq in range(1, 6)])
    frames = [make_frame(seq, domain=Domain.EXECUTION) for seq in range(1, total + 1)]
    for start in range(0, total, 1000):
        publisher.send_many(frames[start:start + 1000])
    quiet.send_many([make_frame(seq, domain=Domain.EXECUTION, source=7) for seq in range(6, 11)])
    received = reader.finish()
    assert [sequence_of(f) for f in received if source_of(f) == 1] == list(range(1, total + 1))
    assert [sequence_of(f) for f in received if source_of(f) == 7] == list(range(1, 11))
    wait_stat(relay, "messages_out", total + 10)  # nothing ever queued for the quiet ones
    stats = relay.stats()
    assert stats.slow_disconnects == stats.messages_dropped == 0
    assert stats.connections_active == 3


# ---------------------------------------------------------------------------------------
# Control frames: RELAY_SUBSCRIBE
# ---------------------------------------------------------------------------------------


def test_subscriber_to_types_gets_only_messages_whose_first_tlv_type_is_listed(start_relay):
    relay = start_relay()
    trades_only = relay.client(subscribe=[TLV_TRADE])
    everything = relay.client()
    publisher = relay.client(publish_only=True)
    relay.wait_clients(3)
    wait_in(relay, 2)
    a_trade = trade(0x1234, 4_500_000_000_000, 100_000_000, TS, 100, 50, 0)
    a_gas_price = gas_price(1, TS, 30, 20, 2, 202)
    frames = [
        build_message(1, 1, [a_trade], sequence=1, timestamp_ns=TS),                 # yes
        build_message(1, 1, [a_gas_price], sequence=2, timestamp_ns=TS),             # no
        build_message(1, 1, [a_gas_price, a_trade], sequence=3, timestamp_ns=TS),    # no
        build_message(1, 1, [(TLV_TRADE, bytes(400))], sequence=4, timestamp_ns=TS),  # yes
        build_message(1, 1, [a_trade, a_gas_price], sequence=5, timestamp_ns=TS),    # yes
        build_message(1, 1, [], sequence=6, timestamp_ns=TS),                         # no
    ]
    publisher.send_many(frames)
    assert recv_n(everything, 6) == frames
    assert recv_n(trades_only, 3) == [frames[0], frames[3], frames[4]]
    relay.wait_for(lambda: relay.stats().messages_out >= 9)
    assert_nothing_more(trades_only)
    assert relay.stats().messages_out == 9


def test_publish_only_client_receives_nothing_but_can_publish(start_relay):
    relay = start_relay()
    quiet = relay.client(publish_only=True)
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(3)
    wait_in(relay, 1)
    frames = [make_frame(seq) for seq in range(1, 6)]
    publisher.send_many(frames)
    assert recv_n(consumer, 5) == frames
    relay.wait_for(lambda: relay.stats().messages_out >= 5)
    assert_nothing_more(quiet)
    assert relay.stats().messages_out == 5
    mine = make_frame(1, source=9)
    quiet.send(mine)
    assert consumer.recv() == mine
    assert publisher.recv() == mine


def test_a_second_subscribe_replaces_the_first(start_relay):
    relay = start_relay()
    subscriber = relay.client(subscribe=[TLV_TRADE])
    publisher = relay.client(publish_only=True)
    relay.wait_clients(2)
    wait_in(relay, 2)
    a_trade = make_frame(1, tlv_type=TLV_TRADE)
    a_gas_price = make_frame(2, tlv_type=TLV_GAS_PRICE)
    subscriber.send(subscribe_message(SUBSCRIBE_TYPES, [TLV_GAS_PRICE]))
    wait_in(relay, 3)
    publisher.send_many([a_trade, a_gas_price])
    assert subscriber.recv() == a_gas_price
    subscriber.send(subscribe_message(SUBSCRIBE_ALL))
    wait_in(relay, 6)
    publisher.send_many([a_trade, a_gas_price])
    assert recv_n(subscriber, 2) == [a_trade, a_gas_price]


@pytest.mark.parametrize("config", ["market_data", "signal", "execution"])
def test_control_frames_are_never_forwarded_to_anyone(start_relay, config):
    relay, domain = start_config(start_relay, config)
    everything = relay.client()
    listed = relay.client(subscribe=[RELAY_SUBSCRIBE, DATA_TLV[Domain(domain)]])
    sender = relay.client()
    relay.wait_clients(3)
    wait_in(relay, 1)
    data = [make_frame(seq, domain=domain) for seq in range(1, 4)]
    control = subscribe_message(SUBSCRIBE_ALL)
    sender.send_many([data[0], control, data[1], control, data[2]])
    assert recv_n(everything, 3) == data
    assert recv_n(listed, 3) == data
    wait_in(relay, 6)
    relay.wait_for(lambda: relay.stats().messages_out >= 6)
    assert_nothing_more(everything)
    assert_nothing_more(listed)
    stats = relay.stats()
    assert stats.messages_out == 6
    assert stats.messages_in == 6
    assert stats.messages_invalid == stats.messages_filtered == 0


def test_control_frames_skip_the_checksum_and_tlv_policies(start_relay):
    # RelayClient's RELAY_SUBSCRIBE has no checksum and a TLV type outside 40..79.
    relay = start_relay(ExecutionLogic())
    subscriber = relay.client(subscribe=[41])
    publisher = relay.client(publish_only=True)
    relay.wait_clients(2)
    wait_in(relay, 2)
    frames = [make_frame(1, domain=Domain.EXECUTION, tlv_type=40),
              make_frame(2, domain=Domain.EXECUTION, tlv_type=41)]
    publisher.send_many(frames)
    assert subscriber.recv() == frames[1]
    assert relay.stats().messages_invalid == 0
    assert_nothing_more(subscriber)


def test_malformed_subscribe_is_counted_invalid_and_the_client_stays(start_relay):
    relay = start_relay()
    client = relay.client()
    other = relay.client()
    relay.wait_clients(2)
    mode_7 = build_message(Domain.SYSTEM, 0, [(RELAY_SUBSCRIBE, bytes([7, 0]))])
    too_short = build_message(Domain.SYSTEM, 0, [(RELAY_SUBSCRIBE, bytes([1]))])
    data = make_frame(1, source=1)
    client.send_many([mode_7, too_short, data])
    assert other.recv() == data  # and never the malformed control frames
    relay.wait_for(lambda: relay.stats().messages_invalid == 2)
    assert relay.stats().protocol_errors == 0
    assert relay.stats().connections_active == 2
    reply = make_frame(1, source=2)
    other.send(reply)
    assert client.recv() == reply  # still subscribed to everything
    assert_nothing_more(other)


# ---------------------------------------------------------------------------------------
# Unix socket setup and removal
# ---------------------------------------------------------------------------------------


def _exchange_works(relay: RunningRelay) -> None:
    """Two new clients can talk through ``relay``."""
    before = relay.stats().connections_total
    with relay.client() as a, relay.client() as b:
        relay.wait_clients(before + 2)
        frame = make_frame(42)
        a.send(frame)
        assert b.recv() == frame


def test_parent_directory_is_created_with_mode_0700_and_the_socket_gets_0600(start_relay,
                                                                             socket_dir):
    path = os.path.join(socket_dir, "made", "relay.sock")
    relay = start_relay(socket_path=path)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    _exchange_works(relay)


def test_socket_mode_can_be_overridden(start_relay, socket_path):
    relay = start_relay(socket_mode=0o660)
    assert stat.S_IMODE(os.lstat(socket_path).st_mode) == 0o660
    _exchange_works(relay)


def test_second_relay_on_a_live_socket_raises_and_the_first_keeps_serving(start_relay,
                                                                          socket_path):
    first = start_relay()
    inode = os.lstat(socket_path).st_ino
    with pytest.raises(RelayError, match="another relay is already listening"):
        Relay(MarketDataLogic(), socket_path=socket_path, stats_interval=0)
    assert os.lstat(socket_path).st_ino == inode
    _exchange_works(first)


def test_stale_socket_file_is_replaced(start_relay, socket_path):
    leave_stale_socket(socket_path)
    assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)
    relay = start_relay()
    _exchange_works(relay)


def test_socket_left_by_a_killed_relay_is_replaced(start_relay, cli, socket_path):
    process = cli("--socket", socket_path, "--log-level", "warning")
    wait_for_socket(socket_path)
    process.kill()
    process.communicate(timeout=TIMEOUT_S)
    assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)  # SIGKILL left it behind
    relay = start_relay()
    _exchange_works(relay)


def test_regular_file_at_the_socket_path_is_refused_and_left_untouched(socket_path):
    with open(socket_path, "w") as file:
        file.write("precious\n")
    with pytest.raises(RelayError, match="not a socket"):
        Relay(MarketDataLogic(), socket_path=socket_path, stats_interval=0)
    with open(socket_path) as file:
        assert file.read() == "precious\n"


def test_socket_path_too_long_for_af_unix_says_the_limit_and_leaves_no_directory(socket_dir):
    path = os.path.join(socket_dir, "new-dir", "x" * 120 + ".sock")
    with pytest.raises(RelayError, match="holds at most 107: pass a shorter --socket"):
        Relay(MarketDataLogic(), socket_path=path, stats_interval=0)
    assert not os.path.lexists(path)
    assert not os.path.lexists(os.path.dirname(path))


def test_a_socket_path_under_a_regular_file_raises_relay_error_naming_it(socket_dir):
    blocker = os.path.join(socket_dir, "plain-file")
    with open(blocker, "w") as f:
        f.write("not a directory")
    path = os.path.join(blocker, "relay.sock")
    with pytest.raises(RelayError, match=re.escape(blocker)):
        Relay(MarketDataLogic(), socket_path=path, stats_interval=0)


def test_shutdown_removes_the_socket_file(start_relay, socket_path):
    relay = start_relay()
    relay.stop()
    assert not os.path.lexists(socket_path)


@pytest.mark.parametrize("replacement", ["regular_file", "another_socket"])
def test_shutdown_leaves_alone_a_file_that_replaced_the_socket(start_relay, socket_path,
                                                               replacement):
    relay = start_relay()
    os.unlink(socket_path)
    other = None
    if replacement == "regular_file":
        with open(socket_path, "w") as file:
            file.write("someone else's\n")
    else:
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(socket_path)
    inode = os.lstat(socket_path).st_ino
    relay.stop()
    try:
        assert os.lstat(socket_path).st_ino == inode
        if other is None:
            with open(socket_path) as file:
                assert file.read() == "someone else's\n"
    finally:
        if other is not None:
            other.close()


# ---------------------------------------------------------------------------------------
# Connections: the limit, vanished clients
# ---------------------------------------------------------------------------------------


def test_client_over_max_connections_is_accepted_and_closed_at_once(start_relay, caplog):
    caplog.set_level(logging.WARNING, logger="relay")
    relay = start_relay(max_connections=3)
    first, second, third = (relay.client() for _ in range(3))
    relay.wait_clients(3)
    with relay.client() as fourth:  # told why (an Error frame from the relay), then closed
        header, tlvs = parse_message(fourth.recv())
        assert (header.relay_domain, tlvs[0][0]) == (Domain.SYSTEM, logic.TLV_ERROR)
        assert b"--max-connections 3" in tlvs[0][1]
        with pytest.raises(EOFError):
            fourth.recv()
    relay.wait_for(lambda: relay.stats().connections_rejected == 1)
    assert relay.stats().connections_active == 3
    assert any(re.search(r"\b3\b", m) for m in relay_warnings(caplog))  # names the limit
    first.close()
    relay.wait_for(lambda: relay.stats().connections_active == 2)
    newcomer = relay.client()
    relay.wait_for(lambda: relay.stats().connections_active == 3)
    frame = make_frame(1, source=2)
    second.send(frame)
    assert newcomer.recv() == frame
    assert third.recv() == frame
    reply = make_frame(1, source=5)
    newcomer.send(reply)
    assert second.recv() == reply
    assert relay.stats().connections_rejected == 1


@pytest.mark.parametrize("how", ["close_with_unread_data", "reset_with_so_linger_0",
                                 "close_in_the_middle_of_a_frame"])
def test_vanished_client_is_cleaned_up_quietly_and_the_others_are_unaffected(start_relay,
                                                                             caplog, how):
    caplog.set_level(logging.INFO, logger="relay")
    relay = start_relay()
    consumer = relay.client()
    publisher = relay.client(publish_only=True)
    leaver = connect_raw(relay.path)
    relay.wait_clients(3)
    wait_in(relay, 1)
    if how == "close_in_the_middle_of_a_frame":
        leaver.sendall(make_frame(1, source=9)[:40])
        relay.wait_for(lambda: relay.stats().bytes_in >= 40 + len(subscribe_message(2)))
    else:
        # Enough that the leaver's socket buffer is full and the relay still holds more.
        frames = [make_frame(seq) for seq in range(1, 8001)]
        publisher.send_many(frames)
        assert recv_n(consumer, len(frames)) == frames
        if how == "reset_with_so_linger_0":
            leaver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    caplog.clear()
    leaver.close()
    relay.wait_for(lambda: relay.stats().connections_active == 2)
    sentinel = make_frame(9999)
    publisher.send(sentinel)
    assert consumer.recv() == sentinel  # and nothing of the leaver's half frame
    assert relay_warnings(caplog, logging.INFO) == []
    stats = relay.stats()
    assert stats.protocol_errors == stats.messages_dropped == stats.slow_disconnects == 0


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_out_of_file_descriptors_refuses_new_clients_without_spinning(cli, socket_path):
    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))

    process = cli("--socket", socket_path, "--log-level", "error",
                  preexec_fn=few_descriptors)
    wait_for_socket(socket_path)
    clients = [RelayClient(socket_path, timeout=TIMEOUT_S) for _ in range(40)]
    try:
        time.sleep(0.3)  # let the relay hit EMFILE (nothing to wait on in another process)
        before = cpu_ticks(process.pid)
        time.sleep(1.0)
        used = cpu_ticks(process.pid) - before
        ticks_per_s = os.sysconf("SC_CLK_TCK")
        assert used < ticks_per_s // 2, f"relay used {used} ticks of CPU in 1 s: spinning"
        assert process.poll() is None
        # The clients it could take are served: the first one reaches some others.
        clients[0].send(make_frame(1))
        reached = refused = 0
        for client in clients[1:]:
            try:
                client.recv(timeout=0.05)
                reached += 1
            except TimeoutError:
                pass  # still waiting in the listen backlog
            except (EOFError, ConnectionError):
                refused += 1  # accepted with the spare descriptor and closed at once
        assert reached >= 5
        assert refused >= 1
    finally:
        for client in clients:
            client.close()


# ---------------------------------------------------------------------------------------
# Shutdown and stats
# ---------------------------------------------------------------------------------------


def test_shutdown_from_another_thread_drains_pending_data_and_the_stats_agree(start_relay,
                                                                              caplog,
                                                                              socket_path):
    caplog.set_level(logging.INFO, logger="relay")
    relay = start_relay(queue_limit=100_000, drain_timeout=3.0)
    consumer = relay.client()
    publisher = relay.client(publish_only=True)
    relay.wait_clients(2)
    wait_in(relay, 1)
    total = 20_000
    frames = [make_frame(seq) for seq in range(1, total + 1)]
    publisher.send_many(frames)  # 1.28 MB: most of it waits in the relay's queue
    wait_in(relay, total + 1)
    relay.relay.shutdown()  # from this thread, not the relay's
    received = read_until_closed(consumer)
    relay.thread.join(TIMEOUT_S)
    assert not relay.thread.is_alive(), "serve_forever did not return"
    assert received == frames
    assert not os.path.lexists(socket_path)
    with pytest.raises(ConnectionError):
        RelayClient(socket_path, timeout=TIMEOUT_S)
    stats = relay.stats()
    control = len(subscribe_message(2))
    assert stats.messages_in == total + 1
    assert stats.bytes_in == 64 * total + control
    assert stats.messages_out == total
    assert stats.bytes_out == 64 * total
    assert (stats.connections_total, stats.connections_active,
            stats.connections_rejected) == (2, 0, 0)
    assert stats.messages_dropped == stats.protocol_errors == 0
    final = [r.getMessage() for r in caplog.records if r.name == "relay"][-1]
    assert "stats" in final and str(total + 1) in final  # the final stats are logged


def test_shutdown_gives_up_on_a_consumer_that_does_not_read_after_drain_timeout(start_relay):
    relay = start_relay(queue_limit=100_000, drain_timeout=1.0)
    consumer = relay.client()
    idle = relay.client()
    publisher = relay.client(publish_only=True)
    relay.wait_clients(3)
    wait_in(relay, 1)
    total = 10_000
    frames = [make_frame(seq) for seq in range(1, total + 1)]
    publisher.send_many(frames)
    wait_in(relay, total + 1)
    relay.relay.shutdown()
    assert read_until_closed(consumer) == frames
    relay.thread.join(TIMEOUT_S)
    assert not relay.thread.is_alive(), "serve_forever did not return"
    got = [sequence_of(frame) for frame in read_until_closed(idle)]
    assert got == list(range(1, len(got) + 1)) and len(got) < total


def counted_select(relay: Relay) -> list[float]:
    """Record the time of every selector.select call the relay's loop makes."""
    calls: list[float] = []
    select = relay.selector.select

    def counting(timeout: float | None = None) -> list[Any]:
        calls.append(time.monotonic())
        return select(timeout)

    relay.selector.select = counting  # type: ignore[method-assign]
    return calls


def test_shutdown_drains_without_spinning_the_loop(socket_path):
    relay = Relay(MarketDataLogic(), socket_path=socket_path, stats_interval=0,
                  queue_limit=100_000, drain_timeout=0.5)
    calls = counted_select(relay)
    running = RunningRelay(relay)
    try:
        idle = running.client()  # never reads: its queue cannot drain
        publisher = running.client(publish_only=True)
        running.wait_clients(2)
        wait_in(running, 1)
        batch = b"".join(make_frame(seq) for seq in range(1, 1001))

        def stream() -> None:  # keep the loop busy (busy polling) until the relay stops
            with contextlib.suppress(OSError):
                while not relay.stopped.is_set():
                    publisher.send(batch)

        streaming = threading.Thread(target=stream)
        streaming.start()
        wait_in(running, 5001)
        stopping = time.monotonic()
        relay.shutdown()
        assert relay.stopped.wait(TIMEOUT_S)
        streaming.join(TIMEOUT_S)
        during_drain = [t for t in calls if t >= stopping]
        assert len(during_drain) < 1000, f"{len(during_drain)} select calls while draining"
        idle.close()
        publisher.close()
    finally:
        running.stop()


def test_a_paused_relay_sleeps_while_a_slow_consumer_keeps_making_progress(socket_path):
    """Backpressure for longer than stall_timeout, with a consumer that keeps reading a
    little: nobody is disconnected, and the loop waits instead of spinning."""
    # One pause lasts well over stall_timeout: from 1000 queued frames down to the low
    # water mark (250) at ~400 frames/s. The consumer makes write progress every
    # ~0.1 s (it must drain ~160 KB of its socket before the relay may write again).
    relay = Relay(ExecutionLogic(), socket_path=socket_path, stats_interval=0,
                  queue_limit=1000, stall_timeout=0.5, busy_poll=0)
    calls = counted_select(relay)
    running = RunningRelay(relay)
    try:
        consumer = running.client()
        publisher = running.client(publish_only=True)
        running.wait_clients(2)
        wait_in(running, 1)
        total = 3000
        frames = [make_frame(seq, domain=Domain.EXECUTION, size=4000) for seq in range(1, 301)]
        sender = threading.Thread(target=lambda: [publisher.send(f) for f in frames * 10])
        sender.start()
        running.wait_for(lambda: relay.stats().backpressure_pauses >= 1)
        started = len(calls)
        received = []
        for _ in range(20):  # ~1 s, well past stall_timeout, still paused
            received += recv_n(consumer, 20)
            time.sleep(0.05)
        assert relay.paused, "the pause should outlast this slow reading"
        assert len(calls) - started < 2000, f"{len(calls) - started} select calls in ~1 s"
        while len(received) < total:
            received.append(consumer.recv())
        sender.join(TIMEOUT_S)
        assert received == frames * 10
        assert relay.stats().slow_disconnects == 0
    finally:
        running.stop()


def test_stats_line_is_logged_every_stats_interval_with_rates(start_relay, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    relay = start_relay(stats_interval=0.2)
    _exchange_works(relay)
    relay.wait_for(lambda: any("stats" in m and "/s" in m
                               for m in relay_warnings(caplog, logging.INFO)))


def test_cli_relay_logs_stats_on_sigusr1_and_stops_cleanly_on_sigterm(cli, socket_path,
                                                                      socket_dir):
    log_path = os.path.join(socket_dir, "relay.log")
    with open(log_path, "w") as log_file:
        process = cli("--socket", socket_path, "--stats-interval", "0", stderr=log_file)
    wait_for_socket(socket_path)

    def stats_lines() -> list[str]:
        with open(log_path) as file:
            return [line for line in file if "stats" in line and "final" not in line]

    process.send_signal(signal.SIGUSR1)
    wait_until(lambda: bool(stats_lines()), "a stats line after SIGUSR1")
    with RelayClient(socket_path, timeout=TIMEOUT_S) as a, \
            RelayClient(socket_path, timeout=TIMEOUT_S) as b:
        # A relay in another process has no stats to wait on: send until b is registered.
        for seq in range(1, 51):
            a.send(make_frame(seq))
            try:
                assert sequence_of(b.recv(timeout=SHORT_S)) <= seq
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("b never received a frame from a")
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=TIMEOUT_S)
        with pytest.raises(EOFError):
            b.recv()
    assert process.returncode == 0
    assert not os.path.lexists(socket_path)


def test_cli_exits_1_with_a_one_line_reason_when_another_relay_listens(start_relay, cli,
                                                                       socket_path):
    relay = start_relay()
    process = cli("--socket", socket_path)
    _, stderr = process.communicate(timeout=TIMEOUT_S * 2)
    assert process.returncode == 1
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "another relay" in errors[0]
    _exchange_works(relay)


def test_cli_send_and_tail_carry_messages_numbered_from_1(start_relay, cli, socket_path):
    relay = start_relay()
    tail = cli("--socket", socket_path, "tail", "--count", "3")
    relay.wait_clients(1)
    wait_in(relay, 1)  # tail's RELAY_SUBSCRIBE (gap notices) is in force
    send = cli("--socket", socket_path, "send", "--count", "3")
    send_out, _ = send.communicate(timeout=TIMEOUT_S * 2)
    tail_out, _ = tail.communicate(timeout=TIMEOUT_S * 2)
    assert send.returncode == 0 and tail.returncode == 0
    lines = tail_out.splitlines()
    assert len(lines) == 3
    for seq, line in enumerate(lines, 1):
        assert f"seq={seq}" in line


def test_cli_usage_error_exits_2(cli, socket_path):
    process = cli("--socket", socket_path, "--queue-limit", "0")
    _, stderr = process.communicate(timeout=TIMEOUT_S * 2)
    assert process.returncode == 2
    assert "--queue-limit" in stderr
    assert not os.path.lexists(socket_path)


# ---------------------------------------------------------------------------------------
# RelayClient
# ---------------------------------------------------------------------------------------


def test_recv_returns_exactly_one_whole_frame_even_when_several_arrive_together(start_relay):
    relay = start_relay()
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    frames = [make_frame(1, size=40), make_frame(2, size=1000), make_frame(3, size=64)]
    publisher.send_many(frames)  # one write, one chunk, one recv on the consumer
    relay.wait_for(lambda: relay.stats().messages_out == 3)
    assert [consumer.recv() for _ in frames] == frames


def test_send_many_sends_every_message_in_order(start_relay):
    relay = start_relay()
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    frames = [make_frame(seq, size=34 + seq) for seq in range(1, 101)]
    publisher.send_many(iter(frames))  # any iterable
    assert recv_n(consumer, 100) == frames


def test_recv_raises_timeout_error_when_nothing_arrives_and_stays_usable(start_relay):
    relay = start_relay()
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    with pytest.raises(TimeoutError):
        consumer.recv(timeout=0.05)
    frame = make_frame(1)
    publisher.send(frame)
    assert consumer.recv() == frame


def test_recv_raises_eof_error_when_the_relay_closes_and_iteration_stops(start_relay):
    relay = start_relay()
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    frames = [make_frame(seq) for seq in range(1, 4)]
    publisher.send_many(frames)
    relay.wait_for(lambda: relay.stats().messages_out == 3)
    relay.stop()
    assert list(consumer) == frames  # the frames already sent, then the loop ends
    with pytest.raises(EOFError):
        consumer.recv()
    with pytest.raises(EOFError):
        publisher.recv()


def test_client_fileno_works_in_a_selector(start_relay):
    relay = start_relay()
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    with selectors.DefaultSelector() as selector:
        selector.register(consumer, selectors.EVENT_READ)
        assert selector.select(timeout=0.05) == []
        frame = make_frame(1)
        publisher.send(frame)
        events = selector.select(timeout=TIMEOUT_S)
        assert [key.fileobj for key, _ in events] == [consumer]
        assert consumer.recv() == frame


def test_recv_with_a_zero_timeout_returns_a_frame_already_waiting(start_relay):
    relay = start_relay()
    consumer = relay.client()
    publisher = relay.client()
    relay.wait_clients(2)
    frame = make_frame(1)
    publisher.send(frame)
    with selectors.DefaultSelector() as selector:
        selector.register(consumer, selectors.EVENT_READ)
        assert selector.select(timeout=TIMEOUT_S)
    # The selector said readable: a poll (timeout 0) must return it, not time out.
    assert consumer.recv(timeout=0) == frame
    with pytest.raises(TimeoutError):
        consumer.recv(timeout=0)


def test_send_keeps_the_client_timeout_after_a_recv_with_a_short_timeout(start_relay):
    # The relay pauses its publishers (backpressure) until the stuck consumer is cut
    # after stall_timeout: a send must wait that long under the client's 5 s timeout,
    # whatever timeout the last recv was given.
    relay = start_relay(ExecutionLogic(), queue_limit=100, stall_timeout=0.5,
                        drain_timeout=0.1)
    stuck = relay.client()
    publisher = relay.client(timeout=TIMEOUT_S)
    relay.wait_clients(2)
    with pytest.raises(TimeoutError):
        publisher.recv(timeout=0.01)
    frames = [make_frame(seq, domain=Domain.EXECUTION) for seq in range(1, 20_001)]
    publisher.send_many(frames)  # ~1.3 MB: blocks until the relay resumes
    relay.wait_for(lambda: relay.stats().slow_disconnects == 1)
    stuck.close()


@pytest.mark.parametrize("where", ["missing_path", "stale_socket"])
def test_connecting_where_no_relay_listens_says_so_and_how_to_start_one(socket_path, where):
    if where == "stale_socket":
        leave_stale_socket(socket_path)
    with pytest.raises(ConnectionError) as error:
        RelayClient(socket_path, timeout=TIMEOUT_S)
    message = str(error.value)
    assert "no relay is listening" in message
    assert socket_path in message
    assert "python relay.py" in message


def test_recv_timeout_keeps_a_partly_received_frame(fake_relay, socket_path):
    with RelayClient(socket_path, timeout=TIMEOUT_S) as client:
        conn = fake_relay.accept()
        with conn:
            conn.settimeout(TIMEOUT_S)
            frame = make_frame(1, size=100)
            conn.sendall(frame[:50])
            with pytest.raises(TimeoutError):
                client.recv(timeout=0.1)
            conn.sendall(frame[50:])
            assert client.recv() == frame


def test_recv_raises_connection_error_when_the_relay_goes_away_mid_frame(fake_relay,
                                                                        socket_path):
    with RelayClient(socket_path, timeout=TIMEOUT_S) as client:
        conn = fake_relay.accept()
        whole = make_frame(1)
        conn.sendall(whole + make_frame(2)[:40])
        conn.close()
        assert client.recv() == whole
        with pytest.raises(ConnectionError, match="middle of a frame"):
            client.recv()
