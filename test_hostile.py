"""The hostile world (issue #6): bad input, vanishing and slow clients, 1000 connections,
signals and file permissions.

Everything runs over real Unix sockets. Where the command line, signals, memory, file
descriptors or rlimits are the subject, the relay is a real ``python relay.py`` process:
its counters are read from the stats line it logs on SIGUSR1 (and the "final stats" line
on SIGTERM), its memory, descriptors and CPU time from ``/proc/<pid>``. Every test
asserts what the *other* clients still get, and what the counters and logs say.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import resource
import signal
import socket
import stat
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import (
    PRICE,
    TIMEOUT_S,
    TS,
    RelayProcess,
    RunningRelay,
    connect_raw,
    domain_of,
    gap_of,
    leave_stale_socket,
    sequence_of,
    source_of,
    trade_message,
    wait_until,
)
from logic import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    SUBSCRIBE_NONE,
    VERSION,
    Domain,
    ExecutionLogic,
    MarketDataLogic,
    SignalLogic,
    build_message,
    order_request,
    signal_identity,
    subscribe_message,
)
from relay import RelayClient

PAIR_SOURCE = 77  # the source id of every Pair publisher: its consumer ignores others
MiB = 1024 * 1024

# ---------------------------------------------------------------------------------------
# Messages and frames
# ---------------------------------------------------------------------------------------


def domain_message(domain: str, sequence: int, *, source: int = PAIR_SOURCE,
                   pad: int = 0, relay_domain: int | None = None) -> bytes:
    """A valid message of ``domain`` numbered ``sequence``; ``pad`` adds a TLV of that
    many bytes (of a type the domain accepts) to make it larger; ``relay_domain``
    overrides the header's domain byte (a message the relay should filter)."""
    number: int
    if domain == "signal":
        tlvs = [signal_identity(sequence, 20)]
        pad_type, number = 32, Domain.SIGNAL
    elif domain == "execution":
        tlvs = [order_request(sequence, 0x1234, PRICE, 100, sequence % 2)]
        pad_type, number = 79, Domain.EXECUTION
    else:
        return trade_message(sequence, source=source, price=PRICE + sequence,
                             side=sequence % 2, pad=pad,
                             relay_domain=Domain.MARKET_DATA if relay_domain is None
                             else relay_domain)
    if pad:
        tlvs.append((pad_type, bytes(pad)))
    if relay_domain is not None:
        number = relay_domain
    return build_message(number, source, tlvs, sequence=sequence, timestamp_ns=TS,
                         checksum=True)


