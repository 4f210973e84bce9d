"""torq-relay: a zero-dependency relay for Protocol V2 messages over a Unix socket.

One relay serves one domain; every valid message a client sends reaches every *other*
client, whole and in order. Copy this file and ``logic.py`` into your repository.

    python relay.py --domain market_data                 # serve (Ctrl-C to stop)
    python relay.py --domain market_data tail            # print every message
    python relay.py --domain market_data send --count 5  # publish five Trades

    import threading
    from logic import MarketDataLogic, build_message, trade
    from relay import Relay, RelayClient
    relay = Relay(MarketDataLogic(), socket_path="/tmp/x.sock")
    threading.Thread(target=relay.serve_forever).start()
    with RelayClient("/tmp/x.sock") as consumer, RelayClient("/tmp/x.sock") as producer:
        producer.send(build_message(1, source=1, tlvs=[trade(1, 100, 1, 0, 100, 1, 0)]))
        print(consumer.recv(timeout=1.0))
    relay.shutdown()

Reading order: constants, ``Stats``, ``Client`` (one connection), ``Relay`` (setup,
loop, read path, write path, overflow, shutdown), ``RelayClient``, the command line.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

import logic
from logic import (
    CHECKSUM_OFFSET,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    OVERFLOW_POLICIES,
    RELAY_GAP,
    RELAY_SOURCE,
    RELAY_SUBSCRIBE,
    SUBSCRIBE_ALL,
    SUBSCRIBE_NONE,
    SUBSCRIBE_TYPES,
    TLV_NAMES,
    VERSION,
    Domain,
    Header,
    ProtocolError,
    RelayLogic,
)

__all__ = ["Relay", "RelayClient", "RelayError", "Stats", "main"]

log = logging.getLogger("relay")

# ---------------------------------------------------------------------------------------
# Constants and defaults
# ---------------------------------------------------------------------------------------

BUFFER_SIZE = 64 * 1024  # per-connection read buffer; a larger frame grows it
QUEUE_LIMIT = 10_000  # messages pending for one client (the original broadcast channel)
QUEUE_BYTES = 64 * 1024 * 1024  # bytes pending for one client
LOW_WATER_DIVISOR = 4  # backpressure resumes when every queue is under limit / 4
MAX_CONNECTIONS = 1000
STALL_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 1.0
STATS_INTERVAL_S = 10.0
BUSY_POLL_S = 0.0001  # after traffic, poll without sleeping this long (0 = never)
SOCKET_MODE = 0o600
PARENT_DIR_MODE = 0o700
LISTEN_BACKLOG = 4096
WARNING_INTERVAL_S = 1.0  # at most one drop / reject / fd warning per second per cause
ACCEPT_RETRY_S = 0.1  # how long to stop accepting when out of file descriptors
UNIFORM_RUN_MIN_FRAMES = 16  # column checks pay off from about this many frames
UNIFORM_RUN_MIN_BYTES = UNIFORM_RUN_MIN_FRAMES * HEADER_SIZE  # fewer bytes cannot hold that many
UNIFORM_RETRY_BYTES = 16 * 1024  # policy domains: retry column checks this far on
WRITE_BATCH_CHUNKS = 64  # chunks handed to one sendmsg (writev) call
FAILED_WRITER_READS = 64  # reads (of up to 64 KiB) from a client whose write failed
CONNECT_PROBE_TIMEOUT_S = 1.0

# magic u32 | domain+version u16 (domain in the low byte) | payload_size u32.
_FRAME_START = struct.Struct("<IH18xI")
_CHECKSUM = struct.Struct("<I")
_FRAME_KEY_VERSION = VERSION << 8
_BYTES = [bytes((value,)) for value in range(256)]  # one-byte bytes, no allocation per use
_WOULD_BLOCK = (BlockingIOError, InterruptedError)
_FD_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class RelayError(RuntimeError):
    """The relay cannot start or run; the message is one line a user can act on."""


# ---------------------------------------------------------------------------------------
# Stats
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """A snapshot of the relay's counters (``Relay.stats()``).

    ``messages_out`` counts deliveries: one message written to one client.
    """

    connections_active: int
    connections_total: int
    connections_rejected: int
    messages_in: int
    bytes_in: int
    messages_out: int
    bytes_out: int
    messages_filtered: int
    messages_invalid: int
    protocol_errors: int
    messages_dropped: int
    slow_disconnects: int
    backpressure_pauses: int


# ---------------------------------------------------------------------------------------
# Client: one accepted connection
# ---------------------------------------------------------------------------------------

# A pending entry: (chunk, messages in it, messages a gap notice announces (0 for data)).
Entry = tuple[bytes, int, int]


class Client:
    """Per-connection state: the read buffer, the pending queue and the subscription."""

    __slots__ = (
        "id", "sock", "fileno", "buffer", "view", "fill", "received", "base",
        "pending", "sent", "pending_messages", "pending_bytes",
        "mode", "types", "gap_notices", "dropped_total", "dropped_unlogged",
        "last_drop_log", "last_progress", "blocked_at", "reading", "writing", "closed",
        "messages_in", "messages_out",
    )

    def __init__(self, client_id: int, sock: socket.socket) -> None:
        self.id = client_id
        self.sock = sock
        self.fileno = sock.fileno()
        self.buffer: bytearray | None = None  # allocated on the first read: most clients
        self.view: memoryview | None = None   # only consume, and 1000 x 64 KiB adds up
        self.fill = 0  # bytes of an incomplete frame kept at the start of the buffer
        self.received = 0  # bytes received so far
        self.base = 0  # stream offset of buffer[0]: log lines name offsets in the stream
        self.pending: collections.deque[Entry] = collections.deque()
        self.sent = 0  # bytes of pending[0] already written
        self.pending_messages = 0
        self.pending_bytes = 0
        self.mode = SUBSCRIBE_ALL
        self.types: frozenset[int] = frozenset()
        self.gap_notices = False
        self.dropped_total = 0
        self.dropped_unlogged = 0
        self.last_drop_log = 0.0
        self.last_progress = time.monotonic()  # the last write that made progress
        self.blocked_at = 0.0  # when the relay paused (or stayed paused) because of it
        self.reading = True
        self.writing = False
        self.closed = False
        self.messages_in = 0
        self.messages_out = 0

    def __repr__(self) -> str:
        return f"<Client {self.id} pending={self.pending_messages} mode={self.mode}>"


# ---------------------------------------------------------------------------------------
# Relay: the engine
# ---------------------------------------------------------------------------------------


class Relay:
    """A single-threaded ``selectors`` relay for one domain on one Unix socket.

    Binds the socket at construction (so clients may connect at once); ``serve_forever``
    runs the loop until SIGINT/SIGTERM or ``shutdown()``. Every limit has a keyword
    override; ``overflow`` and ``max_message_size`` default to the logic's.
    """

    def __init__(self, logic_: RelayLogic, *, socket_path: str | None = None,
                 queue_limit: int = QUEUE_LIMIT, queue_bytes: int = QUEUE_BYTES,
                 max_connections: int = MAX_CONNECTIONS, overflow: str | None = None,
                 max_message_size: int | None = None,
                 stall_timeout: float = STALL_TIMEOUT_S,
                 drain_timeout: float = DRAIN_TIMEOUT_S, socket_mode: int = SOCKET_MODE,
                 stats_interval: float = STATS_INTERVAL_S,
                 busy_poll: float = BUSY_POLL_S) -> None:
        self.logic = logic.validate_logic(logic_)
        self.socket_path = socket_path or self.logic.socket_path
        self.overflow = overflow or self.logic.overflow
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow policy {self.overflow!r} unknown; "
                             f"use one of {', '.join(OVERFLOW_POLICIES)}")
        self.max_message_size = max_message_size or self.logic.max_message_size
        if not HEADER_SIZE <= self.max_message_size <= logic.MAX_MESSAGE_SIZE:
            raise ValueError(f"max_message_size {self.max_message_size} must be "
                             f"{HEADER_SIZE}..{logic.MAX_MESSAGE_SIZE}")
        if queue_limit < 1 or queue_bytes < 1:
            raise ValueError(f"queue limits must be positive, got {queue_limit} messages "
                             f"and {queue_bytes} bytes")
        self.queue_limit = queue_limit
        self.queue_bytes = queue_bytes
        self.low_water = queue_limit // LOW_WATER_DIVISOR
        self.low_water_bytes = queue_bytes // LOW_WATER_DIVISOR
        self.max_connections = max_connections
        self.stall_timeout = stall_timeout
        self.drain_timeout = drain_timeout
        self.socket_mode = socket_mode
        self.stats_interval = stats_interval
        self.busy_poll = busy_poll

        self.domain = int(self.logic.domain)
        self.checksum_policy = self.logic.checksum
        self.tlv_types = self.logic.tlv_types
        self.relay_source = int(RELAY_SOURCE.get(self.domain, logic.Source.MARKET_DATA_RELAY))
        # The default filter (domain equality) with no checksum or TLV policy takes the
        # fast loop; otherwise _forward_checked checks this domain's frames inline and
        # sends other frames (and every frame, for a custom filter) to _accept_frame.
        # The fast loop leaves the size check to "frame fits the buffer", which holds
        # only when the buffer never outgrows max_message_size.
        self.default_filter = logic.uses_default_filter(self.logic)
        self.fast_path = (self.default_filter and self.checksum_policy == "off"
                          and self.tlv_types is None and self.domain != Domain.SYSTEM
                          and self.max_message_size >= BUFFER_SIZE)

        # Counters (Stats); plain ints so the hot path pays one attribute store each.
        self.connections_total = 0
        self.connections_rejected = 0
        self.messages_in = 0
        self.bytes_in = 0
        self.messages_out = 0
        self.bytes_out = 0
        self.messages_filtered = 0
        self.messages_invalid = 0
        self.protocol_errors = 0
        self.messages_dropped = 0
        self.slow_disconnects = 0
        self.backpressure_pauses = 0

        self.clients: dict[int, Client] = {}
        self.receivers: list[Client] = []  # mode 0: every message. Rebuilt, never mutated,
        self.selective: list[Client] = []  # so a close during a fan-out is safe.
        self.paused = False  # backpressure: reading from every client stopped
        self.paused_at = 0.0
        self.blocking: set[Client] = set()  # clients over low water while paused
        self.failed_writers: list[Client] = []  # write failed: read what they sent, close
        self.next_client_id = 1
        self.column_cache: dict[int, tuple[tuple[int, bytes], ...]] = {}
        # byte -> b"\1" for an accepted TLV type (never 255, the extended marker), else 0
        self.tlv_type_table = bytes(
            1 if self.tlv_types is not None and t in self.tlv_types and t != 255 else 0
            for t in range(256))
        self.gap_sequence = 0
        self.last_warning: dict[str, float] = {}
        self.accept_resume_at = 0.0
        self.accept_deferred = False  # at max_connections: one loop turn granted to EOFs
        self.stopping = False
        self.serving = False
        self.stats_requested = False
        self.stopped = threading.Event()
        self.started_at = time.monotonic()
        self.last_stats: tuple[float, Stats] = (self.started_at, self.stats())

        self.selector = selectors.DefaultSelector()
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.wake_writer.setblocking(False)
        self.selector.register(self.wake_reader, selectors.EVENT_READ, None)
        self.spare_fd: int | None = os.open(os.devnull, os.O_RDONLY)
        self.listener: socket.socket | None = None
        self.socket_id: tuple[int, int] | None = None
        try:
            self._listen()
        except BaseException:
            self._release()
            raise

    # -- setup ---------------------------------------------------------------------------

    def _listen(self) -> None:
        """Bind the Unix socket; refuse to steal a live relay's or touch a non-socket."""
        path = self.socket_path
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            try:
                os.makedirs(parent, mode=PARENT_DIR_MODE, exist_ok=True)
                os.chmod(parent, PARENT_DIR_MODE)
            except OSError as exc:
                raise RelayError(f"cannot create {parent}: {exc.strerror}") from None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RelayError(f"cannot use {path}: {exc.strerror or exc}") from None
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise RelayError(f"{path} exists and is not a socket; refusing to touch it: "
                                 "remove it or pass --socket")
            if self._relay_answers(path):
                raise RelayError(f"another relay is already listening on {path}; "
                                 "stop it or pass --socket")
            log.info("removing stale socket %s (no relay answers there)", path)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
        except OSError as exc:
            listener.close()
            if exc.errno == errno.EADDRINUSE:
                raise RelayError(f"another relay is already listening on {path}; "
                                 "stop it or pass --socket") from None
            raise RelayError(f"cannot bind {path}: {exc.strerror or exc}") from None
        try:
            # chmod before listen(): no client can connect until the mode is right.
            os.chmod(path, self.socket_mode)
            st = os.stat(path)
            self.socket_id = (st.st_dev, st.st_ino)
            listener.listen(LISTEN_BACKLOG)
        except OSError as exc:
            listener.close()
            raise RelayError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        listener.setblocking(False)
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ, None)
        log.info("%s relay listening on %s (overflow %s, checksum %s, max message %d B)",
                 self.logic.name, path, self.overflow, self.checksum_policy,
                 self.max_message_size)

    @staticmethod
    def _relay_answers(path: str) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(CONNECT_PROBE_TIMEOUT_S)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # it exists and did not refuse (e.g. backlog full): a live relay
        finally:
            probe.close()
        return True

    # -- public API ----------------------------------------------------------------------

    def stats(self) -> Stats:
        """A snapshot of the counters; safe to call from any thread."""
        return Stats(
            connections_active=len(self.clients),
            connections_total=self.connections_total,
            connections_rejected=self.connections_rejected,
            messages_in=self.messages_in,
            bytes_in=self.bytes_in,
            messages_out=self.messages_out,
            bytes_out=self.bytes_out,
            messages_filtered=self.messages_filtered,
            messages_invalid=self.messages_invalid,
            protocol_errors=self.protocol_errors,
            messages_dropped=self.messages_dropped,
            slow_disconnects=self.slow_disconnects,
            backpressure_pauses=self.backpressure_pauses,
        )

    def shutdown(self) -> None:
        """Ask ``serve_forever`` to drain and stop; safe from any thread or a signal
        handler. Returns at once; ``stopped`` is set when the loop has finished."""
        self.stopping = True
        self._wake()

    def log_stats(self) -> None:
        """Ask the loop to log one stats line now (what SIGUSR1 does)."""
        self.stats_requested = True
        self._wake()

    def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM or ``shutdown()``, then drain and clean up.

        Signal handlers are installed only when called from the main thread.
        """
        if self.stopped.is_set() or self.serving:
            raise RelayError("serve_forever() can run once per Relay; make a new one")
        self.serving = True
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum, handler in ((signal.SIGINT, self._on_stop_signal),
                                    (signal.SIGTERM, self._on_stop_signal),
                                    (signal.SIGUSR1, self._on_stats_signal)):
                previous[signum] = signal.signal(signum, handler)
            # A signal that lands just before select() sleeps, or on another thread,
            # would wait for the next event to be handled: the wake-up fd makes
            # select() return at once.
            previous_wakeup_fd = signal.set_wakeup_fd(self.wake_writer.fileno(),
                                                      warn_on_full_buffer=False)
        try:
            self._loop()
            self._drain()
        finally:
            if previous:  # before _release closes the wake-up socket
                signal.set_wakeup_fd(previous_wakeup_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._release()
            self._log_stats(final=True)
            self.stopped.set()

    def close(self, timeout: float | None = None) -> None:
        """Stop serving (if ``serve_forever`` runs in another thread, wait up to
        ``timeout`` for it to drain and finish), or release the socket and every
        connection of a relay that never served."""
        if self.serving:
            self.shutdown()
            self.stopped.wait(timeout)
        elif not self.stopped.is_set():
            self._release()
            self.stopped.set()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("%s received: draining and stopping", signal.Signals(signum).name)
        self.shutdown()

    def _on_stats_signal(self, signum: int, frame: FrameType | None) -> None:
        self.log_stats()

    def _wake(self) -> None:
        try:
            self.wake_writer.send(b"\0")
        except OSError:
            pass  # already awake (buffer full) or closed

    # -- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        select = self.selector.select
        listener = self.listener
        wake_reader = self.wake_reader
        next_stats = (time.monotonic() + self.stats_interval if self.stats_interval > 0
                      else float("inf"))
        busy_poll = self.busy_poll
        monotonic = time.monotonic
        spin_until = 0.0
        while not self.stopping:
            if busy_poll and monotonic() < spin_until:
                # Busy polling: right after traffic, poll without sleeping so the next
                # frame is seen without a wake-up (p50 one hop 42 -> ~25 us).
                events = select(0)
                if events:
                    spin_until = monotonic() + busy_poll
            else:
                events = select(self._timeout(next_stats))
                spin_until = monotonic() + busy_poll
            for key, mask in events:
                client = key.data
                if client is not None:
                    if client.closed:
                        continue  # closed earlier in this batch (e.g. by a failed write)
                    if mask & selectors.EVENT_WRITE:
                        self._write_ready(client)
                    if mask & selectors.EVENT_READ and client.reading and not client.closed:
                        self._read_ready(client)
                elif key.fileobj is listener:
                    self._accept_ready()
                elif key.fileobj is wake_reader:
                    self._drain_wake()
            if self.failed_writers:
                self._finish_failed_writers()
            now = time.monotonic()
            if self.paused:
                self._check_stalls(now)
            if self.accept_resume_at and now >= self.accept_resume_at:
                self._resume_accepting()
            if self.stats_requested:
                self.stats_requested = False
                self._log_stats()
            if now >= next_stats:
                next_stats = now + self.stats_interval
                self._log_stats()

    def _timeout(self, next_stats: float) -> float | None:
        deadline = next_stats
        if self.paused and self.blocking:
            deadline = min(deadline, *(max(c.blocked_at, c.last_progress) + self.stall_timeout
                                       for c in self.blocking))
        if self.accept_resume_at:
            deadline = min(deadline, self.accept_resume_at)
        if deadline == float("inf"):
            return None
        return max(0.0, deadline - time.monotonic())

    def _drain_wake(self) -> None:
        try:
            while self.wake_reader.recv(4096):
                pass
        except OSError:
            pass

    # -- accepting -----------------------------------------------------------------------

    def _accept_ready(self) -> None:
        """Accept until the listener would block; over max_connections, accept and close.

        At the limit, the first time, wait one loop turn: clients that have just left
        (their EOF is in this same batch of events) are then gone, and a newcomer gets
        their place instead of being refused. The listener stays readable meanwhile.
        """
        listener = self.listener
        assert listener is not None
        if len(self.clients) >= self.max_connections and not self.accept_deferred:
            self.accept_deferred = True
            return
        while True:
            try:
                sock, _ = listener.accept()
            except _WOULD_BLOCK:
                self.accept_deferred = False
                return
            except OSError as exc:
                if exc.errno in _FD_EXHAUSTED:
                    self._out_of_descriptors(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            if len(self.clients) >= self.max_connections:
                sock.close()
                self.connections_rejected += 1
                self._warn("reject", "refused a connection: %d clients connected, the "
                           "limit is --max-connections %d (%d refused so far)",
                           len(self.clients), self.max_connections,
                           self.connections_rejected)
                continue
            self._add_client(sock)

    def _add_client(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        client = Client(self.next_client_id, sock)
        self.next_client_id += 1
        self.connections_total += 1
        self.clients[client.fileno] = client
        if self.paused:
            client.reading = False  # joins the pause; resumes with everyone else
        else:
            self.selector.register(sock, selectors.EVENT_READ, client)
        self._rebuild_receivers()
        log.debug("client %d: connected (%d active)", client.id, len(self.clients))

    def _out_of_descriptors(self, exc: OSError) -> None:
        """EMFILE/ENFILE: refuse the waiting client with the spare descriptor so it gets
        a clean close instead of hanging, and never spin on a listener that stays
        readable."""
        self._warn("fd", "out of file descriptors (%s) with %d clients: refusing new "
                   "connections until some leave; raise the limit with ulimit -n",
                   errno.errorcode.get(exc.errno or 0, exc), len(self.clients))
        listener = self.listener
        assert listener is not None
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
            try:
                sock, _ = listener.accept()
                sock.close()
                self.connections_rejected += 1
            except OSError:
                pass
            try:
                self.spare_fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                self.spare_fd = None
        # Stop watching the listener for a moment: with level-triggered readiness a
        # listener we cannot drain would otherwise wake the loop without end.
        self.selector.unregister(listener)
        self.accept_resume_at = time.monotonic() + ACCEPT_RETRY_S

    def _resume_accepting(self) -> None:
        self.accept_resume_at = 0.0
        if self.listener is not None and not self.stopping:
            self.selector.register(self.listener, selectors.EVENT_READ, None)
        if self.spare_fd is None:
            try:
                self.spare_fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                pass

    # -- the read path: one recv, walk the frames, forward runs of accepted frames -------

    def _read_ready(self, client: Client) -> None:
        buffer = client.buffer
        if buffer is None:
            buffer = client.buffer = bytearray(BUFFER_SIZE)
            client.view = memoryview(buffer)
        view = client.view
        assert view is not None
        fill = client.fill
        try:
            received = client.sock.recv_into(view[fill:])
        except _WOULD_BLOCK:
            return
        except OSError as exc:
            self._close(client, f"read failed: {exc.strerror or exc}", vanished=True)
            return
        if not received:
            why = "closed the connection" if not fill else (
                f"closed the connection with {fill} bytes of an incomplete frame")
            self._close(client, why, vanished=True)
            return
        self.bytes_in += received
        client.received += received
        end = fill + received
        client.base = client.received - end  # stream offset of buffer[0], for log lines
        if self.fast_path:
            pos = self._forward_fast(client, buffer, end)
        else:
            pos = self._forward_checked(client, buffer, end)
        if pos == end and len(buffer) == BUFFER_SIZE:
            client.fill = 0  # the common case of _keep_rest: nothing left over
        elif pos >= 0:  # -1: a framing error closed the client
            self._keep_rest(client, buffer, pos, end)

    def _forward_fast(self, client: Client, buffer: bytearray, end: int) -> int:
        """Walk and forward frames of the default-filter, no-policy domain.

        Returns where the incomplete rest starts, or -1 if the client was closed.
        """
        unpack = _FRAME_START.unpack_from
        key = self.domain | _FRAME_KEY_VERSION
        last = end - HEADER_SIZE
        pos = start = count = total = 0
        uniform = True  # try column checks until one finds no long run in this read
        while True:
            if uniform and end - pos >= UNIFORM_RUN_MIN_BYTES:
                frames, size = self._uniform_run(buffer, pos, end)
                if frames:
                    pos += frames * size
                    count += frames
                else:
                    uniform = False
            # The per-frame loop, shaped for speed: locals only, magic and
            # domain+version compared as two ints, the size check implied by
            # "the frame fits the buffer" (see fast_path). ~150 ns a frame.
            while pos <= last:
                magic, domain_version, payload_size = unpack(buffer, pos)
                if magic != 0xDEADBEEF or domain_version != key:
                    break
                nxt = pos + HEADER_SIZE + payload_size
                if nxt > end:
                    break
                pos = nxt
                count += 1
            else:
                break
            # A frame that is not plain data of this domain, or does not fit yet.
            magic, domain_version, payload_size = unpack(buffer, pos)
            nxt = pos + HEADER_SIZE + payload_size
            if (magic == MAGIC and domain_version >> 8 == VERSION and nxt <= end
                    and nxt - pos <= self.max_message_size):
                if count:
                    self._broadcast(client, bytes(memoryview(buffer)[start:pos]), count)
                    total += count
                    count = 0
                total += 1
                self._handle_other(client, buffer, pos, nxt, domain_version & 0xFF)
                pos = start = nxt
                continue
            if magic == MAGIC and domain_version >> 8 == VERSION and (
                    HEADER_SIZE + payload_size <= self.max_message_size):
                break  # a valid frame still arriving
            if count:
                self._broadcast(client, bytes(memoryview(buffer)[start:pos]), count)
                total += count
            self._count_in(client, total)
            self._protocol_error(client, buffer, pos)
            return -1
        if count:
            self._broadcast(client, bytes(memoryview(buffer)[start:pos]), count)
            total += count
        self.messages_in += total
        client.messages_in += total
        return pos

    def _uniform_run(self, buffer: bytearray, pos: int, end: int) -> tuple[int, int]:
        """How many whole frames from ``pos`` on are valid frames of this domain with
        the same size as the first: ``(frames, size)``, or ``(0, 0)`` if too few.

        Shaped for speed: a feed of same-size messages (all Trades, all 64-byte bench
        frames) is validated a header *column* at a time: ``buffer[pos+i:stop:size]``
        gathers byte i of every frame in C and ``lstrip`` finds the first frame whose
        byte differs. Ten columns (magic, domain, version, payload_size) prove what
        the per-frame loop would: if frame j is valid and has the first frame's
        size, frame j+1 starts exactly ``size`` bytes later. ~12 ns a frame instead
        of ~150 ns; a stream of mixed sizes falls back to the per-frame loop.
        """
        if end - pos < UNIFORM_RUN_MIN_BYTES:
            return 0, 0
        size = HEADER_SIZE + _FRAME_START.unpack_from(buffer, pos)[2]
        if size > self.max_message_size:
            return 0, 0  # the frame-by-frame walk reports it as a protocol error
        frames = (end - pos) // size
        if frames < UNIFORM_RUN_MIN_FRAMES:
            return 0, 0
        for offset, expected in self._uniform_columns(size):
            rest = buffer[pos + offset:pos + frames * size:size].lstrip(expected)
            if rest:
                frames -= len(rest)
                if frames < UNIFORM_RUN_MIN_FRAMES:
                    return 0, 0
        return frames, size

    def _checked_run(self, buffer: bytearray, pos: int, end: int) -> tuple[int, int]:
        """``_uniform_run`` for a domain with checksum and TLV policies: the run's
        frames must also hold one standard TLV of an accepted type (two more columns)
        and pass the checksum policy (still one CRC a frame: ~0.3 us instead of ~0.75)."""
        frames, size = self._uniform_run(buffer, pos, end)
        if not frames:
            return 0, 0
        if self.tlv_types is not None:
            length = size - HEADER_SIZE - 2
            if not 0 <= length <= 255:
                return 0, 0
            first = pos + HEADER_SIZE
            frames -= len(buffer[first + 1:pos + frames * size:size].lstrip(_BYTES[length]))
            types = buffer[first:pos + frames * size:size]
            frames -= len(types.translate(self.tlv_type_table).lstrip(b"\1"))
        if self.checksum_policy != "off" and frames:
            unpack_checksum = _CHECKSUM.unpack_from
            crc32 = zlib.crc32
            view = memoryview(buffer)
            require = self.checksum_policy == "require"
            stop = pos + frames * size
            at = pos
            while at < stop:
                stored = unpack_checksum(buffer, at + CHECKSUM_OFFSET)[0]
                if stored:
                    if crc32(view[at + HEADER_SIZE:at + size],
                             crc32(view[at:at + CHECKSUM_OFFSET])) != stored:
                        break
                elif require:
                    break
                at += size
            frames = (at - pos) // size
        return frames, size

    def _uniform_columns(self, size: int) -> tuple[tuple[int, bytes], ...]:
        """The (offset, byte) pairs every frame of ``size`` bytes of this domain has:
        magic, domain, version and payload_size. Cached per size."""
        columns = self.column_cache.get(size)
        if columns is None:
            expected = struct.pack("<IBB", MAGIC, self.domain, VERSION)
            expected_size = struct.pack("<I", size - HEADER_SIZE)
            columns = tuple((i, expected[i:i + 1]) for i in range(6)) + tuple(
                (24 + i, expected_size[i:i + 1]) for i in range(4))
            if len(self.column_cache) > 64:
                self.column_cache.clear()
            self.column_cache[size] = columns
        return columns

    def _forward_checked(self, client: Client, buffer: bytearray, end: int) -> int:
        """Walk and forward frames applying the domain's checksum, TLV and filter
        policies to each; same contract as ``_forward_fast``."""
        unpack = _FRAME_START.unpack_from
        unpack_checksum = _CHECKSUM.unpack_from
        crc32 = zlib.crc32
        tlvs_ok = logic.tlvs_ok
        view = memoryview(buffer)
        max_size = self.max_message_size
        accept = self._accept_frame
        # Frames of this domain are checked inline when the filter is the default one;
        # -1 never matches, so a custom filter (or a system-domain logic, whose frames
        # may be control frames) sends every frame to _accept_frame.
        inline = self.default_filter and self.domain != Domain.SYSTEM
        key = self.domain | _FRAME_KEY_VERSION if inline else -1
        verify = self.checksum_policy != "off"
        require = self.checksum_policy == "require"
        tlv_types = self.tlv_types
        checked_run = self._checked_run
        retry_at = 0 if inline else end  # when to try a column-checked run
        last = end - HEADER_SIZE
        pos = start = count = total = 0
        while pos <= last:
            if pos >= retry_at:
                frames, size = checked_run(buffer, pos, end)
                if frames:
                    pos += frames * size
                    count += frames
                    continue
                retry_at = pos + UNIFORM_RETRY_BYTES
            magic, domain_version, payload_size = unpack(buffer, pos)
            nxt = pos + HEADER_SIZE + payload_size
            if magic != MAGIC or domain_version >> 8 != VERSION or nxt - pos > max_size:
                if count:
                    self._broadcast(client, bytes(view[start:pos]), count)
                    total += count
                self._count_in(client, total)
                self._protocol_error(client, buffer, pos)
                return -1
            if nxt > end:
                break
            if domain_version == key:
                # Shaped for speed: a frame of this domain is checked inline, a single
                # standard TLV without tlvs_ok: ~0.5 us a frame instead of ~1.1 us.
                ok = True
                if verify:
                    stored = unpack_checksum(buffer, pos + CHECKSUM_OFFSET)[0]
                    if stored:
                        ok = crc32(view[pos + HEADER_SIZE:nxt],
                                   crc32(view[pos:pos + CHECKSUM_OFFSET])) == stored
                    else:
                        ok = not require
                if ok and tlv_types is not None:
                    first = pos + HEADER_SIZE
                    if (payload_size >= 2 and buffer[first + 1] + 2 == payload_size
                            and buffer[first] != 255):
                        ok = buffer[first] in tlv_types
                    else:
                        ok = tlvs_ok(buffer, tlv_types, pos, nxt)
                if ok:
                    count += 1
                    pos = nxt
                    continue
            if accept(client, buffer, pos, nxt, domain_version & 0xFF):
                count += 1
            else:
                if count:
                    self._broadcast(client, bytes(view[start:pos]), count)
                    total += count
                    count = 0
                total += 1
                start = nxt
            pos = nxt
        if count:
            self._broadcast(client, bytes(view[start:pos]), count)
            total += count
        self._count_in(client, total)
        return pos

    def _accept_frame(self, client: Client, buffer: bytearray, pos: int, end: int,
                      domain: int) -> bool:
        """True to forward the whole frame ``buffer[pos:end]``; otherwise it has been
        applied (control frame) or counted (filtered / invalid)."""
        if domain == Domain.SYSTEM and self._is_control(buffer, pos, end):
            self._apply_control(client, bytes(buffer[pos:end]), pos)
            return False
        if not logic.checksum_ok(buffer, self.checksum_policy, pos, end):
            stored = _CHECKSUM.unpack_from(buffer, pos + CHECKSUM_OFFSET)[0]
            self._invalid(client, f"checksum 0x{stored:08x} fails the "
                          f"{self.checksum_policy!r} policy", pos)
            return False
        tlv_types = self.tlv_types
        if tlv_types is not None and not logic.tlvs_ok(buffer, tlv_types, pos, end):
            self._invalid(client, "malformed TLV or type outside "
                          f"{tlv_types.start}..{tlv_types.stop - 1}", pos)
            return False
        if self.default_filter:
            forward = domain == self.domain
        else:
            forward = self.logic.should_forward(Header(*HEADER.unpack_from(buffer, pos)))
        if not forward:
            self.messages_filtered += 1
        return forward

    def _handle_other(self, client: Client, buffer: bytearray, pos: int, end: int,
                      domain: int) -> None:
        """A whole frame the fast loop stopped at (a control frame, or a message of
        another domain): the domain's rules decide on it alone."""
        if self._accept_frame(client, buffer, pos, end, domain):
            self._broadcast(client, bytes(buffer[pos:end]), 1)

    @staticmethod
    def _is_control(buffer: bytearray, pos: int, end: int) -> bool:
        first = pos + HEADER_SIZE
        if end - first >= 2 and buffer[first] == RELAY_SUBSCRIBE:
            return True
        return (end - first >= 5 and buffer[first] == logic.EXTENDED_TLV
                and buffer[first + 1] == 0 and buffer[first + 2] == RELAY_SUBSCRIBE)

    def _apply_control(self, client: Client, frame: bytes, pos: int) -> None:
        try:
            _, tlvs = logic.parse_message(frame)
            subscription = logic.decode_subscribe(tlvs[0][1])
        except ProtocolError as exc:
            self._invalid(client, f"bad RELAY_SUBSCRIBE: {exc}", pos)
            return
        client.mode = subscription.mode
        client.types = subscription.tlv_types
        client.gap_notices = subscription.gap_notices
        self._rebuild_receivers()
        log.debug("client %d: subscribed mode %d types %s gap notices %s", client.id,
                  client.mode, sorted(client.types), client.gap_notices)

    def _invalid(self, client: Client, why: str, pos: int) -> None:
        self.messages_invalid += 1
        self._warn("invalid", "client %d: dropped an invalid frame at offset %d: %s "
                   "(%d invalid frames in total; at most one such line a second)",
                   client.id, client.base + pos, why, self.messages_invalid)

    def _count_in(self, client: Client, messages: int) -> None:
        self.messages_in += messages
        client.messages_in += messages

    def _protocol_error(self, client: Client, buffer: bytearray, pos: int) -> None:
        magic, domain_version, payload_size = _FRAME_START.unpack_from(buffer, pos)
        self.messages_in += 1
        offset = client.base + pos
        if magic != MAGIC:
            why = f"bad magic 0x{magic:08x}"
        elif domain_version >> 8 != VERSION:
            why = f"unknown version {domain_version >> 8}"
        else:
            why = (f"payload_size {payload_size} makes a {HEADER_SIZE + payload_size}-byte "
                   f"frame, over max_message_size {self.max_message_size}")
        self.protocol_errors += 1
        log.warning("client %d: %s at offset %d, closing", client.id, why, offset)
        self._close(client, why, logged=True)

    def _keep_rest(self, client: Client, buffer: bytearray, pos: int, end: int) -> None:
        """Move an incomplete frame to the buffer's start; grow the buffer for a frame
        larger than it, shrink it back once that frame has gone."""
        rest = end - pos
        client.fill = rest
        if not rest:
            if len(buffer) != BUFFER_SIZE:
                client.buffer = bytearray(BUFFER_SIZE)
                client.view = memoryview(client.buffer)
            return
        if pos:
            buffer[:rest] = buffer[pos:end]
        if rest >= HEADER_SIZE:
            size = HEADER_SIZE + _FRAME_START.unpack_from(buffer, 0)[2]
            if size > len(buffer):
                grown = bytearray(size)
                grown[:rest] = buffer[:rest]
                client.buffer = grown
                client.view = memoryview(grown)

    # -- fan-out and the write path ------------------------------------------------------

    def _rebuild_receivers(self) -> None:
        clients = self.clients.values()
        self.receivers = [c for c in clients if c.mode == SUBSCRIBE_ALL]
        self.selective = [c for c in clients if c.mode == SUBSCRIBE_TYPES]

    def _broadcast(self, sender: Client, chunk: bytes, count: int) -> None:
        """Queue one chunk (``count`` whole frames) for every other client: the same
        ``bytes`` object in every queue."""
        entry = (chunk, count, 0)
        enqueue = self._enqueue
        for receiver in self.receivers:
            if receiver is not sender and not receiver.closed:
                enqueue(receiver, entry)
        if self.selective:
            self._broadcast_selective(sender, chunk)

    def _broadcast_selective(self, sender: Client, chunk: bytes) -> None:
        """Mode 1 clients get the frames whose first TLV type they listed; clients with
        the same list share one filtered copy."""
        frames: list[tuple[int, int, int | None]] = []
        pos, end = 0, len(chunk)
        while pos < end:
            nxt = pos + HEADER_SIZE + _FRAME_START.unpack_from(chunk, pos)[2]
            frames.append((pos, nxt, logic.first_tlv_type(chunk, pos)))
            pos = nxt
        shared: dict[frozenset[int], Entry | None] = {}
        for receiver in self.selective:
            if receiver is sender or receiver.closed:
                continue
            types = receiver.types
            if types not in shared:
                parts = [chunk[a:b] for a, b, t in frames if t in types]
                shared[types] = (b"".join(parts), len(parts), 0) if parts else None
            entry = shared[types]
            if entry is not None:
                self._enqueue(receiver, entry)

    def _enqueue(self, client: Client, entry: Entry) -> None:
        chunk, count, _ = entry
        size = len(chunk)
        if not client.pending:
            # Nothing queued: write now, queue only what the socket does not take.
            try:
                sent = client.sock.send(chunk)
            except _WOULD_BLOCK:
                sent = 0
            except OSError as exc:
                self._write_failed(client, exc)
                return
            self.bytes_out += sent
            if sent == size:
                self.messages_out += count
                client.messages_out += count
                return
            client.sent = sent
            if sent:
                client.last_progress = time.monotonic()
            if not client.writing:
                self._watch_writes(client, True)
        client.pending.append(entry)
        client.pending_messages += count
        client.pending_bytes += size
        if client.pending_messages > self.queue_limit or client.pending_bytes > self.queue_bytes:
            if client.writing:
                # SPEC: the limit counts what waits *after* a write was tried; the
                # socket may have drained since the last writable event.
                self._write_ready(client)
                if client.pending_messages <= self.queue_limit and (
                        client.pending_bytes <= self.queue_bytes):
                    return
                if client.mode == SUBSCRIBE_NONE and not client.pending:
                    return  # the write failed: the client is leaving
            self._overflow(client)

    def _write_ready(self, client: Client) -> None:
        """Write as much of the pending queue as the socket takes, in one sendmsg."""
        pending = client.pending
        if not pending:
            self._watch_writes(client, False)
            return
        buffers: list[bytes | memoryview] = []
        for index, entry in enumerate(pending):
            if index == WRITE_BATCH_CHUNKS:
                break
            buffers.append(entry[0])
        if client.sent:
            buffers[0] = memoryview(buffers[0])[client.sent:]
        try:
            written = client.sock.sendmsg(buffers)
        except _WOULD_BLOCK:
            return
        except OSError as exc:
            self._write_failed(client, exc)
            return
        self.bytes_out += written
        client.last_progress = time.monotonic()
        written += client.sent
        delivered = 0
        while pending:
            chunk, count, _ = pending[0]
            size = len(chunk)
            if written < size:
                break
            written -= size
            pending.popleft()
            delivered += count
            client.pending_messages -= count
            client.pending_bytes -= size
        client.sent = written
        self.messages_out += delivered
        client.messages_out += delivered
        if not pending:
            self._watch_writes(client, False)
        if self.blocking and client in self.blocking and self._under_low_water(client):
            self.blocking.discard(client)
            if not self.blocking:
                self._resume()

    def _write_failed(self, client: Client, exc: OSError) -> None:
        """The client cannot take data (it closed, or shut down its reading side). Do
        not close it yet: what it sent before going away may still wait in its socket.
        Stop writing to it; after this batch of events, ``_finish_failed_writers``
        forwards what it sent and closes it (later, not here: forwarding its data may
        fail a write to another departed client, and recursion has no bound)."""
        client.mode = SUBSCRIBE_NONE
        client.pending.clear()
        client.pending_messages = client.pending_bytes = client.sent = 0
        client.writing = False
        self._update_events(client)
        self._rebuild_receivers()
        if client in self.blocking:
            self.blocking.discard(client)
            if self.paused and not self.blocking:
                self._resume()
        self.failed_writers.append(client)
        log.debug("client %d: write failed (%s); reading what it sent, then closing",
                  client.id, exc.strerror or exc)

    def _finish_failed_writers(self) -> None:
        """Forward what departed clients sent before they went away, then close them."""
        while self.failed_writers:
            client = self.failed_writers.pop()
            if self.paused:
                continue  # reading stays paused; on resume the read path finds its EOF
            for _ in range(FAILED_WRITER_READS):
                if client.closed:
                    break
                received = client.received
                self._read_ready(client)  # closes it at EOF or on a reset
                if client.received == received:
                    break  # nothing more waiting
            if not client.closed:
                self._close(client, "went away (a write to it failed)", vanished=True)

    def _watch_writes(self, client: Client, on: bool) -> None:
        client.writing = on
        self._update_events(client)

    def _update_events(self, client: Client) -> None:
        events = ((selectors.EVENT_READ if client.reading else 0)
                  | (selectors.EVENT_WRITE if client.writing else 0))
        selector = self.selector
        try:
            key = selector.get_key(client.sock)
        except KeyError:
            if events:
                selector.register(client.sock, events, client)
            return
        if not events:
            selector.unregister(client.sock)
        elif key.events != events:
            selector.modify(client.sock, events, client)

    # -- overflow ------------------------------------------------------------------------

    def _overflow(self, client: Client) -> None:
        """The client is over its queue limit: apply the domain's overflow policy."""
        if self.overflow == "drop_oldest":
            self._drop_oldest(client)
        elif self.overflow == "disconnect":
            self.slow_disconnects += 1
            why = (f"slow consumer: {client.pending_messages} messages / "
                   f"{client.pending_bytes} bytes pending, over the limit of "
                   f"{self.queue_limit} / {self.queue_bytes}")
            log.warning("client %d: %s, disconnecting", client.id, why)
            self._close(client, why, logged=True)
        elif not self.paused:
            self._pause()
        elif client not in self.blocking:
            client.blocked_at = time.monotonic()  # the stall clock starts now
            self.blocking.add(client)

    def _drop_oldest(self, client: Client) -> None:
        """Drop whole queued chunks from the head (never the one being written) until
        the client is back under its limit; announce the gap if it asked."""
        pending = client.pending
        keep = 1 if client.sent else 0
        dropped = 0
        carried = 0  # counts of gap notices dropped here: announced again below
        while ((client.pending_messages > self.queue_limit
                or client.pending_bytes > self.queue_bytes) and len(pending) > keep + 1):
            chunk, count, gap = pending[keep]
            del pending[keep]
            client.pending_messages -= count
            client.pending_bytes -= len(chunk)
            dropped += count
            carried += gap
        if not dropped and not carried:
            return
        self.messages_dropped += dropped
        client.dropped_total += dropped
        client.dropped_unlogged += dropped
        if client.gap_notices:
            self.gap_sequence += 1
            notice = logic.gap_message(dropped + carried, client.dropped_total,
                                       source=self.relay_source, sequence=self.gap_sequence)
            pending.insert(keep, (notice, 0, dropped + carried))
            client.pending_bytes += len(notice)
        now = time.monotonic()
        if now - client.last_drop_log >= WARNING_INTERVAL_S:
            log.warning("client %d: slow consumer, dropped %d oldest messages "
                        "(%d in total for this client)", client.id, client.dropped_unlogged,
                        client.dropped_total)
            client.last_drop_log = now
            client.dropped_unlogged = 0

    def _under_low_water(self, client: Client) -> bool:
        return (client.pending_messages <= self.low_water
                and client.pending_bytes <= self.low_water_bytes)

    def _pause(self) -> None:
        """Backpressure: stop reading from every client until every queue is under the
        low-water mark."""
        self.paused = True
        self.paused_at = time.monotonic()
        self.backpressure_pauses += 1
        self.blocking = {c for c in self.clients.values() if not self._under_low_water(c)}
        for client in self.blocking:
            client.blocked_at = self.paused_at  # the stall clock starts now
        for client in self.clients.values():
            client.reading = False
            self._update_events(client)
        log.info("backpressure: paused reading, %d slow clients over the limit",
                 len(self.blocking))

    def _resume(self) -> None:
        if self.stopping:
            return  # draining: reading stays off
        self.paused = False
        for client in list(self.clients.values()):
            client.reading = True
            self._update_events(client)
        log.debug("backpressure: resumed reading after %.3f s",
                  time.monotonic() - self.paused_at)

    def _check_stalls(self, now: float) -> None:
        for client in list(self.blocking):
            since = max(client.blocked_at, client.last_progress)
            if now - since >= self.stall_timeout:
                self.slow_disconnects += 1
                why = (f"no write progress for {now - since:.1f} s while the relay is "
                       f"paused ({client.pending_messages} messages pending)")
                log.warning("client %d: %s, disconnecting", client.id, why)
                self._close(client, why, logged=True)
        if self.paused and not self.blocking:
            self._resume()

    # -- closing and shutdown ------------------------------------------------------------

    def _close(self, client: Client, why: str, vanished: bool = False,
               logged: bool = False) -> None:
        """Close one client; others never notice. Pending data is discarded."""
        if client.closed:
            return
        client.closed = True
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        self.clients.pop(client.fileno, None)
        self._rebuild_receivers()
        client.pending.clear()
        if client in self.blocking:
            self.blocking.discard(client)
            if self.paused and not self.blocking:
                self._resume()
        level = logging.DEBUG if vanished or logged else logging.INFO
        log.log(level, "client %d: closed: %s (in %d, out %d, dropped %d messages)",
                client.id, why, client.messages_in, client.messages_out, client.dropped_total)

    def _drain(self) -> None:
        """Stop accepting and reading; write what is pending for up to drain_timeout."""
        if self.listener is not None:
            try:
                self.selector.unregister(self.listener)
            except (KeyError, ValueError):
                pass
            self.listener.close()
        self.accept_resume_at = 0.0
        try:
            self.selector.unregister(self.wake_reader)  # its byte may be unread: no spin
        except (KeyError, ValueError):
            pass
        self.paused = False
        self.blocking.clear()
        for client in list(self.clients.values()):
            client.reading = False
            self._update_events(client)
        deadline = time.monotonic() + self.drain_timeout
        while any(c.pending for c in self.clients.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                left = sum(c.pending_messages for c in self.clients.values())
                log.warning("drain timeout: %d messages still pending were discarded", left)
                break
            for key, mask in self.selector.select(remaining):
                if key.data is not None and mask & selectors.EVENT_WRITE:
                    self._write_ready(key.data)

    def _release(self) -> None:
        """Close every connection and the listener; remove the socket if still ours."""
        for client in list(self.clients.values()):
            client.closed = True
            client.sock.close()
        self.clients.clear()
        self.receivers = []
        self.selective = []
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            self._remove_socket_file()
        for sock in (self.wake_reader, self.wake_writer):
            sock.close()
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
        self.selector.close()

    def _remove_socket_file(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self.socket_id:
            os.unlink(self.socket_path)
        else:
            log.warning("%s is no longer our socket; leaving it in place", self.socket_path)

    # -- stats and warnings --------------------------------------------------------------

    def _log_stats(self, final: bool = False) -> None:
        now = time.monotonic()
        snapshot = self.stats()
        then, before = self.last_stats
        elapsed = max(now - then, 1e-9)
        self.last_stats = (now, snapshot)
        rate_in = (snapshot.messages_in - before.messages_in) / elapsed
        rate_out = (snapshot.messages_out - before.messages_out) / elapsed
        log.info(
            "%sstats: clients %d active, %d total, %d rejected | in %d msg (%.0f/s), %d B | "
            "out %d deliveries (%.0f/s), %d B | filtered %d, invalid %d, protocol errors %d"
            " | dropped %d, slow disconnects %d, backpressure pauses %d",
            "final " if final else "", snapshot.connections_active,
            snapshot.connections_total, snapshot.connections_rejected, snapshot.messages_in,
            rate_in, snapshot.bytes_in, snapshot.messages_out, rate_out, snapshot.bytes_out,
            snapshot.messages_filtered, snapshot.messages_invalid, snapshot.protocol_errors,
            snapshot.messages_dropped, snapshot.slow_disconnects,
            snapshot.backpressure_pauses)

    def _warn(self, cause: str, message: str, *args: object) -> None:
        """Log a warning at most once a second per cause (no per-message flood)."""
        now = time.monotonic()
        if now - self.last_warning.get(cause, 0.0) >= WARNING_INTERVAL_S:
            self.last_warning[cause] = now
            log.warning(message, *args)


# ---------------------------------------------------------------------------------------
# RelayClient: a blocking client for producers and consumers
# ---------------------------------------------------------------------------------------


class RelayClient:
    """A blocking connection to a relay: ``send`` messages, ``recv`` whole frames.

    ``subscribe`` (TLV types) receives only messages whose first TLV type is listed;
    ``publish_only`` receives nothing (the relay never queues for it); ``gap_notices``
    asks the relay for a ``RELAY_GAP`` frame after it dropped messages for this client.
    ``timeout`` is the default for ``recv`` and ``send`` (None blocks).
    """

    def __init__(self, path: str, *, subscribe: Iterable[int] | None = None,
                 publish_only: bool = False, gap_notices: bool = False,
                 timeout: float | None = None) -> None:
        self.path = path
        self.timeout = timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout if timeout is not None else CONNECT_PROBE_TIMEOUT_S * 5)
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise ConnectionError(
                f"no relay is listening on {path} ({exc.strerror}); start one with: "
                f"python relay.py --domain NAME --socket {path}") from None
        except BaseException:
            sock.close()
            raise
        sock.settimeout(timeout)
        self.sock = sock
        self._buffer = bytearray()
        self._start = 0  # frames before this offset of _buffer were already returned
        if publish_only or subscribe is not None or gap_notices:
            mode = (SUBSCRIBE_NONE if publish_only
                    else SUBSCRIBE_TYPES if subscribe is not None else SUBSCRIBE_ALL)
            sock.sendall(logic.subscribe_message(mode, subscribe or (), gap_notices))

    def send(self, message: bytes | bytearray | memoryview) -> None:
        """Send one message (or any whole frames) to the relay."""
        self.sock.sendall(message)

    def send_many(self, messages: Iterable[bytes]) -> None:
        """Send many messages in one write."""
        self.sock.sendall(b"".join(messages))

    def recv(self, timeout: float | None = None) -> bytes:
        """One whole frame as ``bytes``.

        ``TimeoutError`` if none arrives within ``timeout`` (default: the client's),
        ``EOFError`` when the relay closed the connection between frames,
        ``ConnectionError`` when it went away in the middle of one.
        """
        frame = self._take_frame()
        if frame is not None:
            return frame
        if timeout is None:
            timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Always one recv, even with no time left: a frame may already be waiting.
            self.sock.settimeout(None if deadline is None
                                 else max(0.0, deadline - time.monotonic()))
            try:
                data = self.sock.recv(BUFFER_SIZE)
            except (TimeoutError, BlockingIOError):
                raise TimeoutError(f"no message from the relay within {timeout} s") from None
            finally:
                self.sock.settimeout(self.timeout)  # send() keeps the client's timeout
            if not data:
                if len(self._buffer) > self._start:
                    raise ConnectionError(
                        f"the relay closed the connection in the middle of a frame "
                        f"({len(self._buffer) - self._start} bytes received)")
                raise EOFError("the relay closed the connection")
            if self._start:
                del self._buffer[:self._start]
                self._start = 0
            self._buffer += data
            frame = self._take_frame()
            if frame is not None:
                return frame

    def _take_frame(self) -> bytes | None:
        buffer, start = self._buffer, self._start
        if len(buffer) - start < HEADER_SIZE:
            return None
        magic, _, payload_size = _FRAME_START.unpack_from(buffer, start)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic 0x{magic:08x} from the relay at buffered "
                                f"offset {start}; the stream is out of step")
        end = start + HEADER_SIZE + payload_size
        if len(buffer) < end:
            return None
        self._start = end
        return bytes(buffer[start:end])

    def __iter__(self) -> Iterator[bytes]:
        """Frames until the relay closes the connection."""
        while True:
            try:
                yield self.recv()
            except EOFError:
                return

    def fileno(self) -> int:
        """The socket's descriptor, to watch it in your own selector."""
        return self.sock.fileno()

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def __enter__(self) -> RelayClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# Command line: run, tail, send
# ---------------------------------------------------------------------------------------

