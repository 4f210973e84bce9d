"""Tests for the clients that keep up (issue 11): ``RelayClient.recv_many`` and
``recv_batch`` (``FrameBatch``), ``AsyncRelayClient``, ``reconnect=True`` on both, and
the command-line consumers (``tail``, ``record``) that read in batches.

Two kinds of peer:

- A fake relay (``fake_relay``: a plain listening socket) feeds a client an exact byte
  stream cut where a test says, so splits, coalescing, bad magic and a peer that dies in
  the middle of a frame are deterministic. ``unread_bytes`` reads FIONREAD on the
  client's own socket: a test waits until bytes are all waiting there (so one read
  brings them all) or until the client has read everything (so the next piece arrives
  in a read of its own). No blind sleeps.
- A real relay in a thread (``start_relay``) proves the same through the engine, and is
  stopped and started again on the same path for the reconnect tests.

Most fake-relay tests run twice, once per client (``flavour``): the asyncio client is
driven from the test body by ``AsyncAdapter``, which runs each awaited call to the end on
an event loop of its own, so one test body judges both clients byte for byte. The
asyncio tests of their own (``async with``, ``async for``, reconnects) use
``asyncio.run``.

"""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import re
import signal
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

import logic
import relay
from conftest import (
    SHORT_S,
    TIMEOUT_S,
    TS,
    Cli,
    FakeRelay,
    RunningRelay,
    StartRelay,
    domain_of,
    gas_message,
    read_text,
    sequence_of,
    trade_message,
    wait_subscribed,
    wait_until,
)
from logic import (
    CLIENT_RECONNECTED,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    RELAY_LIVE,
    RELAY_SUBSCRIBE,
    SUBSCRIBE_TYPES,
    TLV_GAS_PRICE,
    TLV_TRADE,
    Domain,
    ProtocolError,
    decode_live,
    decode_reconnected,
    decode_subscribe,
    parse_message,
)
from relay import SPLIT_FRAMES, AsyncRelayClient, FrameBatch, RelayClient, RelayRefused

BIG_MESSAGE = 1 << 20  # max_message_size for relays that carry frames over 64 KiB
BAD_MAGIC = 0x0BADF00D
FLAVOURS = ("blocking", "asyncio")


# ---------------------------------------------------------------------------------------
# Helpers: frames, streams cut into pieces, unread bytes
# ---------------------------------------------------------------------------------------


def frame(seq: int, size: int = 64, *, source: int = 1) -> bytes:
    """A market-data frame of exactly ``size`` bytes (header included) numbered ``seq``,
    with a pseudo-random payload (market data parses no TLVs), so no two frames match."""
    payload = random.Random(seq * 1_000_003 + size).randbytes(size - HEADER_SIZE)
    return HEADER.pack(MAGIC, Domain.MARKET_DATA, 1, source, 0, seq, TS, len(payload),
                       0) + payload


def frames_of(sizes: Sequence[int], first_seq: int = 1) -> list[bytes]:
    """One ``frame`` per size, numbered from ``first_seq``."""
    return [frame(seq, size) for seq, size in enumerate(sizes, first_seq)]


def bad_magic(data: bytes) -> bytes:
    """``data`` (a frame) with its magic replaced by ``BAD_MAGIC``."""
    return struct.pack("<I", BAD_MAGIC) + data[4:]


def mixed_sizes(seed: int, *, huge: int = 0) -> list[int]:
    """Frame sizes of a realistic mixed feed: runs of one size (2 to 129 frames, on
    both sides of the 16-frame column check and of SPLIT_FRAMES, the Struct splitter's
    64), single frames of 64 B to 70,000 B, bursts of small ones, and ``huge`` frames
    of 300,000 B (more than one 256 KiB read)."""
    rng = random.Random(seed)
    sizes: list[int] = []
    for _ in range(40):
        kind = rng.random()
        if kind < 0.4:
            run = rng.choice((2, 15, 16, 17, SPLIT_FRAMES - 1, SPLIT_FRAMES,
                              SPLIT_FRAMES + 1, 2 * SPLIT_FRAMES + 1))
            sizes += [rng.choice((32, 64, 64, 100, 333))] * run
        elif kind < 0.7:
            sizes += [rng.randint(64, 70_000) for _ in range(rng.randint(1, 4))]
        else:
            sizes += [rng.randint(32, 300) for _ in range(rng.randint(1, 20))]
    for _ in range(huge):
        sizes.insert(rng.randrange(len(sizes) + 1), 300_000)
    return sizes


class Drain:
    """A feeder step: wait until the client has read everything sent so far, so the
    next piece reaches it in a read of its own."""


DRAIN = Drain()
Step = bytes | Drain | threading.Event  # an Event: wait until the test sets it


def cut_randomly(data: bytes, seed: int) -> list[Step]:
    """``data`` in pieces of 1 B to 150,000 B cut at seeded random points (inside
    headers too); after 40% of them the feeder waits until the client has read them
    (a split it sees), the others run together (coalesced in its reads)."""
    rng = random.Random(seed)
    steps: list[Step] = []
    at = 0
    while at < len(data):
        kind = rng.random()
        size = (rng.randint(1, 40) if kind < 0.4 else rng.randint(41, 3_000) if kind < 0.8
                else rng.randint(3_001, 150_000))
        steps.append(data[at:at + size])
        if rng.random() < 0.4:
            steps.append(DRAIN)
        at += size
    return steps


def unread_bytes(fd: int) -> int:
    """Bytes waiting in socket ``fd``'s receive queue, not read yet (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])


def wait_unread(client: Receiver, count: int) -> None:
    """Wait until exactly ``count`` bytes wait unread in ``client``'s socket (all of a
    piece arrived: the client's next read takes them in one go)."""
    fd = client.fileno()
    wait_until(lambda: unread_bytes(fd) == count, f"{count} unread bytes at the client")


def assert_same_frames(got: Sequence[bytes], expected: Sequence[bytes]) -> None:
    """``got == expected``, with a short message naming the first difference."""
    for index, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            raise AssertionError(f"frame {index} differs: got {len(a)} B seq "
                                 f"{sequence_of(a) if len(a) >= HEADER_SIZE else '?'}, "
                                 f"expected {len(b)} B seq {sequence_of(b)}")
    assert len(got) == len(expected), f"got {len(got)} frames, expected {len(expected)}"