def closed_by_relay(sock: socket.socket, timeout: float = TIMEOUT_S) -> bool:
    """True if the relay closes ``sock`` within ``timeout`` (data before EOF is skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


@contextlib.contextmanager
def relay_stopped(relay: RelayProcess) -> Iterator[None]:
    """Stop the relay process (SIGSTOP, as a busy host would) for the ``with`` body, so
    what the body does reaches it as one batch of events when it runs again."""
    os.kill(relay.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: relay.state() == "T", "the relay to stop")
        yield
    finally:
        os.kill(relay.pid, signal.SIGCONT)


# ---------------------------------------------------------------------------------------
# A publisher -> consumer pair that must never lose a message
# ---------------------------------------------------------------------------------------


class Pair:
    """A publisher and a consumer streaming numbered messages through a relay.

    The publisher stays at most ``window`` messages ahead of what the consumer has
    read, so a healthy relay never has a reason to drop one: any loss, duplicate or
    reordering is the relay's. The consumer ignores frames from other sources, so other
    clients may publish alongside. ``finish()`` stops the stream and asserts it arrived
    whole; it returns how many messages were sent.
    """

    def __init__(self, path: str, domain: str = "market_data", *, count: int | None = None,
                 window: int = 2000, batch: int = 100, pad: int = 0) -> None:
        self.path = path
        self.domain = domain
        self.count = count
        self.window = window
        self.batch = batch
        self.pad = pad
        self.sent = 0
        self.received = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.publishing_done = False
        self.consumer: RelayClient | None = None
        self.publisher: RelayClient | None = None
        self.threads: list[threading.Thread] = []

    def message(self, sequence: int) -> bytes:
        return domain_message(self.domain, sequence, pad=self.pad)

    def start(self) -> Pair:
        self.consumer = RelayClient(self.path, timeout=TIMEOUT_S)
        self.publisher = RelayClient(self.path, publish_only=True, timeout=TIMEOUT_S)
        # Hello (sequence 0) until the consumer sees one: from then on both are served.
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            self.publisher.send(self.message(0))
            try:
                while True:
                    frame = self.consumer.recv(timeout=0.1)
                    if source_of(frame) == PAIR_SOURCE and sequence_of(frame) == 0:
                        break
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise AssertionError("the pair's consumer never got the publisher's "
                                         "hello") from None
        self.threads = [threading.Thread(target=self._publish, daemon=True),
                        threading.Thread(target=self._consume, daemon=True)]
        for thread in self.threads:
            thread.start()
        return self

    def wait_received(self, n: int) -> None:
        wait_until(lambda: self.received >= n or bool(self.errors),
                   f"the pair to deliver {n} messages", timeout=TIMEOUT_S * 2)
        assert not self.errors, self.errors

    def _publish(self) -> None:
        assert self.publisher is not None
        sequence = 0
        try:
            while not self.stop.is_set() and (self.count is None or sequence < self.count):
                deadline = time.monotonic() + TIMEOUT_S
                while sequence - self.received >= self.window:
                    if self.stop.is_set() or self.errors:
                        return
                    if time.monotonic() > deadline:
                        self.errors.append(f"consumer stuck at {self.received} of "
                                           f"{sequence} for {TIMEOUT_S} s")
                        return
                    time.sleep(0.0005)
                n = self.batch if self.count is None else min(self.batch,
                                                              self.count - sequence)
                self.publisher.send_many(self.message(s)
                                         for s in range(sequence + 1, sequence + n + 1))
                sequence += n
                self.sent = sequence
        except Exception as exc:  # reported by finish()
            self.errors.append(f"publisher: {exc!r}")
        finally:
            self.publishing_done = True

    def _consume(self) -> None:
        assert self.consumer is not None
        last_progress = time.monotonic()
        try:
            while not (self.publishing_done and self.received >= self.sent):
                if self.errors:
                    return
                try:
                    frame = self.consumer.recv(timeout=0.1)
                except TimeoutError:
                    if time.monotonic() - last_progress > TIMEOUT_S:
                        self.errors.append(f"consumer: nothing for {TIMEOUT_S} s after "
                                           f"{self.received} of {self.sent} messages")
                        return
                    continue
                if source_of(frame) != PAIR_SOURCE or domain_of(frame) == Domain.SYSTEM:
                    continue  # another client's message
                sequence = sequence_of(frame)
                if sequence == 0:
                    continue  # a late hello
                if sequence != self.received + 1:
                    self.errors.append(f"consumer: expected message {self.received + 1}, "
                                       f"got {sequence} (lost, duplicated or reordered)")
                    return
                self.received = sequence
                last_progress = time.monotonic()
        except Exception as exc:  # reported by finish()
            self.errors.append(f"consumer: {exc!r}")

    def finish(self) -> int:
        """Stop publishing (after ``count`` messages if given), let the consumer catch
        up, assert nothing was lost."""
        if self.count is not None:
            self.threads[0].join(TIMEOUT_S * 3)
        self.stop.set()
        for thread in self.threads:
            thread.join(TIMEOUT_S * 3)
        self.close()
        assert not any(t.is_alive() for t in self.threads), "the pair did not stop"
        assert not self.errors, self.errors
        assert self.received == self.sent, f"received {self.received} of {self.sent}"
        return self.sent

    def close(self) -> None:
        for client in (self.consumer, self.publisher):
            if client is not None:
                client.close()


# ---------------------------------------------------------------------------------------
# Seeded fuzz: random blobs and valid streams cut anywhere
# ---------------------------------------------------------------------------------------


def random_frame(rng: random.Random, domain: int, sequence: int, big: bool = False) -> bytes:
    """A well-framed message of ``domain`` with vendor TLVs (never a control frame)."""
    tlvs = [(rng.randint(200, 254), rng.randbytes(rng.randint(0, 255)))
            for _ in range(rng.randint(0, 3))]
    if big:
        tlvs.append((200, rng.randbytes(rng.randint(4096, 60_000))))  # fits 64 KiB
    return build_message(domain, rng.randint(1, 5), tlvs, sequence=sequence,
                         timestamp_ns=TS)


def predict(stream: bytes, domain: int, max_size: int) -> tuple[list[bytes], int,
                                                                  tuple[int, str] | None]:
    """What SPEC says a relay of ``domain`` does with the bytes one client sent:
    ``(frames forwarded, frames filtered, (offset, bad value) of a framing error)``."""
    forwarded: list[bytes] = []
    filtered = 0
    pos = 0
    while len(stream) - pos >= HEADER_SIZE:
        magic, frame_domain, version, *_, payload_size, _ = HEADER.unpack_from(stream, pos)
        if magic != MAGIC:
            return forwarded, filtered, (pos, f"0x{magic:08x}")
        if version != VERSION:
            return forwarded, filtered, (pos, f"version {version}")
        if HEADER_SIZE + payload_size > max_size:
            return forwarded, filtered, (pos, f"payload_size {payload_size}")
        end = pos + HEADER_SIZE + payload_size
        if end > len(stream):
            break  # still arriving when the client left
        if frame_domain == domain:
            forwarded.append(stream[pos:end])
        else:
            filtered += 1
        pos = end
    return forwarded, filtered, None


def random_blob(rng: random.Random, next_sequence: Callable[[], int]) -> bytes:
    """Hostile bytes: noise, a bad version, a huge size, or valid frames followed by
    garbage or by a frame cut short."""
    kind = rng.choice(("noise", "version", "size", "then_noise", "then_zeros", "truncated"))
    domains = (1, 1, 1, 2, 3, 4)
    if kind == "noise":
        return rng.randbytes(rng.randint(1, 2048))
    if kind == "version":
        version = rng.choice([v for v in range(256) if v != VERSION])
        return struct.pack("<IBB", MAGIC, 1, version) + rng.randbytes(rng.randint(26, 200))
    if kind == "size":
        size = rng.randint(65_536 - HEADER_SIZE + 1, 0xFFFFFFFF)
        header = HEADER.pack(MAGIC, 1, VERSION, 1, 0, 1, TS, size, 0)
        return header + rng.randbytes(rng.randint(0, 512))
    frames = b"".join(random_frame(rng, rng.choice(domains), next_sequence())
                      for _ in range(rng.randint(1, 5)))
    if kind == "then_noise":
        return frames + rng.randbytes(rng.randint(HEADER_SIZE, 512))
    if kind == "then_zeros":
        return frames + bytes(rng.randint(HEADER_SIZE, 128))
    last = random_frame(rng, 1, next_sequence())
    return frames + last[:rng.randint(1, len(last) - 1)]


def cut(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` in random-sized pieces: single bytes, header-sized, large."""
    pieces = []
    pos = 0
    while pos < len(data):
        top = rng.choice((7, 40, 600, 20_000, 70_000))
        size = rng.randint(1, top)
        pieces.append(data[pos:pos + size])
        pos += size
    return pieces