VENUES = {100: "Binance", 101: "Kraken", 102: "Coinbase", 202: "Polygon"}
FIXED_POINT = 100_000_000  # 8 decimals


def _decimal(value: int) -> str:
    sign = "-" if value < 0 else ""
    whole, fraction = divmod(abs(value), FIXED_POINT)
    return f"{sign}{whole}.{fraction:08d}"


def _source_name(source: int) -> str:
    try:
        return logic.Source(source).name.lower()
    except ValueError:
        return str(source)


def _domain_name(domain: int) -> str:
    try:
        return Domain(domain).name.lower()
    except ValueError:
        return str(domain)


def _tlv_fields(tlv_type: int, value: bytes) -> dict[str, Any]:
    """The decoded fields of a TLV this project knows; {} for others."""
    try:
        if tlv_type == logic.TLV_TRADE:
            t = logic.decode_trade(value)
            return {"asset_id": t.asset_id, "price": _decimal(t.price),
                    "volume": _decimal(t.volume), "side": "sell" if t.side else "buy",
                    "venue": VENUES.get(t.venue_id, str(t.venue_id)),
                    "asset_type": t.asset_type,
                    "execution_timestamp_ns": t.execution_timestamp_ns}
        if tlv_type == logic.TLV_GAS_PRICE:
            return dict(logic.decode_gas_price(value)._asdict())
        if tlv_type == RELAY_GAP:
            return dict(logic.decode_gap(value)._asdict())
    except ProtocolError:
        return {"malformed": True}
    return {}