def batch_frames(batch: FrameBatch) -> list[bytes]:
    """A batch's frames, checked to agree every way a user may take them out."""
    offsets = batch.offsets
    assert isinstance(batch.data, bytes)
    assert len(batch) == len(offsets) - 1 >= 1
    by_offsets = [batch.data[offsets[i]:offsets[i + 1]] for i in range(len(batch))]
    assert batch.frames() == by_offsets
    assert list(batch) == by_offsets
    assert [batch[i] for i in range(len(batch))] == by_offsets
    return by_offsets


def reconnected(notice: bytes) -> logic.Reconnected:
    """The decoded CLIENT_RECONNECTED notice that ``notice`` must be."""
    header, tlvs = parse_message(notice)
    assert header.relay_domain == Domain.SYSTEM, f"not a notice: domain {header.relay_domain}"
    assert [t for t, _ in tlvs] == [CLIENT_RECONNECTED], tlvs
    return decode_reconnected(tlvs[0][1])


def restart(start_relay: StartRelay, relay: RunningRelay, **kwargs: Any) -> RunningRelay:
    """Stop ``relay`` (its clients see their connection close) and start a new one on
    the same path, as an operator's restart or upgrade does."""
    relay.stop()
    return start_relay(socket_path=relay.path, **kwargs)