class FrameCollector(threading.Thread):
    """A consumer thread that keeps every frame until it has ``expected`` of them."""

    def __init__(self, path: str, expected: int) -> None:
        super().__init__(daemon=True)
        self.client = RelayClient(path, gap_notices=True, timeout=TIMEOUT_S)
        self.expected = expected
        self.frames: list[bytes] = []
        self.gaps: list[tuple[int, int]] = []
        self.error: str | None = None

    def run(self) -> None:
        try:
            while len(self.frames) < self.expected:
                frame = self.client.recv(timeout=TIMEOUT_S)
                gap = gap_of(frame)
                if gap is not None:
                    self.gaps.append(gap)
                else:
                    self.frames.append(frame)
        except Exception as exc:
            self.error = f"after {len(self.frames)} of {self.expected} frames: {exc!r}"
        finally:
            self.client.close()


def test_seeded_fuzz_never_harms_the_relay_and_valid_streams_arrive_intact(
        start_relay: Callable[..., RunningRelay], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relay")
    rng = random.Random(20_240_601)
    relay = start_relay(MarketDataLogic())
    max_size = MarketDataLogic.max_message_size
    counter = iter(range(1_000_000, 2_000_000))

    # 500 blobs, one connection each, and what SPEC says happens to each.
    blobs = [random_blob(rng, lambda: next(counter)) for _ in range(500)]
    predictions = [predict(blob, Domain.MARKET_DATA, max_size) for blob in blobs]
    # 500 valid streams (a publish-only subscription, then frames), cut anywhere.
    streams: list[tuple[bytes, list[bytes]]] = []
    for stream_id in range(500):
        frames = [random_frame(rng, 1, stream_id * 100 + i, big=rng.random() < 0.03)
                  for i in range(rng.randint(1, 16))]
        streams.append((subscribe_message(SUBSCRIBE_NONE) + b"".join(frames), frames))

    expected = [f for forwarded, _, _ in predictions for f in forwarded]
    expected += [f for _, frames in streams for f in frames]
    collector = FrameCollector(relay.path, len(expected))
    relay.wait_clients(1)
    collector.start()  # client 1; blob i is client 2 + i (accepted in connect order)

    # One blob at a time: each is read (or its client closed) before the next connects,
    # so no blob client is ever written to after it left (see the test of that below).
    kept_open = []
    for index, (blob, (_, _, error)) in enumerate(zip(blobs, predictions, strict=True)):
        bytes_before = relay.stats().bytes_in
        with connect_raw(relay.path) as sock:
            try:
                sock.sendall(blob)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the relay may close us before the tail is written
            if error is None:
                wanted = bytes_before + len(blob)
                wait_until(lambda: relay.stats().bytes_in >= wanted,  # noqa: B023 (called now)
                           f"the relay to read blob {index}", poll_s=0.001)
            elif not closed_by_relay(sock):
                kept_open.append(index)

    # 20 streams at a time, their pieces interleaved. A finished stream's client stays
    # connected until the end: one that leaves at once may lose what it sent (see
    # test_messages_a_client_sent_just_before_leaving_...), which is not this test's point.
    relay.wait_clients(1 + len(blobs))
    open_streams: list[tuple[socket.socket, list[bytes]]] = []
    finished: list[socket.socket] = []
    waiting = list(streams)
    sends = 0
    try:
        while waiting or open_streams:
            while waiting and len(open_streams) < 20:
                stream, _ = waiting.pop(0)
                open_streams.append((connect_raw(relay.path), cut(rng, stream)))
            index = rng.randrange(len(open_streams))
            sock, pieces = open_streams[index]
            sock.sendall(pieces.pop(0))
            sends += 1
            if sends % 50 == 0:
                time.sleep(0.001)  # let the relay read a partial frame now and then
            if not pieces:
                finished.append(sock)
                open_streams.pop(index)
        collector.join(TIMEOUT_S * 4)
    finally:
        for sock in finished + [sock for sock, _ in open_streams]:
            sock.close()
    assert relay.thread.is_alive(), "the relay stopped"
    assert collector.error is None, collector.error
    assert not kept_open, f"blobs {kept_open[:10]} broke framing but their client stayed open"

    # Every valid frame arrived byte-identical, and in order per publisher.
    by_sequence = {sequence_of(f): f for f in expected}
    assert len(by_sequence) == len(expected)
    received_sequences = [sequence_of(f) for f in collector.frames]
    assert sorted(received_sequences) == sorted(by_sequence), "frames lost or duplicated"
    assert all(by_sequence[sequence_of(f)] == f for f in collector.frames), "a frame changed"
    publisher_of = {sequence_of(f): ("blob", i)
                    for i, (forwarded, _, _) in enumerate(predictions) for f in forwarded}
    publisher_of.update({sequence_of(f): ("stream", i)
                         for i, (_, frames) in enumerate(streams) for f in frames})
    per_publisher: dict[tuple[str, int], list[int]] = defaultdict(list)
    for sequence in received_sequences:
        per_publisher[publisher_of[sequence]].append(sequence)
    assert all(s == sorted(s) for s in per_publisher.values()), "a publisher's order changed"
    assert collector.gaps == [], "the consumer lost messages to overflow"

    # Counters and logs: one protocol error per broken blob, with id, offset and value.
    errors = [(2 + i, p[2]) for i, p in enumerate(predictions) if p[2] is not None]
    relay.wait_for(lambda: relay.stats().connections_active == 0)
    stats = relay.stats()
    assert stats.protocol_errors == len(errors)
    assert stats.messages_filtered == sum(filtered for _, filtered, _ in predictions)
    logged = "\n".join(caplog.messages)
    for client_id, (offset, value) in errors:
        pattern = (rf"client {client_id} \(pid \d+ [^)]+\): [^\n]*{re.escape(value)}[^\n]* "
                   rf"at offset {offset}, closing")
        assert re.search(pattern, logged), f"no log line like {pattern!r}"

    # And it still serves.
    assert Pair(relay.path, count=500).start().finish() == 500


@pytest.mark.parametrize("logic", [SignalLogic(), ExecutionLogic()], ids=lambda lg: lg.name)
def test_frames_failing_checksum_or_tlv_policy_are_dropped_and_counted_and_the_client_stays(
        start_relay: Callable[..., RunningRelay], logic: Any) -> None:
    rng = random.Random(7)
    relay = start_relay(logic)
    name = logic.name
    kinds = ("valid", "bad_checksum", "zero_checksum", "tlv_type", "tlv_length",
             "other_domain")
    stream: list[bytes] = []
    wanted: list[bytes] = []
    invalid = filtered = 0
    for sequence in range(1, 301):
        kind = rng.choice(kinds)
        good = domain_message(name, sequence, source=9)
        if kind == "valid":
            frame = good
        elif kind == "bad_checksum":
            frame = good[:-1] + bytes([good[-1] ^ 0x5A])
        elif kind == "zero_checksum":
            frame = good[:28] + bytes(4) + good[32:]
        elif kind == "tlv_type":
            frame = build_message(logic.domain, 9, [(rng.choice((1, 19, 80, 200)), b"x" * 8)],
                                  sequence=sequence, checksum=True)
        elif kind == "tlv_length":  # a TLV that claims more bytes than the payload has
            payload = bytes([20 if name == "signal" else 40, 200]) + bytes(10)
            frame = HEADER.pack(MAGIC, logic.domain, VERSION, 9, 0, sequence, TS,
                                len(payload), 0) + payload
        else:  # passes the checksum and TLV policies, but belongs to another domain
            frame = domain_message(name, sequence, source=9, relay_domain=Domain.MARKET_DATA)
        ok_checksum = kind != "bad_checksum" and (kind != "zero_checksum" or name == "signal")
        if kind == "other_domain":
            filtered += 1
        elif kind in ("tlv_type", "tlv_length") or not ok_checksum:
            invalid += 1
        else:
            wanted.append(frame)
        stream.append(frame)

    with relay.client() as consumer, relay.client(publish_only=True) as publisher:
        relay.wait_clients(2)
        for piece in cut(rng, b"".join(stream)):
            publisher.send(piece)
        got = [consumer.recv() for _ in wanted]
        assert got == wanted
        last = domain_message(name, 999, source=9)
        publisher.send(last)  # the publisher is still connected and heard
        assert consumer.recv() == last
    stats = relay.stats()
    assert (stats.messages_invalid, stats.messages_filtered, stats.protocol_errors) == (
        invalid, filtered, 0)


# ---------------------------------------------------------------------------------------
# Oversized headers, slowloris, churn
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["market_data", "execution"])
def test_header_claiming_4_gib_closes_that_client_at_once_without_growing_memory(
        relay_process: Callable[..., RelayProcess], domain: str) -> None:
    relay = relay_process(domain=domain)
    pair = Pair(relay.path, domain, count=1000).start()
    pair.wait_received(1)
    number = {"market_data": 1, "execution": 3}[domain]
    header = HEADER.pack(MAGIC, number, VERSION, 1, 0, 1, TS, 0xFFFFFFF0, 0)
    rss_before = relay.rss_bytes()
    for split in (32, 32, 24, 5):  # whole (twice), then arriving in two pieces
        with connect_raw(relay.path) as sock:
            sock.sendall(header[:split])
            if split < HEADER_SIZE:
                time.sleep(0.05)
                sock.sendall(header[split:])
            try:
                sock.sendall(bytes(64 * 1024))  # the start of the "payload"
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert closed_by_relay(sock, timeout=2.0), "the relay kept a 4 GiB frame open"
    rss_after = relay.rss_bytes()
    assert pair.finish() == 1000
    assert rss_after - rss_before < 4 * MiB, (rss_before, rss_after)
    stats = relay.terminate()
    assert stats["protocol_errors"] == 4
    lines = re.findall(r"client \d+ \(pid \d+ [^)]+\): payload_size 4294967280 [^\n]* at "
                       r"offset 0, closing",
                       relay.log())
    assert len(lines) == 4, relay.log()