def describe(frame: bytes) -> dict[str, Any]:
    """A message as a JSON-ready dict: header fields, TLV names and known fields."""
    header, tlvs = logic.parse_message(frame)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(header.timestamp_ns // 10**9))
        + f".{header.timestamp_ns % 10**9 // 1000:06d}Z",
        "domain": header.relay_domain, "domain_name": _domain_name(header.relay_domain),
        "source": header.source, "source_name": _source_name(header.source),
        "sequence": header.sequence, "size": len(frame), "flags": header.flags,
        "checksum": header.checksum, "timestamp_ns": header.timestamp_ns,
        "tlvs": [{"type": t, "name": TLV_NAMES.get(t, f"type{t}"), **_tlv_fields(t, v)}
                 for t, v in tlvs],
    }


def format_line(frame: bytes) -> str:
    """One human line for a message (what ``tail`` prints)."""
    d = describe(frame)
    tlvs = d["tlvs"]
    if d["domain"] == Domain.SYSTEM and tlvs and tlvs[0]["type"] == RELAY_GAP:
        return (f"{d['time']} GAP: the relay dropped {tlvs[0].get('dropped')} messages for "
                f"this consumer ({tlvs[0].get('total_dropped')} in total)")
    parts = [d["time"], d["domain_name"], f"src={d['source_name']}", f"seq={d['sequence']}",
             f"{d['size']}B"]
    for tlv in tlvs:
        fields = " ".join(f"{k}={v}" for k, v in tlv.items() if k not in ("type", "name"))
        parts.append(f"{tlv['name']}({fields})" if fields else tlv["name"])
    return " ".join(parts)