class InThread(threading.Thread):
    """Runs ``action`` in a thread; ``finish()`` joins it and re-raises its error."""

    def __init__(self, action: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.action = action
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.action()
        except BaseException as exc:  # re-raised in the test thread by finish()
            self.error = exc

    def finish(self, timeout: float = TIMEOUT_S * 4) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the thread did not finish"
        if self.error is not None:
            raise self.error


# ---------------------------------------------------------------------------------------
# Peers: a feeder for the fake relay, the asyncio client behind a blocking face
# ---------------------------------------------------------------------------------------


def feed(conn: socket.socket, client: Receiver, steps: Sequence[Step],
         close: bool = True) -> InThread:
    """Send ``steps`` to ``client`` over ``conn`` (a fake relay's connection) in a
    thread; close ``conn`` after them (the client sees EOF) when ``close``."""
    fd = client.fileno()

    def run() -> None:
        try:
            for step in steps:
                if isinstance(step, bytes):
                    conn.sendall(step)
                elif isinstance(step, Drain):
                    wait_until(lambda: unread_bytes(fd) == 0, "the client to read")
                else:
                    assert step.wait(TIMEOUT_S * 2), "the test never released the feeder"
        finally:
            if close:
                conn.close()

    return InThread(run)


class AsyncAdapter:
    """An ``AsyncRelayClient`` driven from blocking test code: each call runs the
    client's coroutine to the end on this adapter's own event loop (nothing else runs
    on it), so the asyncio client's own code is what the test judges."""

    def __init__(self, path: str, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.client = self.loop.run_until_complete(AsyncRelayClient.connect(path,
                                                                                **options))
        except BaseException:
            self.loop.close()
            raise

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def recv(self, timeout: float | None = None) -> bytes:
        return bytes(self._run(self.client.recv(timeout)))

    def recv_many(self, max_frames: int | None = None,
                  timeout: float | None = None) -> list[bytes]:
        return list(self._run(self.client.recv_many(max_frames, timeout)))

    def recv_batch(self, max_frames: int | None = None,
                   timeout: float | None = None) -> FrameBatch:
        batch: FrameBatch = self._run(self.client.recv_batch(max_frames, timeout))
        return batch

    def send(self, message: bytes) -> None:
        self._run(self.client.send(message))

    def send_many(self, messages: Sequence[bytes]) -> None:
        self._run(self.client.send_many(messages))

    def __iter__(self) -> Iterator[bytes]:
        frames = self.client.__aiter__()
        while True:
            try:
                yield self._run(frames.__anext__())
            except StopAsyncIteration:
                return

    @property
    def reconnects(self) -> int:
        return self.client.reconnects

    def fileno(self) -> int:
        return self.client.fileno()

    def close(self) -> None:
        if not self.loop.is_closed():
            self._run(self.client.close())
            self._run(self.loop.shutdown_asyncgens())
            self.loop.close()

    def __enter__(self) -> AsyncAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Receiver = RelayClient | AsyncAdapter


def open_client(flavour: str, path: str, **options: Any) -> Receiver:
    """A blocking ``RelayClient`` or the asyncio client (via ``AsyncAdapter``)."""
    options.setdefault("timeout", TIMEOUT_S)
    if flavour == "blocking":
        return RelayClient(path, **options)
    return AsyncAdapter(path, **options)


# Every way of receiving; "_max" ones pass a random max_frames (and check it is kept).
METHODS = ("recv", "recv_many", "recv_many_max", "recv_batch", "recv_batch_max", "iterate")


def take(client: Receiver, method: str, rng: random.Random,
         timeout: float | None = None) -> list[bytes]:
    """The frames of one receive call by ``method`` (not "iterate"): at least one."""
    limit = rng.randint(1, 80) if method.endswith("_max") else None
    if method == "recv":
        return [client.recv(timeout=timeout)]
    if method.startswith("recv_many"):
        frames = client.recv_many(max_frames=limit, timeout=timeout)
    else:
        frames = batch_frames(client.recv_batch(max_frames=limit, timeout=timeout))
    assert frames, f"{method} returned no frame"
    if limit is not None:
        assert len(frames) <= limit, f"{method}(max_frames={limit}) gave {len(frames)}"
    return frames


def read_frames(client: Receiver, method: str, count: int, seed: int = 0) -> list[bytes]:
    """``count`` frames read by ``method`` (each call returns at least one: bounded)."""
    rng = random.Random(seed)
    got: list[bytes] = []
    if method == "iterate":
        for received in client:
            got.append(received)
            if len(got) == count:
                break
        return got
    while len(got) < count:
        got += take(client, method, rng)
    return got


def read_to_the_end(client: Receiver, method: str, seed: int = 0,
                    limit: int = 100_000) -> tuple[list[bytes], BaseException | None]:
    """Every frame until the stream ends: the frames, and the error that ended it
    (None when iteration stopped by itself, at EOF)."""
    rng = random.Random(seed)
    got: list[bytes] = []
    try:
        if method == "iterate":
            for received in client:
                got.append(received)
                assert len(got) <= limit, "the stream never ended"
            return got, None
        while len(got) <= limit:
            got += take(client, method, rng)
    except (EOFError, ConnectionError, ProtocolError) as exc:
        return got, exc
    raise AssertionError("the stream never ended")


# ---------------------------------------------------------------------------------------
# Whole frames, in order, however the bytes arrive
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cutting", [1, 2, 0], ids=["cut-1", "cut-2", "one-sendall"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_way_of_receiving_returns_the_same_frames_in_order_however_the_bytes_are_cut(
        fake_relay: FakeRelay, flavour: str, method: str, cutting: int) -> None:
    frames = frames_of(mixed_sizes(cutting or 3, huge=2))
    data = b"".join(frames)
    steps: list[Step] = cut_randomly(data, cutting) if cutting else [data]
    with open_client(flavour, fake_relay.path) as client:
        feeder = feed(fake_relay.accept(), client, steps)
        got, end = read_to_the_end(client, method, seed=cutting)
        feeder.finish()
        assert_same_frames(got, frames)
        assert b"".join(got) == data
        if method == "iterate":
            assert end is None  # iteration ends quietly at EOF
        else:
            assert isinstance(end, EOFError), end  # the peer closed between frames
            with pytest.raises(EOFError):  # and stays closed
                take(client, method, random.Random(0), timeout=SHORT_S)


@pytest.mark.parametrize("size", [32, 64, 200])
@pytest.mark.parametrize("count", [16, 17, SPLIT_FRAMES - 1, SPLIT_FRAMES, SPLIT_FRAMES + 1,
                                   2 * SPLIT_FRAMES + 1, 300])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_run_of_same_size_frames_in_one_read_is_one_batch_with_range_offsets(
        fake_relay: FakeRelay, flavour: str, count: int, size: int) -> None:
    frames = frames_of([size] * count)
    data = b"".join(frames)
    with open_client(flavour, fake_relay.path) as client:
        conn = fake_relay.accept()
        conn.sendall(data)
        wait_unread(client, len(data))
        batch = client.recv_batch()
        assert isinstance(batch.offsets, range)
        assert batch.offsets == range(0, len(data) + size, size)
        assert len(batch) == count
        assert batch_frames(batch) == frames
        # The same run through recv_many, then through recv one frame at a time.
        conn.sendall(data)
        wait_unread(client, len(data))
        assert client.recv_many() == frames
        conn.sendall(data)
        wait_unread(client, len(data))
        assert [client.recv() for _ in range(count)] == frames
        with pytest.raises(TimeoutError):
            client.recv_many(timeout=SHORT_S)


MIXED_RUNS = ([100] * 5 + [64] * 20 + [200] * 3 + [64] * 70 + [1000] + [32] * 16 + [300] * 17
              + [64] * (SPLIT_FRAMES + 1) + [40_000, 33] + [64] * 15)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_one_read_of_mixed_runs_comes_back_whole_and_in_order_without_another_read(
        fake_relay: FakeRelay, flavour: str) -> None:
    frames = frames_of(MIXED_RUNS)
    data = b"".join(frames)
    with open_client(flavour, fake_relay.path) as client:
        fake_relay.accept().sendall(data)
        wait_unread(client, len(data))
        got = batch_frames(client.recv_batch())  # the one read
        assert unread_bytes(client.fileno()) == 0
        while len(got) < len(frames):  # the rest is buffered: a zero timeout is enough
            got += batch_frames(client.recv_batch(timeout=0))
        assert_same_frames(got, frames)
        with pytest.raises(TimeoutError):
            client.recv_many(timeout=SHORT_S)


@pytest.mark.parametrize("sizes", [[64] * 20 + [100] * 5, MIXED_RUNS], ids=["run-first",
                                                                             "mixed"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_recv_many_returns_every_whole_frame_already_buffered_in_one_call(
        fake_relay: FakeRelay, flavour: str, sizes: list[int]) -> None:
    frames = frames_of(sizes)
    data = b"".join(frames)
    with open_client(flavour, fake_relay.path) as client:
        fake_relay.accept().sendall(data)
        wait_unread(client, len(data))
        assert_same_frames(client.recv_many(), frames)  # gets the first run only


@pytest.mark.parametrize("size", [300_000, 700_000, BIG_MESSAGE])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_frame_larger_than_one_read_arrives_whole_between_small_ones(
        fake_relay: FakeRelay, flavour: str, size: int) -> None:
    frames = frames_of([64, size, 64, 64, size, 100])
    with open_client(flavour, fake_relay.path) as client:
        feeder = feed(fake_relay.accept(), client, [b"".join(frames)])
        got, end = read_to_the_end(client, "recv_many")
        feeder.finish()
        assert_same_frames(got, frames)
        assert isinstance(end, EOFError)


# ---------------------------------------------------------------------------------------
# max_frames, and mixing the receive calls
# ---------------------------------------------------------------------------------------


SMALL_MIXED = [64] * 129 + [100, 2000, 32, 5000] + [32] * 65 + [77] * 3 + [64] * 20 + [500]


@pytest.mark.parametrize("max_frames", [1, 2, 3, 7, SPLIT_FRAMES - 1, SPLIT_FRAMES,
                                        SPLIT_FRAMES + 1, 1000])
@pytest.mark.parametrize("method", ["recv_many", "recv_batch"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_max_frames_is_honoured_and_the_rest_is_kept_for_the_next_call(
        fake_relay: FakeRelay, flavour: str, method: str, max_frames: int) -> None:
    frames = frames_of(SMALL_MIXED)
    data = b"".join(frames)
    with open_client(flavour, fake_relay.path) as client:
        fake_relay.accept().sendall(data)
        wait_unread(client, len(data))
        got: list[bytes] = []
        while len(got) < len(frames):  # each call returns at least one frame
            if method == "recv_many":
                part = client.recv_many(max_frames=max_frames)
            else:
                part = batch_frames(client.recv_batch(max_frames=max_frames))
            assert 1 <= len(part) <= max_frames
            got += part
        assert_same_frames(got, frames)
        with pytest.raises(TimeoutError):
            client.recv_many(max_frames=max_frames, timeout=SHORT_S)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_max_frames_cuts_exactly_that_many_from_a_run_and_from_mixed_sizes(
        fake_relay: FakeRelay, flavour: str) -> None:
    run = frames_of([64] * (2 * SPLIT_FRAMES + 1))
    mixed = frames_of(range(40, 50), first_seq=1000)
    with open_client(flavour, fake_relay.path) as client:
        conn = fake_relay.accept()
        conn.sendall(b"".join(run))
        wait_unread(client, 64 * len(run))
        parts = [client.recv_batch(max_frames=SPLIT_FRAMES) for _ in range(3)]
        assert [len(part) for part in parts] == [SPLIT_FRAMES, SPLIT_FRAMES, 1]
        assert [f for part in parts for f in batch_frames(part)] == run
        conn.sendall(b"".join(mixed))
        wait_unread(client, sum(map(len, mixed)))
        lists = [client.recv_many(max_frames=3) for _ in range(4)]
        assert [len(part) for part in lists] == [3, 3, 3, 1]
        assert [f for part in lists for f in part] == mixed


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_max_frames_zero_neither_blocks_nor_times_out(fake_relay: FakeRelay,
                                                     flavour: str) -> None:
    frames = frames_of([64] * 3)
    with open_client(flavour, fake_relay.path) as client:
        fake_relay.accept().sendall(b"".join(frames))
        wait_unread(client, 3 * 64)
        try:
            assert client.recv_many(max_frames=0, timeout=SHORT_S) == []
        except ValueError:
            pass
        assert client.recv_many(timeout=SHORT_S) == frames


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_recv_and_recv_many_and_recv_batch_interleave_without_losing_or_reordering(
        fake_relay: FakeRelay, flavour: str) -> None:
    frames = frames_of([64, 100, 64, 200, 64, 64, 300, 64, 40, 64])
    with open_client(flavour, fake_relay.path) as client:
        fake_relay.accept().sendall(b"".join(frames))
        wait_unread(client, sum(map(len, frames)))
        assert client.recv_many(max_frames=2) == frames[0:2]
        assert client.recv() == frames[2]
        assert batch_frames(client.recv_batch(max_frames=3)) == frames[3:6]
        assert client.recv() == frames[6]
        assert client.recv_many() == frames[7:]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_recv_batch_after_recv_returns_first_the_frames_recv_already_cut_without_a_read(
        fake_relay: FakeRelay, flavour: str) -> None:
    early = frames_of([64] * 5)
    later = frames_of([64] * 3, first_seq=6)
    with open_client(flavour, fake_relay.path) as client:
        conn = fake_relay.accept()
        conn.sendall(b"".join(early))
        wait_unread(client, 5 * 64)
        assert client.recv() == early[0]  # one read: recv cut all five
        conn.sendall(b"".join(later))
        wait_unread(client, 3 * 64)
        assert batch_frames(client.recv_batch(max_frames=2)) == early[1:3]
        assert client.recv_many() == early[3:]
        assert unread_bytes(client.fileno()) == 3 * 64  # none of that needed a read
        assert batch_frames(client.recv_batch()) == later


# ---------------------------------------------------------------------------------------
# FrameBatch
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_batch_stays_intact_after_later_reads(fake_relay: FakeRelay, flavour: str) -> None:
    first = frames_of([64] * 40)
    odd = frame(50, 500)
    split = frame(100, 1000)
    later = frames_of([64] * 40 + [77] * 5, first_seq=200)
    with open_client(flavour, fake_relay.path) as client:
        conn = fake_relay.accept()
        conn.sendall(b"".join(first) + odd + split[:500])
        wait_unread(client, 64 * 40 + 500 + 500)
        batch = client.recv_batch(max_frames=40)
        snapshot = bytes(bytearray(batch.data))  # a real copy, to compare with later
        assert batch_frames(batch) == first
        assert client.recv() == odd
        conn.sendall(split[500:] + b"".join(later))
        assert client.recv() == split
        assert_same_frames(read_frames(client, "recv_batch_max", len(later), seed=5), later)
        # Whatever the later reads did to the client's buffer, the batch is unchanged.
        assert batch.data == snapshot
        assert batch_frames(batch) == first


def test_frame_batch_iteration_indexing_and_frames_agree_for_range_and_list_offsets() -> None:
    uniform = frames_of([64] * (SPLIT_FRAMES * 2 + 7))
    data = b"x" * 10 + b"".join(uniform) + b"tail"
    by_range = FrameBatch(data, range(10, 10 + 64 * len(uniform) + 64, 64))
    assert len(by_range) == len(uniform)
    assert by_range.frames() == list(by_range) == uniform
    assert [by_range[i] for i in range(len(by_range))] == uniform
    mixed = frames_of([64, 100, 32, 7000])
    offsets = [3]
    for f in mixed:
        offsets.append(offsets[-1] + len(f))
    by_list = FrameBatch(b"abc" + b"".join(mixed), offsets)
    assert len(by_list) == 4
    assert by_list.frames() == list(by_list) == mixed
    assert [by_list[i] for i in range(4)] == mixed
    assert "4 frames" in repr(by_list)
    with pytest.raises(IndexError):
        _ = by_list[4]


def test_frame_batch_negative_index_is_the_last_frame() -> None:
    mixed = frames_of([64, 100, 32])
    batch = FrameBatch(b"".join(mixed), [0, 64, 164, 196])
    assert batch[-1] == mixed[-1]


# ---------------------------------------------------------------------------------------
# Timeouts, EOF, the relay gone mid-frame, bad magic
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "cut"), [(100, 20), (100, 60), (300_000, 150_000)],
                         ids=["in-header", "in-payload", "big-frame"])
@pytest.mark.parametrize("method", ["recv", "recv_many", "recv_batch"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_timeout_keeps_a_partly_received_frame_and_the_client_usable(
        fake_relay: FakeRelay, flavour: str, method: str, size: int, cut: int) -> None:
    before, split, after = frame(1), frame(2, size), frame(3, 70)
    release = threading.Event()
    rng = random.Random(0)
    with open_client(flavour, fake_relay.path) as client:
        feeder = feed(fake_relay.accept(), client,
                                 [before + split[:cut], release, split[cut:] + after])
        assert take(client, method, rng) == [before]
        with pytest.raises(TimeoutError):
            take(client, method, rng, timeout=SHORT_S)
        with pytest.raises(TimeoutError):  # and again: still nothing whole
            take(client, method, rng, timeout=0)
        release.set()
        got, end = read_to_the_end(client, method)
        feeder.finish()
        assert got == [split, after]
        assert isinstance(end, EOFError)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_clients_timeout_option_is_the_default_of_every_receive_call(
        fake_relay: FakeRelay, flavour: str) -> None:
    with open_client(flavour, fake_relay.path, timeout=SHORT_S) as client:
        conn = fake_relay.accept()
        for call in (client.recv, client.recv_many, client.recv_batch):
            with pytest.raises(TimeoutError):
                call()
        conn.sendall(frame(1))
        assert client.recv_many() == [frame(1)]


def test_recv_many_and_recv_batch_with_zero_timeout_return_frames_already_waiting(
        fake_relay: FakeRelay) -> None:
    with open_client("blocking", fake_relay.path) as client:
        conn = fake_relay.accept()
        conn.sendall(frame(1))
        wait_unread(client, 64)
        assert client.recv_many(timeout=0) == [frame(1)]
        conn.sendall(frame(2))
        wait_unread(client, 64)
        assert batch_frames(client.recv_batch(timeout=0)) == [frame(2)]
        with pytest.raises(TimeoutError):
            client.recv_many(timeout=0)


@pytest.mark.parametrize("method", ["recv", "recv_many", "recv_batch"])
def test_async_receive_with_zero_timeout_returns_a_frame_already_waiting(
        fake_relay: FakeRelay, method: str) -> None:
    with open_client("asyncio", fake_relay.path) as client:
        fake_relay.accept().sendall(frame(1))
        wait_unread(client, 64)
        assert take(client, method, random.Random(0), timeout=0) == [frame(1)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_eof_after_the_last_frame_ends_iteration_and_raises_eof_error_after(
        fake_relay: FakeRelay, flavour: str, method: str) -> None:
    frames = frames_of([64, 100, 64])
    with open_client(flavour, fake_relay.path) as client:
        conn = fake_relay.accept()
        conn.sendall(b"".join(frames))
        conn.close()
        got, end = read_to_the_end(client, method)
        assert got == frames
        if method == "iterate":
            assert end is None
            assert list(client) == []  # a closed client's iteration is empty at once
        else:
            assert isinstance(end, EOFError)
        with pytest.raises(EOFError):
            client.recv_batch(timeout=SHORT_S)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_eof_with_nothing_received_raises_eof_error_from_every_call(
        fake_relay: FakeRelay, flavour: str) -> None:
    with open_client(flavour, fake_relay.path) as client:
        fake_relay.accept().close()
        for call in (client.recv, client.recv_many, client.recv_batch, client.recv):
            with pytest.raises(EOFError):
                call()


@pytest.mark.parametrize("cut", [10, 40, 5000], ids=["in-header", "in-payload", "big"])
@pytest.mark.parametrize("method", ["recv", "recv_many", "recv_batch", "iterate"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_relay_gone_mid_frame_raises_connection_error_after_the_whole_frames(
        fake_relay: FakeRelay, flavour: str, method: str, cut: int) -> None:
    whole = frames_of([64, 300])
    with open_client(flavour, fake_relay.path) as client:
        conn = fake_relay.accept()
        conn.sendall(b"".join(whole) + frame(3, 10_000)[:cut])
        conn.close()
        got, end = read_to_the_end(client, method)
        assert got == whole
        assert isinstance(end, ConnectionError) and not isinstance(end, EOFError), end
        assert "middle of a frame" in str(end) and f"({cut} bytes received)" in str(end)


@pytest.mark.parametrize("good", [3, 20], ids=["after-3", "after-a-run-of-20"])
@pytest.mark.parametrize("method", ["recv", "recv_many", "recv_batch", "iterate"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_bad_magic_raises_protocol_error_naming_value_and_offset_after_the_good_frames(
        fake_relay: FakeRelay, flavour: str, method: str, good: int) -> None:
    frames = frames_of([64] * good)
    data = b"".join(frames) + bad_magic(frame(good + 1)) + frame(good + 2)
    with open_client(flavour, fake_relay.path) as client:
        fake_relay.accept().sendall(data)
        wait_unread(client, len(data))
        got, end = read_to_the_end(client, method)
        assert got == frames  # the frames before the bad one are delivered first
        assert isinstance(end, ProtocolError), end
        assert f"0x{BAD_MAGIC:08x}" in str(end)
        assert re.search(rf"\boffset {64 * good}\b", str(end)), str(end)
        with pytest.raises(ProtocolError):  # the stream is out of step: it stays an error
            client.recv_many(timeout=SHORT_S)


def test_bad_magic_in_a_later_read_names_its_offset_in_the_stream(
        fake_relay: FakeRelay) -> None:
    with open_client("blocking", fake_relay.path) as client:
        conn = fake_relay.accept()
        conn.sendall(b"".join(frames_of([64] * 3)))
        assert len(client.recv_many()) == 3
        conn.sendall(bad_magic(frame(4)))
        with pytest.raises(ProtocolError, match=r"\boffset 192\b"):
            client.recv_many()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_breaking_out_of_iteration_keeps_the_frames_not_yet_yielded(
        fake_relay: FakeRelay, flavour: str) -> None:
    frames = frames_of([64] * 5)
    with open_client(flavour, fake_relay.path) as client:
        fake_relay.accept().sendall(b"".join(frames))
        wait_unread(client, 5 * 64)
        for received in client:
            assert received == frames[0]
            break
        assert client.recv_many(timeout=SHORT_S) == frames[1:]


# ---------------------------------------------------------------------------------------
# Through a real relay
# ---------------------------------------------------------------------------------------


def test_consumers_of_every_kind_receive_the_same_bytes_through_a_relay(
        start_relay: StartRelay) -> None:
    relay = start_relay(max_message_size=BIG_MESSAGE)
    sizes = mixed_sizes(7, huge=1)
    sizes[10:10] = [700_000, BIG_MESSAGE]
    frames = frames_of(sizes)
    kinds = [("blocking", "recv"), ("blocking", "recv_many"), ("blocking", "recv_batch_max"),
             ("blocking", "iterate"), ("asyncio", "recv_many_max"), ("asyncio", "recv_batch"),
             ("asyncio", "iterate")]
    consumers = [open_client(flavour, relay.path) for flavour, _ in kinds]
    try:
        async def async_for_consumer() -> list[bytes]:
            async with await AsyncRelayClient.connect(relay.path, timeout=TIMEOUT_S) as client:
                relay.wait_clients(len(kinds) + 2)
                publish.set()
                got: list[bytes] = []
                async for received in client:
                    got.append(received)
                    if len(got) == len(frames):
                        break
                return got

        publish = threading.Event()
        with relay.client() as publisher:

            def send_when_all_connected() -> None:
                assert publish.wait(TIMEOUT_S)
                publisher.send_many(frames)

            sender = InThread(send_when_all_connected)
            got_async_for = asyncio.run(async_for_consumer())
            sender.finish()
            assert_same_frames(got_async_for, frames)
            for (flavour, method), consumer in zip(kinds, consumers, strict=True):
                got = read_frames(consumer, method, len(frames), seed=len(method))
                assert_same_frames(got, frames)
                assert b"".join(got) == b"".join(frames), f"{flavour} {method}"
    finally:
        for consumer in consumers:
            consumer.close()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_when_the_relay_stops_a_consumer_gets_every_frame_sent_then_the_end(
        start_relay: StartRelay, flavour: str) -> None:
    relay = start_relay()
    frames = frames_of([64] * 100 + [1000, 2000] + [64] * 30)
    with open_client(flavour, relay.path) as consumer, relay.client() as publisher:
        relay.wait_clients(2)
        publisher.send_many(frames)
        relay.wait_for(lambda: relay.stats().messages_out == len(frames))
        relay.stop()
        assert_same_frames(list(consumer), frames)
        with pytest.raises(EOFError):
            consumer.recv_many()


# ---------------------------------------------------------------------------------------
# The asyncio client in asyncio code
# ---------------------------------------------------------------------------------------


def test_async_client_sends_and_receives_in_order_and_async_with_closes_it(
        start_relay: StartRelay) -> None:
    relay = start_relay()
    frames = frames_of([64, 100, 64, 2000, 64])

    async def main() -> None:
        consumer = await AsyncRelayClient.connect(relay.path, timeout=TIMEOUT_S)
        async with consumer, await AsyncRelayClient.connect(relay.path) as publisher:
            relay.wait_clients(2)
            await publisher.send(frames[0])
            await publisher.send(bytearray(frames[1]))
            await publisher.send(memoryview(frames[2]))
            await publisher.send_many(iter(frames[3:]))
            got = [await consumer.recv()]
            while len(got) < len(frames):
                got += await consumer.recv_many()
            assert got == frames
            with pytest.raises(TimeoutError):
                await consumer.recv(timeout=SHORT_S)
        assert consumer.fileno() == -1 and publisher.fileno() == -1
        relay.wait_for(lambda: relay.stats().connections_active == 0)

    asyncio.run(main())


def test_async_for_ends_when_the_relay_stops(start_relay: StartRelay) -> None:
    relay = start_relay()
    frames = frames_of([64] * 20 + [300])

    async def main() -> list[bytes]:
        async with await AsyncRelayClient.connect(relay.path, timeout=TIMEOUT_S) as consumer:
            with relay.client() as publisher:
                relay.wait_clients(2)
                publisher.send_many(frames)
                relay.wait_for(lambda: relay.stats().messages_out == len(frames))
            relay.stop()
            got = [received async for received in consumer]
            with pytest.raises(EOFError):
                await consumer.recv_batch()
            return got

    assert asyncio.run(main()) == frames


@pytest.mark.parametrize("where", ["missing_path", "not_listening"])
def test_async_connect_where_no_relay_listens_raises_connection_error_saying_so(
        socket_path: str, where: str) -> None:
    if where == "not_listening":
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(socket_path)
        stale.close()

    async def main() -> None:
        await AsyncRelayClient.connect(socket_path, timeout=TIMEOUT_S)

    with pytest.raises(ConnectionError) as error:
        asyncio.run(main())
    assert "no relay is listening" in str(error.value)
    assert socket_path in str(error.value)


def test_a_client_the_relay_refuses_before_its_subscription_is_sent_raises_relay_refused(
        socket_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay that refuses a connection (over --max-connections, not in --allow-uid)
    writes an Error frame and closes. A client whose subscription meets the closed
    socket reads that frame and raises RelayRefused with the relay's own words. The
    fake relay refuses first and only then lets the client's sendall go, so the order
    is certain."""
    refused = threading.Event()

    class LateSendSocket(socket.socket):
        def sendall(self, data: Any, flags: int = 0) -> None:
            assert refused.wait(TIMEOUT_S), "the fake relay never refused"
            super().sendall(data, flags)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(1)
    listener.settimeout(TIMEOUT_S)

    def refuse() -> None:
        conn, _ = listener.accept()  # a LateSendSocket too (accept builds one): send()
        conn.send(logic.error_message("refused: the relay is at --max-connections 1"))
        conn.close()
        refused.set()

    refuser = threading.Thread(target=refuse, daemon=True)
    refuser.start()
    monkeypatch.setattr(relay.socket, "socket", LateSendSocket)
    try:
        with pytest.raises(RelayRefused) as error:
            RelayClient(socket_path, subscribe=[Domain.MARKET_DATA], timeout=TIMEOUT_S)
    finally:
        monkeypatch.undo()
        refuser.join(TIMEOUT_S)
        listener.close()
    assert str(error.value) == (f"the relay on {socket_path} refused: the relay is at "
                                "--max-connections 1")
    assert isinstance(error.value, ConnectionError)  # what callers already catch


def test_a_client_refused_after_it_connected_reads_the_reason_then_eof(
        start_relay: StartRelay) -> None:
    relay = start_relay(max_connections=1)
    with RelayClient(relay.path, timeout=TIMEOUT_S):
        relay.wait_for(lambda: relay.stats().connections_active == 1)
        with RelayClient(relay.path, timeout=TIMEOUT_S) as late:  # nothing to send
            header, tlvs = parse_message(late.recv())
            assert (header.relay_domain, tlvs[0][0]) == (Domain.SYSTEM, logic.TLV_ERROR)
            assert logic.decode_error(tlvs[0][1]).startswith("refused")
            with pytest.raises(EOFError):
                late.recv()


def test_async_client_subscription_options_reach_the_relay(start_relay: StartRelay) -> None:
    relay = start_relay()

    async def main() -> None:
        async with await AsyncRelayClient.connect(relay.path, subscribe=[TLV_TRADE],
                                                  timeout=TIMEOUT_S) as consumer:
            relay.wait_for(lambda: relay.stats().messages_in >= 1)  # its RELAY_SUBSCRIBE
            with relay.client() as publisher:
                publisher.send_many([gas_message(1), trade_message(2), gas_message(3)])
                assert await consumer.recv() == trade_message(2)
                relay.wait_for(lambda: relay.stats().messages_in >= 4)
                with pytest.raises(TimeoutError):
                    await consumer.recv_many(timeout=SHORT_S)

    asyncio.run(main())


# ---------------------------------------------------------------------------------------
# Reconnecting across a real relay restart on the same path
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["recv", "recv_many", "recv_batch"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_reconnecting_consumer_survives_a_relay_restart_and_says_so_in_band(
        start_relay: StartRelay, flavour: str, method: str) -> None:
    relay = start_relay()
    with open_client(flavour, relay.path, reconnect=True) as consumer:
        with relay.client() as publisher:
            relay.wait_clients(2)
            publisher.send_many(frames_of([64, 100, 64]))
            assert read_frames(consumer, method, 3) == frames_of([64, 100, 64])
        assert consumer.reconnects == 0
        started = time.monotonic()
        relay = restart(start_relay, relay)
        got = take(consumer, method, random.Random(0))
        outage_s = time.monotonic() - started
        assert len(got) == 1  # the notice alone: nothing else was sent yet
        notice = reconnected(got[0])
        assert 0 < notice.outage_ns <= outage_s * 1e9
        assert notice.attempts >= 1
        assert consumer.reconnects == 1
        with relay.client() as publisher:
            relay.wait_clients(2)
            later = frames_of([64, 200, 64], first_seq=10)
            publisher.send_many(later)
            assert read_frames(consumer, method, 3) == later


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_iteration_goes_on_across_a_relay_restart_with_the_notice_in_between(
        start_relay: StartRelay, flavour: str) -> None:
    relay = start_relay()
    with open_client(flavour, relay.path, reconnect=True) as consumer:
        frames = iter(consumer)
        with relay.client() as publisher:
            relay.wait_clients(2)
            publisher.send(frame(1))
            assert next(frames) == frame(1)
        relay = restart(start_relay, relay)
        assert reconnected(next(frames)).attempts >= 1
        with relay.client() as publisher:
            relay.wait_clients(2)
            publisher.send(frame(2))
            assert next(frames) == frame(2)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_subscription_is_sent_again_after_a_restart(start_relay: StartRelay,
                                                       flavour: str) -> None:
    relay = start_relay()
    with open_client(flavour, relay.path, subscribe=[TLV_TRADE], reconnect=True) as consumer:
        relay.wait_for(lambda: relay.stats().messages_in >= 1)  # the RELAY_SUBSCRIBE
        with relay.client() as publisher:
            publisher.send_many([gas_message(1), trade_message(2)])
            assert consumer.recv() == trade_message(2)
        relay = restart(start_relay, relay)
        reconnected(consumer.recv())
        relay.wait_for(lambda: relay.stats().messages_in >= 1)  # subscribed again
        with relay.client() as publisher:
            publisher.send_many([gas_message(3), trade_message(4), gas_message(5)])
            assert consumer.recv() == trade_message(4)
            relay.wait_for(lambda: relay.stats().messages_in >= 4)
            with pytest.raises(TimeoutError):  # the gas prices stay filtered
                consumer.recv_many(timeout=SHORT_S)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_connection_starts_with_the_same_subscription_and_a_torn_frame_is_dropped(
        fake_relay: FakeRelay, flavour: str) -> None:
    with open_client(flavour, fake_relay.path, subscribe=[TLV_TRADE, TLV_GAS_PRICE],
                     gap_notices=True, reconnect=True) as consumer:
        subscriptions = []
        for seq in (1, 3):
            conn = fake_relay.accept()
            head = conn.recv(HEADER_SIZE, socket.MSG_WAITALL)
            rest = conn.recv(HEADER.unpack(head)[7], socket.MSG_WAITALL)
            subscriptions.append(head + rest)
            # A whole frame, then the relay goes away inside the next one.
            conn.sendall(frame(seq) + frame(seq + 1)[:40])
            conn.close()
            assert consumer.recv() == frame(seq)
            notice = reconnected(consumer.recv())  # the torn frame is never returned
            assert notice.attempts >= 1
        assert subscriptions[0] == subscriptions[1]
        header, tlvs = parse_message(subscriptions[0])
        assert header.relay_domain == Domain.SYSTEM and tlvs[0][0] == RELAY_SUBSCRIBE
        wanted = decode_subscribe(tlvs[0][1])
        assert wanted.mode == SUBSCRIBE_TYPES and wanted.gap_notices
        assert wanted.tlv_types == {TLV_TRADE, TLV_GAS_PRICE}
        assert consumer.reconnects == 2


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_short_timeout_during_the_outage_raises_timeout_and_a_later_call_reconnects(
        start_relay: StartRelay, flavour: str) -> None:
    relay = start_relay()
    with open_client(flavour, relay.path, reconnect=True) as consumer:
        relay.wait_clients(1)
        relay.stop()
        with pytest.raises(TimeoutError):
            consumer.recv(timeout=0.3)  # the relay is gone and stays gone this long
        assert consumer.fileno() == -1  # between connections
        with pytest.raises(TimeoutError):
            consumer.recv_many(timeout=SHORT_S)
        relay = start_relay(socket_path=relay.path)

        def publish_once_it_is_back() -> None:
            relay.wait_clients(1)
            with relay.client() as publisher:
                relay.wait_clients(2)
                publisher.send(frame(1))

        publisher = InThread(publish_once_it_is_back)
        notice = reconnected(consumer.recv())
        assert notice.attempts >= 2  # connects failed while the relay was away
        assert notice.outage_ns >= 0.4e9
        assert consumer.recv() == frame(1)
        publisher.finish()
        assert consumer.fileno() >= 0 and consumer.reconnects == 1


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_after_a_timeout_in_the_outage_the_notice_comes_at_once_from_a_quiet_relay(
        start_relay: StartRelay, flavour: str) -> None:
    relay = start_relay()
    with open_client(flavour, relay.path, reconnect=True) as consumer:
        relay.wait_clients(1)
        relay.stop()
        with pytest.raises(TimeoutError):
            consumer.recv(timeout=SHORT_S)
        start_relay(socket_path=relay.path)
        reconnected(consumer.recv(timeout=1.0))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_after_reconnect_timeout_without_a_relay_the_client_raises_connection_error(
        start_relay: StartRelay, flavour: str) -> None:
    relay = start_relay()
    with open_client(flavour, relay.path, reconnect=True, reconnect_timeout=0.3) as consumer:
        relay.wait_clients(1)
        relay.stop()
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="gave up reconnecting") as error:
            consumer.recv_many()  # the client's timeout is 5 s: the 0.3 s limit ends it
        assert not isinstance(error.value, EOFError)
        assert time.monotonic() - started < TIMEOUT_S
        assert consumer.reconnects == 0


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_send_that_failed_because_the_relay_went_away_is_sent_again_once_reconnected(
        start_relay: StartRelay, flavour: str) -> None:
    relay = start_relay()
    with open_client(flavour, relay.path, reconnect=True) as publisher:
        relay.wait_clients(1)
        relay = restart(start_relay, relay)
        with relay.client() as consumer:
            relay.wait_clients(1)
            publisher.send(frame(1))  # hits the closed connection, then the new relay
            assert consumer.recv() == frame(1)
            publisher.send_many([frame(2), frame(3)])
            assert [consumer.recv(), consumer.recv()] == [frame(2), frame(3)]
        assert publisher.reconnects == 1
        reconnected(publisher.recv())  # the outage is still told to the reader


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_frames_delivered_before_a_restart_are_kept_when_a_send_finds_the_relay_gone(
        start_relay: StartRelay, flavour: str) -> None:
    relay = start_relay()
    frames = frames_of([64] * 3)
    with open_client(flavour, relay.path, reconnect=True) as client:
        with relay.client() as publisher:
            relay.wait_clients(2)
            publisher.send_many(frames)
            relay.wait_for(lambda: relay.stats().messages_out == 3)
        relay = restart(start_relay, relay)
        client.send(frame(9))  # a client that publishes and consumes
        got = [client.recv(timeout=SHORT_S) for _ in range(4)]
        assert [f for f in got if domain_of(f) != Domain.SYSTEM] == frames


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_reconnects_counts_every_restart(start_relay: StartRelay, flavour: str) -> None:
    relay = start_relay()
    with open_client(flavour, relay.path, reconnect=True) as consumer:
        for restarts in (1, 2, 3):
            relay.wait_clients(1)
            relay = restart(start_relay, relay)
            reconnected(consumer.recv())
            assert consumer.reconnects == restarts


def test_async_reconnect_in_asyncio_code(start_relay: StartRelay) -> None:
    relay = start_relay()

    async def main() -> None:
        async with await AsyncRelayClient.connect(relay.path, reconnect=True,
                                                  timeout=TIMEOUT_S) as consumer:
            relay.wait_clients(1)
            new = restart(start_relay, relay)
            notice = await consumer.recv_batch()
            assert len(notice) == 1 and reconnected(notice[0]).attempts >= 1
            with new.client() as publisher:
                new.wait_clients(2)
                publisher.send(frame(7))
                async for received in consumer:
                    assert received == frame(7)
                    break
            assert consumer.reconnects == 1

    asyncio.run(main())


# ---------------------------------------------------------------------------------------
# Replay options (issue 12's; here only that the option reaches the relay)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_replay_last_makes_the_client_receive_a_relay_live_marker(start_relay: StartRelay,
                                                                 flavour: str) -> None:
    relay = start_relay(retain=100)
    with relay.client() as publisher:
        publisher.send_many(frames_of([64] * 3))
        relay.wait_for(lambda: relay.stats().messages_in == 3)
    with open_client(flavour, relay.path, replay_last=10) as joiner:
        got = read_frames(joiner, "recv_many", 4)
        marker = got[-1]
        assert domain_of(marker) == Domain.SYSTEM
        tlvs = parse_message(marker).tlvs
        assert tlvs[0][0] == RELAY_LIVE
        assert decode_live(tlvs[0][1]).replayed == 3
        assert got[:3] == frames_of([64] * 3)


# ---------------------------------------------------------------------------------------
# The command line consumers: tail and record read in batches
# ---------------------------------------------------------------------------------------


def test_tail_reconnect_survives_a_relay_restart_and_prints_a_reconnected_line(
        start_relay: StartRelay, cli: Cli, socket_path: str, socket_dir: str) -> None:
    out_path = os.path.join(socket_dir, "tail.out")
    relay = start_relay()
    with open(out_path, "w") as out:
        tail = cli("tail", "--socket", socket_path, "--reconnect", stdout=out)
    wait_subscribed(relay)
    with relay.client() as publisher:
        publisher.send(trade_message(1))
        wait_until(lambda: "seq=1 " in read_text(out_path), "tail to print seq 1")
    relay = restart(start_relay, relay)
    wait_subscribed(relay)  # tail came back and subscribed again
    wait_until(lambda: "RECONNECTED after" in read_text(out_path), "the RECONNECTED line")
    with relay.client() as publisher:
        publisher.send(trade_message(2))
        wait_until(lambda: "seq=2 " in read_text(out_path), "tail to print seq 2")
    tail.send_signal(signal.SIGTERM)
    _, err = tail.communicate(timeout=TIMEOUT_S)
    assert tail.returncode == 0, err
    lines = read_text(out_path).splitlines()
    assert len(lines) == 3, lines
    assert "seq=1 " in lines[0] and "RECONNECTED after" in lines[1] and "seq=2 " in lines[2]


def test_tail_count_prints_exactly_that_many_lines_from_one_burst(
        start_relay: StartRelay, cli: Cli, socket_path: str) -> None:
    relay = start_relay()
    tail = cli("tail", "--socket", socket_path, "--count", "3")
    wait_subscribed(relay)
    with relay.client() as publisher:
        publisher.send_many([trade_message(seq) for seq in range(1, 101)])  # one chunk
        out, err = tail.communicate(timeout=TIMEOUT_S)
    assert tail.returncode == 0, err
    lines = out.splitlines()
    assert [f"seq={seq} " in line for seq, line in enumerate(lines, 1)] == [True] * 3


def test_record_count_writes_exactly_the_first_frames_byte_for_byte(
        start_relay: StartRelay, cli: Cli, socket_path: str, socket_dir: str) -> None:
    record_path = os.path.join(socket_dir, "feed.rec")
    relay = start_relay()
    frames = frames_of([64] * 70 + [100, 3000, 64] * 20 + [64] * 40)
    record = cli("record", record_path, "--socket", socket_path, "--count", "100")
    wait_subscribed(relay)
    with relay.client() as publisher:
        publisher.send_many(frames)
        _, err = record.communicate(timeout=TIMEOUT_S)
    assert record.returncode == 0, err
    assert "recorded 100 frames" in err
    with open(record_path, "rb") as f:
        assert f.read() == b"".join(frames[:100])