def test_slowloris_clients_with_half_a_header_never_hold_up_a_flowing_pair(
        start_relay: Callable[..., RunningRelay]) -> None:
    relay = start_relay(MarketDataLogic())
    lorises = []
    frames = [domain_message("market_data", 500_000 + i, source=5) for i in range(200)]
    try:
        for frame in frames:
            sock = connect_raw(relay.path)
            lorises.append(sock)
            sock.sendall(frame[:16])  # half a header, then silence
        relay.wait_for(lambda: relay.stats().connections_active == 200)
        assert Pair(relay.path, count=20_000).start().finish() == 20_000
        relay.wait_for(lambda: relay.stats().connections_active == 200)

        # Each half frame was kept apart: completed now, each arrives whole.
        with relay.client() as consumer:
            relay.wait_clients(203)
            for sock, frame in zip(lorises, frames, strict=True):
                sock.sendall(frame[16:])
            got = sorted(consumer.recv() for _ in frames)
        assert got == sorted(frames)
    finally:
        for sock in lorises:
            sock.close()
    assert relay.stats().protocol_errors == 0


def churn_once(rng: random.Random, path: str, number: int) -> None:
    """One short-lived client that connects, maybe does something, and leaves."""
    kind = rng.randrange(6)
    with connect_raw(path) as sock:
        if kind == 1:
            sock.sendall(subscribe_message(SUBSCRIBE_NONE))
        elif kind == 2:
            sock.sendall(domain_message("market_data", number, source=3)[:20])
        elif kind == 3:
            sock.sendall(domain_message("market_data", number, source=3))
        elif kind == 4:  # a reset (SO_LINGER on, linger 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif kind == 5:
            sock.setblocking(False)
            try:
                sock.recv(4096)
            except BlockingIOError:
                pass