def synthetic_messages(logic_: RelayLogic, first_sequence: int, count: int,
                       source: int) -> list[bytes]:
    """Valid messages of the domain: Trades, SignalIdentity or OrderRequest (checksum)."""
    domain = int(logic_.domain)
    messages = []
    for sequence in range(first_sequence, first_sequence + count):
        if domain == Domain.SIGNAL:
            tlv = logic.signal_identity(sequence, source, 1, 90)
        elif domain == Domain.EXECUTION:
            tlv = logic.order_request(sequence, 0x1234, 4_500_000_000_000, 100, sequence % 2)
        else:
            tlv = logic.trade(0x1234 + sequence % 4, 4_500_000_000_000 + sequence,
                              100_000_000, time.time_ns(), 100, 50, sequence % 2)
        messages.append(logic.build_message(domain, source, [tlv], sequence=sequence,
                                            checksum=logic_.checksum != "off"))
    return messages


def _octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r} (e.g. 0600)") from None


def _domain(text: str) -> RelayLogic:
    try:
        return logic.get_logic(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r}; use debug, info, warning, error or critical")
    return level


def _message_size(text: str) -> int:
    value = int(text)
    if not HEADER_SIZE <= value <= logic.MAX_MESSAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be {HEADER_SIZE}..{logic.MAX_MESSAGE_SIZE} bytes, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes, before or after it. In sub-command parsers
    they default to SUPPRESS so they never overwrite what came before the command."""
    def d(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--domain", type=_domain, default=d(_domain("market_data")),
                        metavar="NAME", help="domain to serve: "
                        f"{', '.join(sorted(logic.LOGICS))} (default: market_data)")
    parser.add_argument("--socket", default=d(None), metavar="PATH",
                        help="Unix socket path (default: the domain's, e.g. "
                        "/tmp/torq/market_data.sock)")
    parser.add_argument("--queue-limit", type=_positive_int, default=d(QUEUE_LIMIT),
                        metavar="N", help=f"messages pending per client before the overflow "
                        f"policy applies (default: {QUEUE_LIMIT})")
    parser.add_argument("--queue-bytes", type=_positive_int, default=d(QUEUE_BYTES),
                        metavar="N", help=f"bytes pending per client before the overflow "
                        f"policy applies (default: {QUEUE_BYTES} = 64 MiB)")
    parser.add_argument("--max-connections", type=_positive_int, default=d(MAX_CONNECTIONS),
                        metavar="N", help="clients served at once; more are accepted and "
                        f"closed at once (default: {MAX_CONNECTIONS})")
    parser.add_argument("--overflow", choices=OVERFLOW_POLICIES, default=d(None),
                        help="slow-consumer policy (default: the domain's)")
    parser.add_argument("--max-message-size", type=_message_size, default=d(None),
                        metavar="N", help="largest frame in bytes, header included "
                        "(default: the domain's)")
    parser.add_argument("--stall-timeout", type=_non_negative, default=d(STALL_TIMEOUT_S),
                        metavar="S", help="backpressure: disconnect a client with no write "
                        f"progress for S seconds while paused (default: {STALL_TIMEOUT_S})")
    parser.add_argument("--drain-timeout", type=_non_negative, default=d(DRAIN_TIMEOUT_S),
                        metavar="S", help="on shutdown, flush pending data for up to S "
                        f"seconds (default: {DRAIN_TIMEOUT_S})")
    parser.add_argument("--socket-mode", type=_octal, default=d(SOCKET_MODE), metavar="MODE",
                        help="socket file permissions, octal (default: 0600)")
    parser.add_argument("--stats-interval", type=_non_negative, default=d(STATS_INTERVAL_S),
                        metavar="S", help="log a stats line every S seconds, 0 = never "
                        f"(default: {STATS_INTERVAL_S:g}); SIGUSR1 logs one at once")
    parser.add_argument("--busy-poll-us", type=_non_negative, default=d(BUSY_POLL_S * 1e6),
                        metavar="US", help="after traffic, poll without sleeping for US "
                        "microseconds: lower latency for a little CPU, 0 = always sleep "
                        f"(default: {BUSY_POLL_S * 1e6:g})")
    parser.add_argument("--log-level", type=_log_level, default=d("INFO"), metavar="L",
                        help="debug, info, warning, error or critical (default: info)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python relay.py``."""
    parser = argparse.ArgumentParser(
        prog="relay.py", description="torq-relay: relay Protocol V2 messages between the "
        "clients of one Unix socket. Exit codes: 0 clean stop, 1 runtime error, 2 usage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python relay.py --domain market_data\n"
        "  python relay.py --domain market_data tail --count 10\n"
        "  python relay.py --domain market_data send --count 1000 --rate 100")
    _add_global_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", metavar="{run,tail,send}")
    run = commands.add_parser("run", help="serve the domain (the default command)")
    _add_global_options(run, defaults=False)
    tail = commands.add_parser("tail", help="print each message, decoded, one per line")
    _add_global_options(tail, defaults=False)
    tail.add_argument("--count", type=int, default=0, metavar="N",
                      help="stop after N messages (default: 0 = until the relay stops)")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument("--type", type=int, action="append", dest="types", metavar="T",
                      help="only messages whose first TLV type is T (repeatable)")
    send = commands.add_parser("send", help="publish synthetic messages of the domain")
    _add_global_options(send, defaults=False)
    send.add_argument("--count", type=int, default=10, metavar="N",
                      help="messages to send (default: 10)")
    send.add_argument("--rate", type=float, default=0.0, metavar="R",
                      help="messages per second (default: 0 = as fast as possible)")
    send.add_argument("--source", type=int, default=1, metavar="ID",
                      help="source id in the header (default: 1, Binance)")
    return parser