def test_connect_disconnect_churn_loses_nothing_on_a_live_pair_and_leaks_no_descriptors(
        relay_process: Callable[..., RelayProcess]) -> None:
    relay = relay_process()
    fds_before = relay.fd_count()
    pair = Pair(relay.path).start()
    pair.wait_received(1000)
    rng = random.Random(2000)
    for number in range(2000):
        churn_once(rng, relay.path, number)
    received_during_churn = pair.received
    pair.wait_received(received_during_churn + 1000)  # still flowing after the churn
    sent = pair.finish()
    assert sent > 2000
    stats = relay.wait_stats(lambda s: s["connections_active"] == 0, "every client gone")
    # A burst of connections that are already closed when accepted may be counted
    # against --max-connections and refused: each cycle is accepted or refused.
    assert stats["connections_total"] + stats["connections_rejected"] >= 2000 + 2
    assert stats["protocol_errors"] == 0
    wait_until(lambda: relay.fd_count() == fds_before,
               f"the relay's descriptors back to {fds_before}")


# ---------------------------------------------------------------------------------------
# Consumers that vanish: RST with megabytes pending, EPIPE mid-stream, while descheduled
# ---------------------------------------------------------------------------------------


def test_consumer_reset_with_megabytes_pending_is_dropped_and_others_get_everything(
        relay_process: Callable[..., RelayProcess]) -> None:
    relay = relay_process()
    doomed = connect_raw(relay.path)  # connects and never reads
    with RelayClient(relay.path, timeout=TIMEOUT_S) as consumer, \
            RelayClient(relay.path, publish_only=True, timeout=TIMEOUT_S) as publisher:
        relay.wait_stats(lambda s: s["connections_active"] == 3, "three clients")
        publisher.send_many(domain_message("market_data", s, pad=1000) for s in range(1, 4001))
        assert [sequence_of(consumer.recv()) for _ in range(4000)] == list(range(1, 4001))
        stats = relay.stats()
        pending_for_doomed = 2 * 4000 - stats["messages_out"]
        assert pending_for_doomed * 1000 > 2 * MiB, "the relay should hold megabytes for it"
        assert stats["messages_dropped"] == 0

        doomed.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        doomed.close()
        publisher.send_many(domain_message("market_data", s, pad=1000)
                            for s in range(4001, 8001))
        assert [sequence_of(consumer.recv()) for _ in range(4000)] == list(range(4001, 8001))
        stats = relay.wait_stats(lambda s: s["connections_active"] == 2, "the reset client gone")
    assert (stats["slow_disconnects"], stats["protocol_errors"], stats["messages_dropped"]) == (
        0, 0, 0)
    assert "Traceback" not in relay.log()
    relay.terminate()


def test_consumer_that_shuts_its_socket_mid_stream_is_dropped_on_epipe_and_others_flow(
        relay_process: Callable[..., RelayProcess]) -> None:
    relay = relay_process()
    pair = Pair(relay.path).start()
    leaver = RelayClient(relay.path, timeout=TIMEOUT_S)
    try:
        relay.wait_stats(lambda s: s["connections_active"] == 3, "three clients")
        for _ in range(500):
            leaver.recv()
        leaver.sock.setblocking(False)
        try:
            while leaver.sock.recv(1 << 20):
                pass  # empty its receive queue, so the relay's next write fails at once
        except BlockingIOError:
            pass
        leaver.sock.shutdown(socket.SHUT_RD)  # the relay's writes now fail with EPIPE
        stats = relay.wait_stats(lambda s: s["connections_active"] == 2,
                                 "the relay to drop the client on EPIPE")
        pair.wait_received(pair.received + 2000)
    finally:
        leaver.close()
    assert pair.finish() > 2500
    assert (stats["protocol_errors"], stats["slow_disconnects"]) == (0, 0)
    relay.terminate()


def test_a_consumer_that_caught_up_while_the_relay_was_descheduled_is_not_cut_off(
        relay_process: Callable[..., RelayProcess]) -> None:
    """The relay is stopped (as by a busy host) while a publisher's burst arrives and a
    slow consumer's socket drains: when it runs again, one select() reports both. The
    queue limit counts what still waits *after* the relay tried to write (SPEC), so the
    consumer that caught up is not cut off, and the relay keeps serving everyone. (An
    earlier relay cut it before writing, then crashed on its stale write event.)"""
    relay = relay_process("--queue-limit", "10", domain="signal")
    slow = connect_raw(relay.path)
    with RelayClient(relay.path, timeout=TIMEOUT_S) as fast, \
            RelayClient(relay.path, publish_only=True, timeout=TIMEOUT_S) as publisher:
        relay.wait_stats(lambda s: s["connections_active"] == 3, "three clients")
        for sequence in range(1, 13):  # fills the slow consumer's socket, queues a few
            publisher.send(domain_message("signal", sequence, pad=30_000))
            assert sequence_of(fast.recv()) == sequence
        assert relay.stats()["slow_disconnects"] == 0

        with relay_stopped(relay):
            publisher.send_many(domain_message("signal", s) for s in range(13, 33))
            time.sleep(0.02)
            slow.setblocking(False)
            try:
                while slow.recv(1 << 20):
                    pass  # its socket drains: the relay may write again
            except BlockingIOError:
                pass
            time.sleep(0.02)
        try:
            got = [sequence_of(fast.recv()) for _ in range(20)]
            publisher.send(domain_message("signal", 33))
            got.append(sequence_of(fast.recv()))
        except (EOFError, ConnectionError, TimeoutError) as exc:
            time.sleep(0.2)
            pytest.fail(f"the fast consumer lost the relay ({exc}); relay exit code "
                        f"{relay.process.poll()}; its log ends:\n{relay.log()[-1500:]}")
        assert got == list(range(13, 34))
        stats = relay.stats()
        assert (stats["connections_active"], stats["slow_disconnects"]) == (3, 0)
        slow.setblocking(True)
        slow.settimeout(TIMEOUT_S)
        assert slow.recv(1 << 16), "the consumer that caught up still receives"
    slow.close()
    relay.terminate()


def test_messages_a_client_sent_just_before_leaving_are_delivered_even_if_written_to_first(
        relay_process: Callable[..., RelayProcess]) -> None:
    """A client (subscribed to everything, as RelayClient is by default) sends a message
    and closes, while the relay is busy; when the relay runs again it handles another
    publisher's message first, whose write to the leaver fails with EPIPE. The leaver's
    own message was already in the relay's socket and must still reach the others."""
    relay = relay_process()
    with RelayClient(relay.path, timeout=TIMEOUT_S) as consumer, \
            RelayClient(relay.path, publish_only=True, timeout=TIMEOUT_S) as publisher:
        leaver = RelayClient(relay.path, timeout=TIMEOUT_S)
        relay.wait_stats(lambda s: s["connections_active"] == 3, "three clients")
        with relay_stopped(relay):
            publisher.send(domain_message("market_data", 1, source=1))
            time.sleep(0.02)
            leaver.send(domain_message("market_data", 2, source=2))
            leaver.close()
            time.sleep(0.02)
        got = []
        try:
            for _ in range(2):
                got.append(source_of(consumer.recv(timeout=2.0)))
        except TimeoutError:
            pass
        assert sorted(got) == [1, 2], (
            f"the consumer got messages from sources {got}; the leaver's (source 2) is lost")
    relay.terminate()


@pytest.mark.parametrize("publish_only", [False, True], ids=["subscribed", "publish_only"])
def test_short_lived_publishers_that_send_and_leave_lose_nothing_while_others_stream(
        relay_process: Callable[..., RelayProcess], publish_only: bool) -> None:
    """300 clients each connect (subscribed to everything, the RelayClient default, or
    publish-only like ``relay.py send``), send one message and close, while a pair
    streams: every one of the 300 messages reaches a consumer subscribed to their type."""
    relay = relay_process()
    pair = Pair(relay.path).start()
    with RelayClient(relay.path, subscribe=[201], timeout=TIMEOUT_S) as watcher:
        relay.wait_stats(lambda s: s["connections_active"] == 3, "pair and watcher")
        pair.wait_received(1000)
        for number in range(1, 301):
            with RelayClient(relay.path, publish_only=publish_only,
                             timeout=TIMEOUT_S) as once:
                once.send(build_message(Domain.MARKET_DATA, 3, [(201, b"job done")],
                                        sequence=number, timestamp_ns=TS))
        got: set[int] = set()
        try:
            while len(got) < 300:
                got.add(sequence_of(watcher.recv(timeout=2.0)))
        except TimeoutError:
            pass
    pair.finish()
    assert len(got) == 300, (f"{300 - len(got)} of 300 messages from clients that left "
                             f"right after sending were lost")
    relay.terminate()


# ---------------------------------------------------------------------------------------
# File descriptors: exhaustion and 1000 clients
# ---------------------------------------------------------------------------------------


def test_out_of_file_descriptors_is_logged_without_spinning_and_serving_resumes(
        relay_process: Callable[..., RelayProcess]) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))

    relay = relay_process(preexec_fn=low_limit)
    flood = []
    try:
        for _ in range(200):
            flood.append(connect_raw(relay.path))
        wait_until(lambda: "out of file descriptors" in relay.log() or not relay.alive(),
                   "the relay to log that it ran out of descriptors")
        relay.assert_alive()
        time.sleep(0.2)
        cpu_before = relay.cpu_seconds()
        time.sleep(2.0)
        cpu_used = relay.cpu_seconds() - cpu_before
        assert cpu_used < 0.5, f"the relay spun: {cpu_used:.2f} s of CPU in 2 s"
        stats = relay.stats()
        assert stats["connections_active"] < 64
    finally:
        for sock in flood:
            sock.close()
    relay.wait_stats(lambda s: s["connections_active"] == 0, "the flood to be gone",
                     timeout=TIMEOUT_S * 2)
    assert Pair(relay.path, count=2000).start().finish() == 2000
    relay.terminate()


def test_a_thousand_clients_all_get_a_broadcast_and_the_next_one_is_refused_and_counted(
        relay_process: Callable[..., RelayProcess],
        nofile_limit: Callable[[int], None]) -> None:
    nofile_limit(2100)  # ours: 1001 clients + pytest; the relay inherits it for its 1000
    relay = relay_process("--max-connections", "1000")
    clients: list[RelayClient] = []
    try:
        for _ in range(1000):
            clients.append(RelayClient(relay.path, timeout=TIMEOUT_S))
        relay.wait_stats(lambda s: s["connections_active"] == 1000, "1000 clients")
        first, second = domain_message("market_data", 1), domain_message("market_data", 2)
        clients[0].send(first)
        clients[1].send(second)
        assert clients[0].recv() == second
        assert clients[1].recv() == first
        missing = [i for i, c in enumerate(clients[2:], 2)
                   if sorted((c.recv(), c.recv())) != [first, second]]
        assert not missing, f"{len(missing)} clients missed the broadcast, e.g. {missing[:5]}"
        assert relay.rss_bytes() <= 100 * MiB

        with connect_raw(relay.path) as extra:
            assert closed_by_relay(extra, timeout=2.0), "client 1001 was not refused"
        stats = relay.stats()
        assert (stats["connections_active"], stats["connections_rejected"]) == (1000, 1)
        assert "--max-connections 1000" in relay.log()

        clients.pop().close()  # one leaves: a newcomer is served again
        relay.wait_stats(lambda s: s["connections_active"] == 999, "one client gone")
        with RelayClient(relay.path, timeout=TIMEOUT_S) as newcomer:
            relay.wait_stats(lambda s: s["connections_active"] == 1000, "the newcomer")
            clients[0].send(domain_message("market_data", 3))
            assert sequence_of(newcomer.recv()) == 3
    finally:
        for client in clients:
            client.close()
    stats = relay.terminate()
    assert stats["connections_rejected"] == 1