def _run(args: argparse.Namespace, logic_: RelayLogic, path: str) -> int:
    relay = Relay(logic_, socket_path=path, queue_limit=args.queue_limit,
                  queue_bytes=args.queue_bytes, max_connections=args.max_connections,
                  overflow=args.overflow, max_message_size=args.max_message_size,
                  stall_timeout=args.stall_timeout, drain_timeout=args.drain_timeout,
                  socket_mode=args.socket_mode, stats_interval=args.stats_interval,
                  busy_poll=args.busy_poll_us / 1e6)
    relay.serve_forever()
    return 0


def _fallback_line(frame: bytes, error: ProtocolError, as_json: bool) -> str:
    """A line for a frame whose payload does not decode (the domain forwarded it)."""
    header = logic.parse_header(frame)
    if as_json:
        return json.dumps({"domain": header.relay_domain, "source": header.source,
                           "sequence": header.sequence, "size": len(frame),
                           "malformed": str(error)})
    return (f"{_domain_name(header.relay_domain)} src={_source_name(header.source)} "
            f"seq={header.sequence} {len(frame)}B malformed payload: {error}")


def _stop_on_sigterm() -> None:
    """tail and send stop on SIGTERM as on Ctrl-C: exit 0."""
    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _tail(args: argparse.Namespace, path: str) -> int:
    shown = 0
    _stop_on_sigterm()
    with RelayClient(path, subscribe=args.types, gap_notices=True) as client:
        for frame in client:
            try:
                line = json.dumps(describe(frame)) if args.json else format_line(frame)
            except ProtocolError as exc:
                line = _fallback_line(frame, exc, args.json)
            try:
                print(line, flush=True)
            except BrokenPipeError:
                # The reader went away (tail | head): stop quietly, and keep the
                # interpreter's final flush from failing again.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 0
            shown += 1
            if args.count and shown >= args.count:
                break
    return 0


def _send(args: argparse.Namespace, logic_: RelayLogic, path: str) -> int:
    batch = 1000 if args.rate <= 0 else max(1, min(1000, int(args.rate // 100)))
    started = time.monotonic()
    sent = 0
    _stop_on_sigterm()
    with RelayClient(path, publish_only=True) as client:
        while sent < args.count:
            n = min(batch, args.count - sent)
            client.send_many(synthetic_messages(logic_, sent + 1, n, args.source))
            sent += n
            if args.rate > 0:
                delay = started + sent / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    elapsed = max(time.monotonic() - started, 1e-9)
    print(f"sent {sent} {logic_.name} messages to {path} in {elapsed:.3f} s "
          f"({sent / elapsed:,.0f} msg/s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0 ok, 1 runtime error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logic_: RelayLogic = args.domain
    path = args.socket or logic_.socket_path
    command = args.command or "run"
    try:
        if command == "tail":
            return _tail(args, path)
        if command == "send":
            return _send(args, logic_, path)
        return _run(args, logic_, path)
    except (RelayError, ConnectionError, ValueError) as exc:
        print(f"relay.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0  # tail | head closed the pipe


if __name__ == "__main__":
    sys.exit(main())