def test_a_newcomer_arriving_as_a_client_leaves_takes_its_place_at_the_connection_limit(
        relay_process: Callable[..., RelayProcess]) -> None:
    """At --max-connections, a newcomer that connects while the relay is busy, just
    before a connected client leaves, is served: the relay reads the departure (in the
    same batch of events) before it refuses anyone."""
    relay = relay_process("--max-connections", "3")
    with RelayClient(relay.path, timeout=TIMEOUT_S) as consumer, \
            RelayClient(relay.path, publish_only=True, timeout=TIMEOUT_S) as publisher:
        leaver = RelayClient(relay.path, timeout=TIMEOUT_S)
        relay.wait_stats(lambda s: s["connections_active"] == 3, "three clients")
        with relay_stopped(relay):
            newcomer = connect_raw(relay.path)  # waits in the backlog
            leaver.close()
            time.sleep(0.02)
        with newcomer:
            relay.wait_stats(lambda s: s["connections_total"] >= 4, "the newcomer accepted")
            publisher.send(domain_message("market_data", 7))
            assert sequence_of(consumer.recv()) == 7
            frame = newcomer.recv(1024)
            assert frame and sequence_of(frame) == 7, "the newcomer was refused"
    stats = relay.terminate()
    assert stats["connections_rejected"] == 0


# ---------------------------------------------------------------------------------------
# Exact accounting under drop_oldest and backpressure
# ---------------------------------------------------------------------------------------


class CountingConsumer(threading.Thread):
    """Reads numbered messages; counts what arrives and what RELAY_GAP notices announce,
    and checks that every gap in the numbers is exactly what was announced before it."""

    def __init__(self, relay: RunningRelay, name: str, expected: int, *,
                 burst: int = 0, pause_s: float = 0.0) -> None:
        super().__init__(daemon=True, name=name)
        self.client = relay.client(gap_notices=True)
        self.expected = expected
        self.burst = burst
        self.pause_s = pause_s
        self.received = 0
        self.dropped = 0
        self.hellos = 0
        self.errors: list[str] = []

    def hello(self) -> None:
        frame = self.client.recv()
        assert sequence_of(frame) == 0
        self.hellos += 1

    def run(self) -> None:
        last = 0
        announced = 0
        try:
            while self.received + self.dropped < self.expected:
                frame = self.client.recv()
                gap = gap_of(frame)
                if gap is not None:
                    self.dropped += gap[0]
                    announced += gap[0]
                    if gap[1] != self.dropped:
                        self.errors.append(f"total_dropped {gap[1]} != {self.dropped}")
                    continue
                sequence = sequence_of(frame)
                if sequence == 0:
                    self.hellos += 1
                    continue
                if sequence != last + 1 + announced:
                    self.errors.append(f"after {last} and a gap of {announced} got {sequence}")
                    return
                last, announced = sequence, 0
                self.received += 1
                if self.burst and self.received % self.burst == 0:
                    time.sleep(self.pause_s)
        except Exception as exc:
            self.errors.append(f"after {self.received} + {self.dropped} dropped: {exc!r}")
        finally:
            self.client.close()


def run_accounting(relay: RunningRelay, domain: str, total: int,
                   profiles: list[tuple[str, int, float]],
                   rng: random.Random) -> list[CountingConsumer]:
    consumers = [CountingConsumer(relay, name, total, burst=burst, pause_s=pause)
                 for name, burst, pause in profiles]
    with relay.client(publish_only=True) as publisher:
        relay.wait_clients(len(consumers) + 1)
        publisher.send(domain_message(domain, 0))
        for consumer in consumers:
            consumer.hello()
            consumer.start()
        messages = [domain_message(domain, s) for s in range(1, total + 1)]
        sent = 0
        while sent < total:
            n = rng.randint(1, 1000)
            publisher.send_many(messages[sent:sent + n])
            sent += n
        for consumer in consumers:
            consumer.join(TIMEOUT_S * 6)
    for consumer in consumers:
        assert not consumer.is_alive(), f"{consumer.name} did not finish"
        assert not consumer.errors, (consumer.name, consumer.errors)
    return consumers


def test_drop_oldest_accounting_is_exact_for_every_consumer_and_matches_the_counters(
        start_relay: Callable[..., RunningRelay], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relay")
    relay = start_relay(MarketDataLogic(), queue_limit=100)
    total = 20_000
    consumers = run_accounting(relay, "market_data", total, [
        ("fast", 0, 0.0), ("medium", 50, 0.001), ("slow", 100, 0.02)],
        random.Random(100))
    for consumer in consumers:
        assert consumer.received + consumer.dropped == total, consumer.name
    assert consumers[-1].dropped > 0, "the slow consumer should have lost messages"
    delivered = sum(c.received + c.hellos for c in consumers)
    relay.wait_for(lambda: relay.stats().messages_out >= delivered)
    stats = relay.stats()
    assert stats.messages_dropped == sum(c.dropped for c in consumers)
    assert stats.messages_out == delivered
    assert any("slow consumer, dropped" in m for m in caplog.messages)


def test_backpressure_loses_nothing_across_100000_messages_with_a_bursty_consumer(
        start_relay: Callable[..., RunningRelay]) -> None:
    relay = start_relay(ExecutionLogic(), queue_limit=1000)
    total = 100_000
    consumers = run_accounting(relay, "execution", total, [
        ("bursty", 5000, 0.05), ("fast", 0, 0.0)], random.Random(3))
    for consumer in consumers:
        assert (consumer.received, consumer.dropped) == (total, 0), consumer.name
    delivered = 2 * total + sum(c.hellos for c in consumers)
    relay.wait_for(lambda: relay.stats().messages_out >= delivered)
    stats = relay.stats()
    assert stats.backpressure_pauses > 0, "the bursty consumer should have paused the relay"
    assert (stats.messages_dropped, stats.slow_disconnects, stats.messages_invalid) == (0, 0, 0)
    assert stats.messages_out == delivered


# ---------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------


def test_sigterm_delivers_everything_queued_to_consumers_still_reading(
        relay_process: Callable[..., RelayProcess]) -> None:
    relay = relay_process("--queue-limit", "1000000", "--drain-timeout", "5")
    total = 20_000
    consumer = RelayClient(relay.path, timeout=TIMEOUT_S)
    with consumer, RelayClient(relay.path, publish_only=True, timeout=TIMEOUT_S) as publisher:
        relay.wait_stats(lambda s: s["connections_active"] == 2, "two clients")
        payload = b"".join(domain_message("market_data", s) for s in range(1, total + 1))
        publisher.send(payload)
        lines_before = len(relay.stats_lines())
        stats = relay.wait_stats(
            lambda s: s["bytes_in"] == len(payload) + len(subscribe_message(SUBSCRIBE_NONE)),
            "the relay to read everything")
        assert len(relay.stats_lines()) > lines_before, "SIGUSR1 logged no stats line"
        assert stats["messages_out"] < total, "some data should still be queued"

        relay.process.send_signal(signal.SIGTERM)
        sequences = [sequence_of(consumer.recv()) for _ in range(total)]
        assert sequences == list(range(1, total + 1))
        with pytest.raises(EOFError):
            consumer.recv()
    assert relay.process.wait(TIMEOUT_S) == 0
    final = relay.stats_lines(final=True)[-1]
    assert final["messages_out"] == total
    assert "drain timeout" not in relay.log()
    assert not os.path.exists(relay.path), "the socket file was left behind"


def test_sigterm_with_a_consumer_that_stopped_reading_exits_within_the_drain_timeout(
        relay_process: Callable[..., RelayProcess]) -> None:
    relay = relay_process("--drain-timeout", "1")
    stuck = connect_raw(relay.path)
    with stuck, RelayClient(relay.path, publish_only=True, timeout=TIMEOUT_S) as publisher:
        relay.wait_stats(lambda s: s["connections_active"] == 2, "two clients")
        publisher.send_many(domain_message("market_data", s) for s in range(1, 10_001))
        relay.wait_stats(lambda s: s["messages_in"] >= 10_000, "the relay to read it all")
        started = time.monotonic()
        relay.process.send_signal(signal.SIGTERM)
        assert relay.process.wait(TIMEOUT_S) == 0
        assert time.monotonic() - started < 1 + 3
    log = relay.log()
    assert "drain timeout" in log and "final stats" in log
    assert not os.path.exists(relay.path)


# ---------------------------------------------------------------------------------------
# The socket file
# ---------------------------------------------------------------------------------------


def test_socket_is_0600_in_a_created_parent_directory_of_0700(
        relay_process: Callable[..., RelayProcess], socket_dir: str) -> None:
    parent = os.path.join(socket_dir, "new", "dir")
    path = os.path.join(parent, "relay.sock")
    relay = relay_process(socket_path=path)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(parent).st_mode) == 0o700
    relay.terminate()
    assert not os.path.exists(path)


def test_a_second_relay_never_removes_a_live_relays_socket(
        relay_process: Callable[..., RelayProcess], socket_path: str) -> None:
    first = relay_process(socket_path=socket_path)
    inode = os.stat(socket_path).st_ino
    second = relay_process(socket_path=socket_path, ready=False)
    assert second.process.wait(TIMEOUT_S) == 1
    error = second.log()
    assert "already listening" in error and socket_path in error
    assert os.stat(socket_path).st_ino == inode
    assert Pair(socket_path, count=1000).start().finish() == 1000
    first.terminate()
    assert not os.path.exists(socket_path)


def test_a_regular_file_at_the_socket_path_is_never_touched(
        relay_process: Callable[..., RelayProcess], socket_path: str) -> None:
    with open(socket_path, "w") as f:
        f.write("precious data\n")
    before = os.stat(socket_path)
    relay = relay_process(socket_path=socket_path, ready=False)
    assert relay.process.wait(TIMEOUT_S) == 1
    assert "not a socket" in relay.log()
    with open(socket_path) as f:
        assert f.read() == "precious data\n"
    after = os.stat(socket_path)
    assert (after.st_ino, after.st_mtime_ns, after.st_mode) == (
        before.st_ino, before.st_mtime_ns, before.st_mode)


def test_a_stale_socket_left_by_a_dead_relay_is_replaced(
        relay_process: Callable[..., RelayProcess], socket_path: str) -> None:
    leave_stale_socket(socket_path)  # the file stays; nobody listens
    relay = relay_process(socket_path=socket_path)
    assert Pair(socket_path, count=100).start().finish() == 100
    relay.terminate()
