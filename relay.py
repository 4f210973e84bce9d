"""torq-relay: a zero-dependency relay for Protocol V2 messages over a Unix socket.

One relay serves one domain; every valid message a client sends reaches every *other*
client, whole and in order. Copy this file and ``logic.py`` into your repository.

    python relay.py --domain market_data                 # serve (Ctrl-C to stop)
    python relay.py --domain market_data tail            # print every message
    python relay.py --domain market_data send --count 5  # publish five Trades
    python relay.py --domain market_data stats           # look inside the running relay

    import threading
    from logic import MarketDataLogic, build_message, trade
    from relay import Relay, RelayClient
    relay = Relay(MarketDataLogic(), socket_path="/tmp/x.sock")
    threading.Thread(target=relay.serve_forever).start()
    with RelayClient("/tmp/x.sock") as consumer, RelayClient("/tmp/x.sock") as producer:
        producer.send(build_message(1, source=1, tlvs=[trade(1, 100, 1, 0, 100, 1, 0)]))
        print(consumer.recv(timeout=1.0))
    relay.shutdown()

Reading order follows one message from ``accept`` to ``send``: constants, ``Stats``,
``SocketFile`` (the socket path), ``FrameScanner`` (the read path's frame walk),
``Outbound`` (a client's queue), ``Backpressure``, ``History`` and ``ReplaySelection``
(retention and replays), ``Client``, ``Relay`` (the loop, accepting, reading, fan-out,
writing, overflow, control frames, queries, shutdown), then the clients
(``RelayClient``, ``AsyncRelayClient``) and the command line.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import errno
import fcntl
import itertools
import json
import logging
import math
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from types import FrameType, TracebackType
from typing import Any

import logic
from logic import (
    CHECKSUM,
    CHECKSUM_OFFSET,
    FRAME_PREFIX,
    FRAME_START,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    OVERFLOW_POLICIES,
    PAYLOAD_SIZE_OFFSET,
    RELAY_GAP,
    RELAY_QUERY,
    RELAY_REPLAY,
    RELAY_SOURCE,
    RELAY_SUBSCRIBE,
    RELAY_TLV_TYPES,
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

__version__ = "0.2.0"

__all__ = ["Relay", "RelayClient", "AsyncRelayClient", "FrameBatch", "RelayError",
           "RelayRefused", "Stats",
           "FrameScanner", "Outbound", "main", "__version__"]

log = logging.getLogger("relay")

# ---------------------------------------------------------------------------------------
# Constants and defaults
# ---------------------------------------------------------------------------------------

BUFFER_SIZE = 64 * 1024  # per-connection read buffer; a larger frame grows it as it arrives
QUEUE_LIMIT = 10_000  # messages pending for one client (the original broadcast channel)
QUEUE_BYTES = 64 * 1024 * 1024  # bytes pending for one client
LOW_WATER_DIVISOR = 4  # backpressure resumes when every queue is under limit / 4
MAX_CONNECTIONS = 1000
STALL_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 1.0
STATS_INTERVAL_S = 10.0
BUSY_POLL_S = 0.0001  # after traffic, poll without sleeping this long (0 = never)
SOCKET_MODE = 0o600
PARENT_DIR_MODE = 0o700  # a directory the relay creates; plus search for whom the socket admits
LISTEN_BACKLOG = 4096
WARNING_INTERVAL_S = 1.0  # at most one line a second per cause (drops, rejects, pauses, ...)
ACCEPT_RETRY_S = 0.1  # how long to stop accepting when out of file descriptors
MAX_WAIT_S = 3600.0  # longest single select() sleep; selectors refuse ~24.8 days and more
UNIFORM_RUN_MIN_FRAMES = 16  # column checks pay off from about this many frames
UNIFORM_RUN_MIN_BYTES = UNIFORM_RUN_MIN_FRAMES * HEADER_SIZE  # fewer bytes cannot hold that many
UNIFORM_RETRY_BYTES = 16 * 1024  # policy domains: retry column checks this far on
WRITE_BATCH_CHUNKS = 64  # chunks handed to one sendmsg (writev) call
FAILED_WRITER_READS = 64  # reads (of up to 64 KiB) from a client whose write failed
CONNECT_PROBE_TIMEOUT_S = 1.0
LOCK_PID_READS = 100  # a refused relay waits up to ~0.5 s for the winner's pid in PATH.lock
SOCKET_PATH_MAX_BYTES = 107  # AF_UNIX sun_path: 108 bytes with the terminating NUL
CLOSED_CLIENTS_KEPT = 64  # the `clients` report lists this many departed clients
RETAIN_BYTES = 64 * 1024 * 1024  # --retain-bytes: the ring's hard byte bound
JOIN_GRACE_S = 0.02  # with --retain, a new client that sent nothing yet has its live data
                     # held this long, so a replay request it is about to send goes first
REPLAYS_KEPT = 16  # per client: earlier replays a later one leaves out
REPLAY_STEP_FRAMES = 20_000  # replay selection per loop turn, shared by the joiners (~10 ms)
QUERY_BURST = 100  # queries a client may send at once ...
QUERY_RATE_S = 50.0  # ... and then per second: each costs a pass over every client

_WOULD_BLOCK = (BlockingIOError, InterruptedError)
_FD_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_BYTES = [bytes((value,)) for value in range(256)]  # one-byte bytes, no allocation per use
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_monotonic = time.monotonic


class RelayError(RuntimeError):
    """The relay cannot start or run; the message is one line a user can act on."""


class RelayRefused(ConnectionError):
    """The relay refused this connection and said why (its Error frame, in the message):
    over ``--max-connections``, or not admitted by ``--allow-uid`` / ``--allow-gid``."""


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
# The socket file: claim, probe, bind, chmod, remove if still ours
# ---------------------------------------------------------------------------------------


class SocketFile:
    """The relay's Unix socket path, from claim to removal.

    ``bind()`` first takes an exclusive lock on ``PATH.lock``, so two relays started at
    the same moment cannot both probe, unlink and bind: the second is refused and told
    the first one's pid. Then it refuses a path that is not a socket or where a relay
    answers, removes a stale socket, binds, chmods before ``listen()`` (no client can
    connect while the mode is wrong) and remembers the inode. ``remove()`` unlinks the
    socket only while it is still that inode, then releases the lock.
    """

    def __init__(self, path: str, mode: int) -> None:
        self.path = path
        self.mode = mode
        self.lock_path = path + ".lock"
        self.lock_fd: int | None = None
        self.identity: tuple[int, int] | None = None
        self.created: list[str] = []  # directories bind() made: removed if it fails

    def bind(self) -> socket.socket:
        """A listening socket on the path; ``RelayError`` says why not."""
        try:
            return self._bind()
        except BaseException:
            self._unlock()
            for directory in reversed(self.created):
                try:
                    os.rmdir(directory)
                except OSError:
                    pass
            self.created.clear()
            raise

    def _bind(self) -> socket.socket:
        path = self.path
        size = len(os.fsencode(path))
        if size > SOCKET_PATH_MAX_BYTES:
            raise RelayError(f"socket path {path} is {size} bytes; a Unix socket path holds "
                             f"at most {SOCKET_PATH_MAX_BYTES}: pass a shorter --socket")
        self._make_parent()
        self._lock()
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
            answers, pid = _relay_answers(path)
            if answers:
                raise RelayError(f"another relay is already listening on {path} "
                                 f"(pid {pid or 'unknown'}); stop it or pass --socket")
            log.info("removing stale socket %s (no relay answers there)", path)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            # chmod before listen(): no client can connect until the mode is right.
            os.chmod(path, self.mode)
            st = os.stat(path)
            self.identity = (st.st_dev, st.st_ino)
            listener.listen(LISTEN_BACKLOG)
        except OSError as exc:
            listener.close()
            if exc.errno == errno.EADDRINUSE:
                raise RelayError(f"another relay is already listening on {path}; "
                                 "stop it or pass --socket") from None
            raise RelayError(f"cannot bind {path}: {exc.strerror or exc}") from None
        return listener

    def _make_parent(self) -> None:
        """Create the missing directories above the socket: mode 0700, plus search (x)
        for the group or others when the socket mode admits them (a socket cannot be
        reached through a directory its peers may not search)."""
        mode = PARENT_DIR_MODE
        if self.mode & 0o070:
            mode |= 0o010
        if self.mode & 0o007:
            mode |= 0o001
        missing = []
        directory = os.path.dirname(os.path.abspath(self.path))
        while not os.path.isdir(directory):
            missing.append(directory)
            parent = os.path.dirname(directory)
            if parent == directory:
                break
            directory = parent
        for directory in reversed(missing):
            try:
                os.mkdir(directory, mode)
            except FileExistsError:
                if os.path.isdir(directory):
                    continue  # another relay made it a moment ago
                raise RelayError(f"cannot create {directory}: a file is in the way; "
                                 "pass another --socket") from None
            except OSError as exc:
                raise RelayError(f"cannot create {directory}: {exc.strerror or exc}") from None
            self.created.append(directory)
            os.chmod(directory, mode)  # mkdir's mode is filtered by the umask

    def _lock(self) -> None:
        for _ in range(8):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise RelayError(f"cannot create the lock file {self.lock_path}: "
                                 f"{exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = ""
                for _ in range(LOCK_PID_READS):  # the winner writes its pid just after
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    if holder.isdigit():
                        break
                    time.sleep(0.005)
                os.close(fd)
                pid = holder if holder.isdigit() else "unknown"
                raise RelayError(f"another relay is already listening on {self.path} "
                                 f"(pid {pid}); stop it or pass --socket") from None
            # A relay that just stopped removes the file it locked: lock the one there now.
            try:
                mine = os.fstat(fd)
                there = os.stat(self.lock_path)
                same = (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.lock_fd = fd
                return
            os.close(fd)
        raise RelayError(f"cannot lock {self.lock_path}: it keeps being replaced")

    def _unlock(self) -> None:
        fd = self.lock_fd
        if fd is None:
            return
        self.lock_fd = None
        try:  # remove it while still holding it: whoever locks next makes a new one
            mine, there = os.fstat(fd), os.stat(self.lock_path)
            if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                os.unlink(self.lock_path)
        except OSError:
            pass
        os.close(fd)

    def remove(self) -> None:
        """Unlink the socket if it is still the one we bound; release the lock."""
        if self.identity is not None:
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                pass
            else:
                if (st.st_dev, st.st_ino) == self.identity:
                    os.unlink(self.path)
                else:
                    log.warning("%s is no longer our socket; leaving it in place", self.path)
            self.identity = None
        self._unlock()


def _relay_answers(path: str) -> tuple[bool, int | None]:
    """Whether something accepts (or does not refuse) a connection on ``path``, and its
    pid when the kernel tells (``SO_PEERCRED``)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(CONNECT_PROBE_TIMEOUT_S)
    try:
        probe.connect(path)
        credentials = _peer_credentials(probe)
    except (ConnectionRefusedError, FileNotFoundError):
        return False, None
    except OSError:
        return True, None  # it exists and did not refuse (e.g. backlog full): a live relay
    finally:
        probe.close()
    return True, credentials[0] if credentials else None


# ---------------------------------------------------------------------------------------
# The frame scanner: the read path's walk over one read buffer
# ---------------------------------------------------------------------------------------

Forward = Callable[[Any, bytes, int], None]
Control = Callable[[Any, bytes, int], None]
Refuse = Callable[[Any, str, int, bool], None]


class FrameScanner:
    """Finds the whole frames in a read buffer, validates each, and hands every run of
    consecutive accepted frames to ``forward`` as one ``bytes`` chunk.

    It owns the domain's policies (domain byte, checksum, TLV types, the default filter,
    ``max_message_size``, the column cache) and counts every frame it reads in
    ``messages_in``. It needs no socket: ``scan(sender, buffer, end)`` walks
    ``buffer[:end]`` and returns where its incomplete rest starts, or ``~pos`` (a
    negative number) for a framing error at ``pos``, after forwarding what came before.
    ``bench.py`` and the fuzz test drive it in process.

    ``forward(sender, chunk, count)`` gets ``count`` accepted frames;
    ``control(sender, frame, pos)`` a frame addressed to the relay (domain 4, first TLV
    one of the relay's own types); ``refuse(sender, why, pos, invalid)`` a frame dropped
    as invalid (``True``) or filtered (``False``). ``pos`` is an offset into ``buffer``.

    Two walks, chosen once: ``_scan_fast`` for the default filter with no checksum or
    TLV policy (market data), ``_scan_checked`` otherwise. Both first try to validate
    a run of same-size frames a header column at a time (``_uniform_run``).
    """

    def __init__(self, logic_: RelayLogic, max_message_size: int, *, forward: Forward,
                 control: Control, refuse: Refuse) -> None:
        self.logic = logic_
        self.domain = int(logic_.domain)
        self.prefix = logic.frame_prefix(self.domain)
        self.checksum_policy = logic_.checksum
        self.tlv_types = logic_.tlv_types
        self.max_message_size = max_message_size
        self.default_filter = logic.uses_default_filter(logic_)
        self.forward = forward
        self.control = control
        self.refuse = refuse
        self.messages_in = 0
        self.column_cache: dict[int, tuple[tuple[int, bytes], ...]] = {}
        # byte -> b"\1" for an accepted TLV type (never 255, the extended marker), else 0
        self.tlv_type_table = bytes(
            1 if self.tlv_types is not None and t in self.tlv_types and t != 255 else 0
            for t in range(256))
        # The fast walk leaves the size check to "the frame fits the buffer", which
        # holds only while the buffer never outgrows max_message_size.
        self.fast = (self.default_filter and self.checksum_policy == "off"
                     and self.tlv_types is None and self.domain != Domain.SYSTEM
                     and max_message_size >= BUFFER_SIZE)
        self.scan: Callable[[Any, bytearray, int], int] = (
            self._scan_fast if self.fast else self._scan_checked)

    def _scan_fast(self, sender: Any, buffer: bytearray, end: int) -> int:
        """The walk for the default filter with no checksum or TLV policy."""
        unpack = FRAME_PREFIX.unpack_from
        prefix = self.prefix
        forward = self.forward
        uniform_run = self._uniform_run
        last = end - HEADER_SIZE
        pos = start = count = total = previous = 0
        uniform = True  # try column checks until one finds no long run in this read
        while True:
            if uniform and end - pos >= UNIFORM_RUN_MIN_BYTES:
                frames, size = uniform_run(buffer, pos, end)
                if frames:
                    pos += frames * size
                    count += frames
                else:
                    uniform = False
            # The per-frame loop, shaped for speed: locals only, magic+domain+version
            # compared as one 6-byte string, the end check done once after the loop and
            # the size check implied by "the frame fits the buffer" (see fast): ~160 ns
            # a frame instead of ~200 (mixed sizes, measured in process).
            while pos <= last:
                head, payload_size = unpack(buffer, pos)
                if head != prefix:
                    break
                previous = pos
                pos += payload_size + 32
                count += 1
            if pos > end:  # the last frame walked is not whole yet: step back to it
                pos = previous
                count -= 1
                if HEADER_SIZE + FRAME_START.unpack_from(buffer, pos)[2] <= (
                        self.max_message_size):
                    break  # a valid frame still arriving
            elif pos > last:
                break  # at the end, or a header still arriving
            # A frame that is not plain data of this domain, or an oversized one.
            magic, domain_version, payload_size = FRAME_START.unpack_from(buffer, pos)
            nxt = pos + HEADER_SIZE + payload_size
            if (magic != MAGIC or domain_version >> 8 != VERSION
                    or nxt - pos > self.max_message_size):
                if count:
                    forward(sender, bytes(memoryview(buffer)[start:pos]), count)
                    total += count
                self.messages_in += total + 1
                return ~pos
            if nxt > end:
                break  # a valid frame of another domain still arriving
            if count:
                forward(sender, bytes(memoryview(buffer)[start:pos]), count)
                total += count
                count = 0
            total += 1
            self._other(sender, buffer, pos, nxt, domain_version & 0xFF)
            pos = start = nxt
        if count:
            forward(sender, bytes(memoryview(buffer)[start:pos]), count)
            total += count
        self.messages_in += total
        return pos

    def _other(self, sender: Any, buffer: bytearray, pos: int, end: int, domain: int) -> None:
        """One whole frame the fast walk stopped at: a control frame, or a frame the
        domain's rules decide on alone."""
        if domain == Domain.SYSTEM and logic.first_tlv_type(buffer, pos) in RELAY_TLV_TYPES:
            self.control(sender, bytes(buffer[pos:end]), pos)
        elif self._accept(sender, buffer, pos, end, domain):
            self.forward(sender, bytes(buffer[pos:end]), 1)

    def _uniform_run(self, buffer: bytearray, pos: int, end: int) -> tuple[int, int]:
        """How many whole frames from ``pos`` on are valid frames of this domain with
        the same size as the first: ``(frames, size)``, or ``(0, 0)`` if too few.

        Shaped for speed: a feed of same-size messages (all Trades, all 64-byte bench
        frames) is validated a header *column* at a time: ``buffer[pos+i:stop:size]``
        gathers byte i of every frame in C and ``lstrip`` finds the first frame whose
        byte differs. Ten columns (magic, domain, version, payload_size) prove what
        the per-frame loop would: if frame j is valid and has the first frame's
        size, frame j+1 starts exactly ``size`` bytes later. ~30 ns a frame instead
        of ~150 ns; a stream of mixed sizes falls back to the per-frame loop.
        """
        if end - pos < UNIFORM_RUN_MIN_BYTES:
            return 0, 0
        size = HEADER_SIZE + FRAME_START.unpack_from(buffer, pos)[2]
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

    def _uniform_columns(self, size: int) -> tuple[tuple[int, bytes], ...]:
        """The (offset, byte) pairs every frame of ``size`` bytes of this domain has:
        magic, domain, version and payload_size. Cached per size."""
        columns = self.column_cache.get(size)
        if columns is None:
            expected_size = struct.pack("<I", size - HEADER_SIZE)
            columns = tuple((i, self.prefix[i:i + 1]) for i in range(len(self.prefix))) + (
                tuple((PAYLOAD_SIZE_OFFSET + i, expected_size[i:i + 1]) for i in range(4)))
            if len(self.column_cache) > 64:
                self.column_cache.clear()
            self.column_cache[size] = columns
        return columns

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
            unpack_checksum = CHECKSUM.unpack_from
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

    def _scan_checked(self, sender: Any, buffer: bytearray, end: int) -> int:
        """The walk applying the domain's checksum, TLV and filter policies to each
        frame; same contract as ``_scan_fast``."""
        unpack = FRAME_START.unpack_from
        unpack_checksum = CHECKSUM.unpack_from
        crc32 = zlib.crc32
        tlvs_ok = logic.tlvs_ok
        first_tlv_type = logic.first_tlv_type
        view = memoryview(buffer)
        max_size = self.max_message_size
        accept = self._accept
        forward = self.forward
        # Frames of this domain are checked inline when the filter is the default one;
        # -1 never matches, so a custom filter (or a system-domain logic, whose frames
        # may be control frames) sends every frame to _accept.
        inline = self.default_filter and self.domain != Domain.SYSTEM
        key = self.domain | VERSION << 8 if inline else -1
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
                    forward(sender, bytes(view[start:pos]), count)
                    total += count
                self.messages_in += total + 1
                return ~pos
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
            domain = domain_version & 0xFF
            if domain == Domain.SYSTEM and first_tlv_type(buffer, pos) in RELAY_TLV_TYPES:
                # Addressed to the relay: what came before goes out first (a bridge
                # flag or a replay must take effect exactly here).
                if count:
                    forward(sender, bytes(view[start:pos]), count)
                    total += count
                    count = 0
                total += 1
                self.control(sender, bytes(view[pos:nxt]), pos)
                start = nxt
            elif accept(sender, buffer, pos, nxt, domain):
                count += 1
            else:
                if count:
                    forward(sender, bytes(view[start:pos]), count)
                    total += count
                    count = 0
                total += 1
                start = nxt
            pos = nxt
        if count:
            forward(sender, bytes(view[start:pos]), count)
            total += count
        self.messages_in += total
        return pos

    def _accept(self, sender: Any, buffer: bytearray, pos: int, end: int,
                domain: int) -> bool:
        """True to forward the whole frame ``buffer[pos:end]``; otherwise it has been
        refused, with the reason."""
        if not logic.checksum_ok(buffer, self.checksum_policy, pos, end):
            stored = CHECKSUM.unpack_from(buffer, pos + CHECKSUM_OFFSET)[0]
            self.refuse(sender, f"checksum 0x{stored:08x} fails the "
                        f"{self.checksum_policy!r} policy", pos, True)
            return False
        tlv_types = self.tlv_types
        if tlv_types is not None and not logic.tlvs_ok(buffer, tlv_types, pos, end):
            self.refuse(sender, "malformed TLV or type outside "
                        f"{tlv_types.start}..{tlv_types.stop - 1}", pos, True)
            return False
        if self.default_filter:
            if domain == self.domain:
                return True
            self.refuse(sender, f"domain {domain}, and this relay forwards domain "
                        f"{self.domain} ({self.logic.name}) only", pos, False)
            return False
        if self.logic.should_forward(Header(*HEADER.unpack_from(buffer, pos))):
            return True
        self.refuse(sender, "refused by the domain's should_forward", pos, False)
        return False


# ---------------------------------------------------------------------------------------
# Outbound: a client's queue of chunks waiting to be written
# ---------------------------------------------------------------------------------------

# A pending entry: (chunk, messages in it, notice). notice is 0 for data, the messages a
# gap notice announces (> 0), or REPLY for a relay's answer, which is never dropped.
Entry = tuple[bytes, int, int]
REPLY = -1
# A piece of a replay: (a retained chunk, messages, None for all of it or the (start, end)
# spans of the frames it takes). Frames are copied out of the ring only when fed.
ReplayPiece = tuple[bytes, int, tuple[tuple[int, int], ...] | None]
U64_MAX = (1 << 64) - 1  # a RELAY_GAP count or total never goes past this
GAP_FRAME_BYTES = len(logic.gap_message(0, 0))
GAP_PLACEHOLDER = bytes(bytearray(GAP_FRAME_BYTES))  # a queued notice, built at the head
WAITING = 1  # push(): data now waits, and none did before: watch the socket for writes
OVER = 2  # push(): more waits than the high-water marks allow, after a write was tried


class Outbound:
    """A client's outbound queue: the chunks waiting to be written (``pending``), the
    offset already written of the first (``sent``), their message and byte counts, the
    high-water marks that guard them, and what was delivered and dropped.

    ``push`` writes at once when nothing waits and queues only what the socket does not
    take; ``write`` hands up to ``WRITE_BATCH_CHUNKS`` chunks to one ``sendmsg``;
    ``drop_oldest`` drops whole chunks from the head, never the one being written. It
    knows nothing of selectors or policies (the relay decides what an overflow means),
    and any object with ``send`` and ``sendmsg`` can stand in for the socket.

    Gap notices wait in the queue as their count alone and are built (``notice``) when
    they reach the head, so each carries the running total of what the notices before
    it told, however many drops land in between.

    Live data can be *held* behind something that must go first: a replay (fed as the
    client drains: its pieces move into ``pending`` while less than half the limits
    wait there, then its marker, then what was held), or a new client's join grace.
    """

    __slots__ = ("sock", "notice", "pending", "sent", "messages", "bytes", "high_water",
                 "high_water_bytes", "low_water", "low_water_bytes", "messages_out",
                 "bytes_out", "progress_at", "dropped", "told", "unbuilt", "replay",
                 "marker", "selecting", "held", "held_messages", "held_bytes", "grace")

    def __init__(self, sock: Any, high_water: int, high_water_bytes: int,
                 notice: Callable[[int, int], bytes] = logic.gap_message) -> None:
        self.sock = sock
        self.notice = notice  # notice(dropped, total_dropped): a RELAY_GAP frame
        self.pending: collections.deque[Entry] = collections.deque()
        self.sent = 0  # bytes of pending[0] already written
        self.messages = 0  # messages waiting (gap notices and replies count 0)
        self.bytes = 0  # bytes waiting, the whole of pending[0] included
        self.high_water = high_water
        self.high_water_bytes = high_water_bytes
        self.low_water = high_water // LOW_WATER_DIVISOR
        self.low_water_bytes = high_water_bytes // LOW_WATER_DIVISOR
        self.messages_out = 0  # deliveries: messages fully written
        self.bytes_out = 0
        self.progress_at = _monotonic()  # the last write that made progress
        self.dropped = 0  # messages dropped from this queue (drop_oldest)
        self.told = 0  # the running total of the gap notices built so far
        self.unbuilt = 0  # gap notices queued and not built yet
        self.replay: collections.deque[ReplayPiece] | None = None  # not fed yet
        self.marker = b""  # the RELAY_LIVE frame that follows the replay
        self.selecting = False  # the replay is still being selected: nothing to feed yet
        self.held: collections.deque[Entry] | None = None  # live entries held back
        self.held_messages = 0
        self.held_bytes = 0
        self.grace = False  # the hold is a new client's join grace, not a replay's

    # -- queueing and writing ------------------------------------------------------------

    def push(self, entry: Entry) -> int:
        """Queue ``entry``, writing it at once if nothing waits. Returns 0, ``WAITING``
        when it is the first data left waiting, plus ``OVER`` when more waits than the
        high-water marks allow. Raises ``OSError`` when the write fails."""
        pending = self.pending
        chunk, count, kind = entry
        if not pending and self.held is None:
            if chunk is GAP_PLACEHOLDER:
                chunk = self._build_notice(kind)
                entry = (chunk, 0, kind)
            try:
                sent = self.sock.send(chunk)
            except _WOULD_BLOCK:
                sent = 0
            self.bytes_out += sent
            if sent == len(chunk):
                self.messages_out += count
                return 0
            if sent:
                self.progress_at = _monotonic()
            self.sent = sent
            pending.append(entry)
            self.messages += count
            self.bytes += len(chunk)
            status = WAITING
        else:
            held = self.held
            self.messages += count
            self.bytes += len(chunk)
            if chunk is GAP_PLACEHOLDER:
                self.unbuilt += 1
            if held is not None:
                # Held behind a replay (or a join grace): only what is held can put the
                # client over its limits (a replay is fed at most half of them).
                held.append(entry)
                self.held_messages += count
                self.held_bytes += len(chunk)
                if (self.held_messages <= self.high_water
                        and self.held_bytes <= self.high_water_bytes):
                    return 0
                if self.grace:
                    # A join grace must not make a client slow that has not asked for
                    # anything: it ends early, and the held data is written now.
                    status = self.release()
                    return status | (OVER if self.over_high_water() else 0)
                self.write()
                return OVER if self.over_high_water() else 0
            pending.append(entry)
            if self.messages <= self.high_water and self.bytes <= self.high_water_bytes:
                return 0
            # SPEC: the limit counts what waits *after* a write was tried; the socket
            # may have drained since the last writable event.
            self.write()
            status = 0
        if self.messages > self.high_water or self.bytes > self.high_water_bytes:
            status |= OVER
        return status

    def write(self) -> int:
        """Write as much as the socket takes, in one ``sendmsg``; the messages it
        delivered. Raises ``OSError`` when the write fails."""
        pending = self.pending
        if not pending:
            return 0
        buffers: list[bytes | memoryview]
        if not self.unbuilt:
            buffers = [entry[0] for entry in itertools.islice(pending, WRITE_BATCH_CHUNKS)]
        else:
            buffers = []
            for index, (chunk, _, kind) in enumerate(itertools.islice(pending,
                                                                      WRITE_BATCH_CHUNKS)):
                if chunk is GAP_PLACEHOLDER:
                    if index:
                        break  # a notice is built at the head, where its total is known
                    chunk = self._build_notice(kind)
                    pending[0] = (chunk, 0, kind)
                    self.unbuilt -= 1
                buffers.append(chunk)
        sent = self.sent
        if sent:
            buffers[0] = memoryview(buffers[0])[sent:]
        try:
            written = self.sock.sendmsg(buffers)
        except _WOULD_BLOCK:
            return 0
        self.bytes_out += written
        self.progress_at = _monotonic()
        written += sent
        delivered = 0
        while pending:
            chunk, count, _ = pending[0]
            size = len(chunk)
            if written < size:
                break
            written -= size
            pending.popleft()
            delivered += count
            self.messages -= count
            self.bytes -= size
        self.sent = written
        self.messages_out += delivered
        if self.replay is not None:
            self._feed()
        return delivered

    def _build_notice(self, count: int) -> bytes:
        """The RELAY_GAP frame of a notice at the head: ``count`` and the running total
        (both held to u64)."""
        self.told = min(U64_MAX, self.told + count)
        return self.notice(min(count, U64_MAX), self.told)

    def over_high_water(self) -> bool:
        """More waits than the high-water marks allow (while data is held: more is
        held)."""
        if self.held is not None:
            return self.held_messages > self.high_water or self.held_bytes > self.high_water_bytes
        return self.messages > self.high_water or self.bytes > self.high_water_bytes

    def under_low_water(self) -> bool:
        """What waits is under both low-water marks (a quarter of the limits)."""
        return self.messages <= self.low_water and self.bytes <= self.low_water_bytes

    # -- losing data, and saying so ------------------------------------------------------

    def drop_oldest(self, notify: bool) -> int:
        """Drop whole chunks from the head, never the one being written, the newest or
        a reply, until the queue is back under its high-water marks; returns the
        messages dropped. With ``notify``, a gap notice goes where they were: it also
        announces what dropped notices had announced, so the notices a client receives
        always add up to what it lost. While data is held, the held entries are the
        ones dropped."""
        held = self.held
        queue = held if held is not None else self.pending
        at = 1 if held is None and self.sent else 0
        dropped = carried = 0
        while self.over_high_water() and len(queue) > at + 1:
            chunk, count, kind = queue[at]
            if kind == REPLY:
                at += 1
                continue
            del queue[at]
            size = len(chunk)
            self.messages -= count
            self.bytes -= size
            if held is not None:
                self.held_messages -= count
                self.held_bytes -= size
            dropped += count
            if kind > 0:
                carried += kind
                if chunk is GAP_PLACEHOLDER:
                    self.unbuilt -= 1
                else:
                    self.told -= kind  # built at the head, never sent: told again below
        if not dropped and not carried:
            return 0
        self.dropped += dropped
        if notify:
            queue.insert(at, (GAP_PLACEHOLDER, 0, min(U64_MAX, dropped + carried)))
            self.unbuilt += 1
            self.bytes += GAP_FRAME_BYTES
            if held is not None:
                self.held_bytes += GAP_FRAME_BYTES
        return dropped

    def tell_lost(self, lost: int) -> int:
        """Queue a gap notice for ``lost`` messages lost before reaching this relay,
        after everything already queued (merged into a notice still waiting at the
        tail). Returns ``WAITING`` or 0, as ``push`` does."""
        queue = self.held if self.held is not None else self.pending
        if queue and queue[-1][0] is GAP_PLACEHOLDER:
            _, _, told = queue.pop()
            queue.append((GAP_PLACEHOLDER, 0, min(U64_MAX, told + lost)))
            return 0
        return self.push_notice(GAP_PLACEHOLDER, min(U64_MAX, lost))

    def push_notice(self, frame: bytes, kind: int) -> int:
        """Queue a frame of the relay's own: a gap notice (``GAP_PLACEHOLDER``, built
        when it is written) or a ``REPLY`` (which goes ahead of held live data). It
        counts toward the byte limit only. Returns ``WAITING`` or 0."""
        if kind == REPLY and self.held is not None:
            waiting = bool(self.pending)
            self.pending.append((frame, 0, REPLY))
            self.bytes += len(frame)
            if waiting:
                return 0
            self.write()
            return WAITING if self.pending else 0
        return self.push((frame, 0, kind)) & WAITING

    # -- holding live data: replays and the join grace -----------------------------------

    def hold(self, grace: bool = False) -> None:
        """Keep live data waiting from now on (behind a replay, or a ``grace``)."""
        if self.held is None:
            self.held = collections.deque()
            self.held_messages = self.held_bytes = 0
        self.grace = grace

    def release(self) -> int:
        """Stop holding live data (a join grace that no replay request came for): write
        what was held. Returns ``WAITING`` or 0, as ``push`` does."""
        held = self.held
        if held is None or self.replay is not None:
            return 0  # not holding, or a replay now goes first
        self.held = None
        self.grace = False
        self.held_messages = self.held_bytes = 0
        waiting = bool(self.pending)
        self.pending.extend(held)
        if waiting or not self.pending:
            return 0
        self.write()
        return WAITING if self.pending else 0

    def begin_replay(self) -> None:
        """A replay is being selected: live data is held from now on, and nothing is
        fed until ``start_replay``."""
        self.hold()
        self.replay = collections.deque()
        self.selecting = True

    def start_replay(self, pieces: Iterable[ReplayPiece], marker: bytes) -> int:
        """Send ``pieces``, then ``marker``, before any live entry pushed since
        ``begin_replay`` (or from now on). Returns ``WAITING`` or 0, as ``push`` does."""
        if self.replay is None:
            self.begin_replay()
        assert self.replay is not None
        self.replay.extend(pieces)
        self.marker = marker
        self.selecting = False
        self.grace = False
        waiting = bool(self.pending)
        self._feed()
        if waiting or not self.pending:
            return 0
        self.write()
        return WAITING if self.pending else 0

    def replaying(self) -> bool:
        """A replay is being selected or fed (live data waits behind it)."""
        return self.replay is not None

    def _feed(self) -> None:
        """Move replay pieces into pending while less than half the limits wait there
        (copying a piece's frames out of the ring only now); once the replay is all in:
        the marker, then the live entries held behind it."""
        replay = self.replay
        if replay is None or self.selecting:
            return
        pending = self.pending
        half, half_bytes = self.high_water // 2, self.high_water_bytes // 2
        fed_messages = self.messages - self.held_messages
        fed_bytes = self.bytes - self.held_bytes
        while replay and (not pending or (fed_messages < half and fed_bytes < half_bytes)):
            chunk, count, spans = replay.popleft()
            if spans is not None:
                chunk = b"".join(chunk[a:b] for a, b in spans)
            pending.append((chunk, count, 0))
            fed_messages += count
            fed_bytes += len(chunk)
            self.messages += count
            self.bytes += len(chunk)
        if replay:
            return
        held = self.held
        pending.append((self.marker, 0, REPLY))
        self.bytes += len(self.marker)
        if held is not None:
            pending.extend(held)
        self.replay = self.held = None
        self.marker = b""
        self.held_messages = self.held_bytes = 0

    def clear(self) -> None:
        """Discard everything pending (the client is leaving)."""
        self.pending.clear()
        self.messages = self.bytes = self.sent = self.unbuilt = 0
        self.replay = self.held = None
        self.selecting = self.grace = False
        self.held_messages = self.held_bytes = 0


# ---------------------------------------------------------------------------------------
# Backpressure: pause, resume, stalls
# ---------------------------------------------------------------------------------------


class Backpressure:
    """Flow control of a backpressure domain, in one place.

    The relay stops reading from every client while any client *holds* it back (its
    queue went over the high-water mark) and resumes once none does (each is back
    under low water). The stall clock of a holder starts when it began to hold, or at
    its last write progress, whichever is later; one that makes no progress for
    ``stall_timeout`` seconds is reported by ``stalled``, so one dead consumer cannot
    stop a domain for good. The relay turns reading off and on.
    """

    __slots__ = ("stall_timeout", "paused", "paused_at", "holders", "pauses")

    def __init__(self, stall_timeout: float) -> None:
        self.stall_timeout = stall_timeout
        self.paused = False
        self.paused_at = 0.0
        self.holders: set[Client] = set()
        self.pauses = 0

    def pause(self, holders: set[Client], now: float) -> None:
        """Start a pause held by ``holders`` (every client over low water)."""
        self.paused = True
        self.paused_at = now
        self.pauses += 1
        self.holders = holders
        for client in holders:
            client.blocked_at = now  # the stall clock starts now

    def hold(self, client: Client, now: float) -> None:
        """``client`` went over its limit during a pause: it holds the pause too."""
        if client not in self.holders:
            client.blocked_at = now
            self.holders.add(client)

    def release(self, client: Client) -> bool:
        """``client`` holds no more (drained, leaving, or publish-only now); True when
        that ends the pause."""
        holders = self.holders
        if client in holders:
            holders.discard(client)
            return self.paused and not holders
        return False

    def stalled(self, now: float) -> list[Client]:
        """Holders that made no write progress for ``stall_timeout`` seconds."""
        limit = self.stall_timeout
        return [c for c in self.holders
                if now - max(c.blocked_at, c.out.progress_at) >= limit]

    def deadline(self) -> float:
        """When the next holder would stall (``inf`` if none can)."""
        if not self.paused or not self.holders:
            return math.inf
        return min(max(c.blocked_at, c.out.progress_at) for c in self.holders) + (
            self.stall_timeout)

    def end(self) -> None:
        """The pause is over."""
        self.paused = False
        self.holders = set()


# ---------------------------------------------------------------------------------------
# History: the most recent messages, for late joiners
# ---------------------------------------------------------------------------------------

# A retained chunk: (chunk, messages, serial, sender's client id, sender is a bridge).
Retained = tuple[bytes, int, int, int, bool]
# A stretch of what one client received live: (first serial, end serial, mode, types,
# bridge), under one subscription.
Segment = tuple[int, int, int, frozenset[int], bool]
SEGMENTS_KEPT = 256  # per client; older stretches are forgotten (their chunks long gone)


class History:
    """The most recent accepted data messages, kept for replays (``--retain``).

    It holds the very ``bytes`` chunks the fan-out made (no copy), each with a serial
    number, so a joiner's replay can leave out exactly what it already received live.
    Bounded by messages (at least the last ``limit``, at most one chunk more) and by
    bytes (never more than ``limit_bytes``); ``trimmed`` counts what left the ring.
    """

    __slots__ = ("limit", "limit_bytes", "chunks", "messages", "bytes", "serial", "trimmed",
                 "trimmed_from")

    def __init__(self, limit: int, limit_bytes: int) -> None:
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.chunks: collections.deque[Retained] = collections.deque()
        self.messages = 0
        self.bytes = 0
        self.serial = 0  # of the newest chunk; a client listed now receives serial + 1 on
        self.trimmed = 0
        self.trimmed_from: collections.Counter[int] = collections.Counter()  # per sender

    def append(self, chunk: bytes, count: int, sender: int, bridge: bool) -> None:
        """Keep one forwarded chunk; forget the oldest beyond the bounds."""
        self.serial += 1
        chunks = self.chunks
        chunks.append((chunk, count, self.serial, sender, bridge))
        self.messages += count
        self.bytes += len(chunk)
        while chunks and (self.bytes > self.limit_bytes
                          or self.messages - chunks[0][1] >= self.limit):
            oldest = chunks.popleft()
            self.messages -= oldest[1]
            self.bytes -= len(oldest[0])
            self.trimmed += oldest[1]
            self.trimmed_from[oldest[3]] += oldest[1]



# An earlier replay to a client: (serial and index of its oldest frame, the serial after
# its newest chunk, the mode, types and bridge role it was selected under, since_ns).
Replayed = tuple[int, int, int, int, frozenset[int], bool, int]


def _replayed_in(record: Replayed, serial: int, index: int, first_type: int | None,
                 timestamp_ns: int) -> bool:
    """True if the frame at ``index`` of chunk ``serial`` was in that earlier replay."""
    cut_serial, cut_index, _, mode, types, _, since_ns = record
    return ((serial > cut_serial or index >= cut_index)
            and (mode == SUBSCRIBE_ALL or first_type in types) and timestamp_ns >= since_ns)


class ReplaySelection:
    """One client's replay being chosen from the ring, a bounded amount of work at a
    time: the loop gives it about ``REPLAY_STEP_FRAMES`` frames a turn, so a ring of a
    million messages never stalls the relay. It walks a snapshot of the ring (references
    only) from the newest chunk back and picks what the client's subscription selects:
    among the ``last`` it would receive, with a timestamp ``>= since_ns``, never its own,
    never what it already received live (``received``) or in an earlier replay
    (``replayed``), never what another bridge published when it is a bridge, and never
    below ``floor`` (stretches it received that the relay has forgotten)."""

    def __init__(self, history: History, client: Client, replay: logic.Replay,
                 received: list[Segment], replayed: list[Replayed], floor: int) -> None:
        self.chunks = list(history.chunks)
        self.index = len(self.chunks) - 1
        self.client_id = client.id
        self.replay = replay
        self.mode, self.types, self.bridge = client.mode, client.types, client.bridge
        self.wanted = replay.last or math.inf
        self.since_ns = replay.since_ns
        self.received = received
        self.stretch = len(received) - 1
        self.replayed = replayed
        self.floor = floor
        self.picked: list[ReplayPiece] = []
        self.found = 0
        self.cut: tuple[int, int] | None = None  # (serial, index) of the oldest picked
        self.below_floor = 0  # retained messages not offered: under the floor

    def step(self, budget: int) -> bool:
        """Look at about ``budget`` frames (a whole chunk taken or skipped counts one);
        True when the selection is complete."""
        chunks = self.chunks
        while self.index >= 0 and self.found < self.wanted and budget > 0:
            chunk, count, serial, sender, sender_bridge = chunks[self.index]
            if serial < self.floor:
                self.below_floor = sum(c[1] for c in chunks[:self.index + 1])
                self.index = -1
                break
            self.index -= 1
            budget -= 1
            if sender == self.client_id or (self.bridge and sender_bridge):
                continue
            received = self.received
            while self.stretch >= 0 and received[self.stretch][0] > serial:
                self.stretch -= 1
            # What of this chunk it received live: nothing, all of it, or some types.
            seen: frozenset[int] | None = None
            if self.stretch >= 0 and serial < received[self.stretch][1]:
                _, _, seen_mode, seen_types, seen_bridge = received[self.stretch]
                if seen_bridge and sender_bridge or seen_mode == SUBSCRIBE_NONE:
                    seen = None
                elif seen_mode == SUBSCRIBE_ALL:
                    continue
                else:
                    seen = seen_types
            earlier = [r for r in self.replayed if r[0] <= serial < r[2]
                       and not (r[5] and sender_bridge)]
            if (self.mode == SUBSCRIBE_ALL and seen is None and not earlier
                    and not self.since_ns and count <= self.wanted - self.found):
                self.picked.append((chunk, count, None))  # the whole chunk
                self.found += count
                self.cut = (serial, 0)
                continue
            budget -= count
            self._pick_frames(chunk, serial, seen, earlier)
        return self.index < 0 or self.found >= self.wanted

    def _pick_frames(self, chunk: bytes, serial: int, seen: frozenset[int] | None,
                     earlier: list[Replayed]) -> None:
        mode, types, since_ns = self.mode, self.types, self.since_ns
        spans: list[tuple[int, int, int]] = []  # (index in the chunk, start, end)
        pos, end, index = 0, len(chunk), 0
        while pos < end:
            header = HEADER.unpack_from(chunk, pos)
            nxt = pos + HEADER_SIZE + header[7]
            first_type = logic.first_tlv_type(chunk, pos)
            if ((mode == SUBSCRIBE_ALL or first_type in types)
                    and (seen is None or first_type not in seen)
                    and header[6] >= since_ns
                    and not any(_replayed_in(r, serial, index, first_type, header[6])
                                for r in earlier)):
                spans.append((index, pos, nxt))
            pos = nxt
            index += 1
        if not spans:
            return
        keep = spans[-int(min(len(spans), self.wanted - self.found)):]
        merged: list[tuple[int, int]] = []
        for _, start, stop in keep:  # neighbouring frames as one slice
            if merged and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], stop)
            else:
                merged.append((start, stop))
        self.picked.append((chunk, len(keep), tuple(merged)))
        self.found += len(keep)
        self.cut = (serial, keep[0][0])

    def pieces(self) -> list[ReplayPiece]:
        """What was picked, oldest first."""
        return self.picked[::-1]


# ---------------------------------------------------------------------------------------
# Client: one accepted connection
# ---------------------------------------------------------------------------------------

RECEIVERS, LOCAL_RECEIVERS, SELECTIVE, LOCAL_SELECTIVE = 1, 2, 4, 8  # fan-out lists


class Client:
    """One accepted connection, its state grouped as the engine uses it: who it is, its
    read cache, its subscription, its outbound queue, its state and its counters."""

    __slots__ = (
        # who: the peer's credentials (SO_PEERCRED) and process name, once known
        "id", "sock", "fileno", "pid", "uid", "gid", "process", "connected_at", "label",
        # read cache: the buffer (allocated on the first read) and the incomplete frame
        # kept at its start
        "buffer", "view", "fill", "base",
        # subscription, the fan-out lists it is in (a bit mask), and what it received
        # live: the serial its current subscription started at and earlier stretches
        "mode", "types", "gap_notices", "bridge", "subscribed", "listed", "lists", "since",
        "received", "replays", "floor", "joining", "query_tokens", "query_at",
        # outbound queue
        "out",
        # state
        "reading", "writing", "leaving", "closed", "blocked_at",
        # counters (deliveries are the outbound queue's)
        "messages_in", "bytes_in", "filtered", "invalid", "dropped_unlogged",
        "last_drop_log",
    )

    def __init__(self, client_id: int, sock: socket.socket, out: Outbound,
                 credentials: tuple[int, int, int] | None) -> None:
        self.id = client_id
        self.sock = sock
        self.fileno = sock.fileno()
        self.pid: int | None = credentials[0] if credentials else None
        self.uid: int | None = credentials[1] if credentials else None
        self.gid: int | None = credentials[2] if credentials else None
        self.process = _process_name(self.pid) if self.pid else None
        self.connected_at = time.time()
        self.label = (f"client {client_id} (pid {self.pid} {self.process or '?'})"
                      if self.pid else f"client {client_id}")
        self.buffer: bytearray | None = None  # most clients only consume, and
        self.view: memoryview | None = None    # 1000 x 64 KiB adds up
        self.fill = 0  # bytes of an incomplete frame kept at the start of the buffer
        self.base = 0  # stream offset of buffer[0]: log lines name offsets in the stream
        self.mode = SUBSCRIBE_ALL
        self.types: frozenset[int] = frozenset()
        self.gap_notices = False
        self.bridge = False
        self.subscribed = b""  # the payload of the RELAY_SUBSCRIBE in force (no replay)
        self.listed = False  # in the fan-out lists (once its first read is done)
        self.lists = 0
        self.since = 0  # History serial of the first chunk its subscription received
        self.received: list[Segment] = []  # earlier stretches (History is on)
        self.replays: list[Replayed] = []  # what earlier replays sent it
        self.floor = 0  # no replay reaches below this serial (stretches it forgot)
        self.query_tokens = float(QUERY_BURST)
        self.query_at = 0.0
        self.joining = False  # new, silent: its live data is held for JOIN_GRACE_S
        self.out = out
        self.reading = True
        self.writing = False
        self.leaving = False  # closing, or its write failed: never subscribed again
        self.closed = False
        self.blocked_at = 0.0  # when it began to hold a backpressure pause
        self.messages_in = 0
        self.bytes_in = 0
        self.filtered = 0  # its frames the domain's filter refused
        self.invalid = 0  # its frames that failed a policy, or bad control frames
        self.dropped_unlogged = 0
        self.last_drop_log = 0.0

    def __repr__(self) -> str:
        return f"<Client {self.id} pending={self.out.messages} mode={self.mode}>"


def _peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of a Unix socket, if known."""
    try:
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except (OSError, AttributeError, struct.error):
        return None  # not Linux
    return (pid, uid, gid) if pid > 0 else None


def _supplementary_groups(pid: int) -> frozenset[int]:
    """The supplementary group ids of process ``pid`` (``Groups:`` in
    ``/proc/<pid>/status``; SO_PEERCRED gives only the primary one)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def _process_name(pid: int) -> str | None:
    """The short name of process ``pid`` (``/proc/<pid>/comm``), if it can be read."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as comm:
            return comm.read(64).strip().decode(errors="replace") or None
    except OSError:
        return None


# ---------------------------------------------------------------------------------------
# Relay: the engine
# ---------------------------------------------------------------------------------------


class Relay:
    """A single-threaded ``selectors`` relay for one domain on one Unix socket.

    Binds the socket at construction (so clients may connect at once); ``serve_forever``
    runs the loop until SIGINT/SIGTERM or ``shutdown()``. Every limit has a keyword
    override; ``overflow`` and ``max_message_size`` default to the logic's. Durations
    may be ``math.inf`` (never).
    """

    def __init__(self, logic_: RelayLogic, *, socket_path: str | None = None,
                 queue_limit: int = QUEUE_LIMIT, queue_bytes: int = QUEUE_BYTES,
                 max_connections: int = MAX_CONNECTIONS, overflow: str | None = None,
                 max_message_size: int | None = None,
                 stall_timeout: float = STALL_TIMEOUT_S,
                 drain_timeout: float = DRAIN_TIMEOUT_S, socket_mode: int = SOCKET_MODE,
                 stats_interval: float = STATS_INTERVAL_S,
                 busy_poll: float = BUSY_POLL_S,
                 allow_uids: Iterable[int] | None = None,
                 allow_gids: Iterable[int] | None = None,
                 retain: int = 0, retain_bytes: int = RETAIN_BYTES) -> None:
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
        for name, value in (("stall_timeout", stall_timeout), ("drain_timeout", drain_timeout),
                            ("stats_interval", stats_interval), ("busy_poll", busy_poll)):
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be 0 or more seconds (inf: never), got {value}")
        if retain < 0 or retain_bytes < BUFFER_SIZE:
            raise ValueError(f"retain must be 0 (off) or more messages and retain_bytes at "
                             f"least {BUFFER_SIZE} (one read), got {retain} and {retain_bytes}")
        if not 0 <= socket_mode <= 0o777:
            raise ValueError(f"socket mode {socket_mode:o} is not a permission mode "
                             "(0000..0777)")
        self.queue_limit = queue_limit
        self.queue_bytes = queue_bytes
        self.max_connections = max_connections
        self.stall_timeout = stall_timeout
        self.drain_timeout = drain_timeout
        self.socket_mode = socket_mode
        self.stats_interval = stats_interval
        self.busy_poll = busy_poll
        self.allow_uids = frozenset(allow_uids) if allow_uids is not None else None
        self.allow_gids = frozenset(allow_gids) if allow_gids is not None else None
        self.domain = int(self.logic.domain)
        self.relay_source = int(RELAY_SOURCE.get(self.domain, logic.Source.MARKET_DATA_RELAY))

        self.retain = retain
        self.retain_bytes = retain_bytes
        self.history = History(retain, retain_bytes) if retain else None
        # Retention is chosen once: the fan-out itself, or the fan-out then the ring.
        forward = self._broadcast if self.history is None else self._broadcast_retained
        self.scanner = FrameScanner(self.logic, self.max_message_size, forward=forward,
                                    control=self._control, refuse=self._refuse)
        self.backpressure = Backpressure(stall_timeout)
        # The overflow policy, chosen once: what happens to a client over its limit.
        self._overflow: Callable[[Client], None] = {
            "drop_oldest": self._drop_oldest, "disconnect": self._disconnect_slow,
            "backpressure": self._hold_back}[self.overflow]

        # Counters (Stats). Deliveries live in each client's Outbound; what departed
        # clients had delivered is kept here, so stats() adds up.
        self.connections_total = 0
        self.connections_rejected = 0
        self.bytes_in = 0
        self.messages_filtered = 0
        self.messages_invalid = 0
        self.protocol_errors = 0
        self.messages_dropped = 0
        self.slow_disconnects = 0
        self.departed_messages_out = 0
        self.departed_bytes_out = 0

        self.clients: dict[int, Client] = {}
        # Fan-out lists: insertion-ordered dicts used as sets (a change is a copy in C,
        # ~3.5 us with 1000 clients, where a list's remove() took ~9.5 us), replaced,
        # never changed in place, so a close during a fan-out is safe. "local": without
        # bridges, for what a bridge published.
        self.receivers: dict[Client, None] = {}  # mode 0: every message
        self.local_receivers: dict[Client, None] = {}
        self.selective: dict[Client, None] = {}  # mode 1: messages of listed TLV types
        self.local_selective: dict[Client, None] = {}
        self.failed_writers: list[Client] = []  # write failed: read what they sent, close
        self.joiners: dict[Client, float] = {}  # new clients whose live data is held: until
        self.selections: dict[Client, ReplaySelection] = {}  # replays being chosen
        self.closed_clients: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=CLOSED_CLIENTS_KEPT)
        self.next_client_id = 1
        self.notice_sequence = 0  # header sequence of the frames the relay makes
        self.last_warning: dict[str, float] = {}
        self.accept_resume_at = 0.0
        self.accept_deferred = False  # at max_connections: one loop turn granted to EOFs
        self.stopping = False
        self.hurry = False  # a second stop signal: end the drain now
        self.serving = False
        self.stats_requested = False
        self.stopped = threading.Event()
        self.started_at = time.time()
        self.started_monotonic = _monotonic()
        self.last_stats: tuple[float, Stats] = (self.started_monotonic, self.stats())

        self.selector = selectors.DefaultSelector()
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.wake_writer.setblocking(False)
        self.selector.register(self.wake_reader, selectors.EVENT_READ, None)
        self.spare_fd: int | None = os.open(os.devnull, os.O_RDONLY)
        self.socket_file = SocketFile(self.socket_path, socket_mode)
        self.listener: socket.socket | None = None
        try:
            self._listen()
        except BaseException:
            self._release()
            raise

    @property
    def paused(self) -> bool:
        """True while backpressure has stopped reading from every client."""
        return self.backpressure.paused

    # -- setup ---------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = self.socket_file.bind()
        listener.setblocking(False)
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ, None)
        log.info("%s relay listening on %s (pid %d, socket mode %04o, overflow %s, "
                 "checksum %s, max message %d B%s)", self.logic.name, self.socket_path,
                 os.getpid(), self.socket_mode, self.overflow, self.logic.checksum,
                 self.max_message_size, f", retain {self.retain}" if self.retain else "")
        if self.socket_mode & 0o002:  # connecting needs write permission
            log.warning("socket mode %04o lets every local user connect to this relay; "
                        "narrow it (e.g. --socket-mode 0660 with --allow-gid)",
                        self.socket_mode)

    # -- public API ----------------------------------------------------------------------

    def stats(self) -> Stats:
        """A snapshot of the counters; safe to call from any thread."""
        clients = list(self.clients.values())
        return Stats(
            connections_active=len(clients),
            connections_total=self.connections_total,
            connections_rejected=self.connections_rejected,
            messages_in=self.scanner.messages_in,
            bytes_in=self.bytes_in,
            messages_out=self.departed_messages_out + sum(c.out.messages_out for c in clients),
            bytes_out=self.departed_bytes_out + sum(c.out.bytes_out for c in clients),
            messages_filtered=self.messages_filtered,
            messages_invalid=self.messages_invalid,
            protocol_errors=self.protocol_errors,
            messages_dropped=self.messages_dropped,
            slow_disconnects=self.slow_disconnects,
            backpressure_pauses=self.backpressure.pauses,
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

        Signal handlers are installed only when called from the main thread. They stay
        installed until the socket is removed and the final stats are logged, so a
        second (or tenth) stop signal only ends the drain early: the relay still exits
        cleanly.
        """
        if self.stopped.is_set() or self.serving:
            raise RelayError("serve_forever() can run once per Relay; make a new one")
        self.serving = True
        previous: dict[signal.Signals, Any] = {}
        previous_wakeup_fd = -1
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
            _notify_systemd("READY=1")
            self._loop()
            _notify_systemd("STOPPING=1")
            self._drain()
        finally:
            if previous:  # before _release closes the wake-up socket
                signal.set_wakeup_fd(previous_wakeup_fd)
            self._release()
            self._log_stats(final=True)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
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
        name = signal.Signals(signum).name
        if self.stopping:
            log.info("%s received again: ending the drain now", name)
            self.hurry = True
        else:
            log.info("%s received: draining and stopping", name)
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
        next_stats = _monotonic() + self.stats_interval if self.stats_interval > 0 else math.inf
        busy_poll = self.busy_poll
        sched_yield = os.sched_yield
        spin_until = 0.0
        while not self.stopping:
            if busy_poll and _monotonic() < spin_until:
                # Busy polling: right after traffic, poll without sleeping so the next
                # frame is seen without a wake-up (p50 one hop 42 -> ~25 us).
                events = select(0)
                if events:
                    spin_until = _monotonic() + busy_poll
                else:
                    # Let a client waiting for this CPU run first: spinning through
                    # the scheduler's slice held fixed-rate p99 at ~2.4 ms on 2 cores.
                    sched_yield()
            else:
                events = select(self._timeout(next_stats))
                spin_until = _monotonic() + busy_poll
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
            now = _monotonic()
            if self.joiners:
                for client, until in list(self.joiners.items()):
                    if now >= until:
                        self._joined(client)
            if self.selections:
                self._select_replays()
            if self.backpressure.paused:
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
        if self.selections:
            return 0.0  # replays are being chosen: a turn of work each loop
        deadline = min(next_stats, self.backpressure.deadline())
        if self.joiners:
            deadline = min(deadline, *self.joiners.values())
        if self.accept_resume_at:
            deadline = min(deadline, self.accept_resume_at)
        if deadline == math.inf:
            return None
        return min(MAX_WAIT_S, max(0.0, deadline - _monotonic()))

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
                self._refuse_connection(sock, f"refused: {len(self.clients)} clients are "
                                        f"connected, the limit is --max-connections "
                                        f"{self.max_connections}")
                self.connections_rejected += 1
                self._warn("reject", "refused a connection: %d clients connected, the "
                           "limit is --max-connections %d (%d refused so far)",
                           len(self.clients), self.max_connections,
                           self.connections_rejected)
                continue
            self._add_client(sock)

    def _add_client(self, sock: socket.socket) -> None:
        credentials = _peer_credentials(sock)
        if not self._admitted(credentials):
            pid, uid, gid = credentials or (None, None, None)
            self._refuse_connection(sock, f"refused: uid {uid} / gid {gid} is not admitted "
                                    f"by --allow-uid {_id_list(self.allow_uids)} / "
                                    f"--allow-gid {_id_list(self.allow_gids)}")
            self.connections_rejected += 1
            self._warn("credentials", "refused a connection from pid %s (uid %s, gid %s, "
                       "%s): not in --allow-uid %s / --allow-gid %s (%d refused so far)",
                       pid, uid, gid, _process_name(pid) if pid else "?",
                       _id_list(self.allow_uids), _id_list(self.allow_gids),
                       self.connections_rejected)
            return
        sock.setblocking(False)
        client = Client(self.next_client_id, sock,
                        Outbound(sock, self.queue_limit, self.queue_bytes, self._gap_notice),
                        credentials)
        self.next_client_id += 1
        self.connections_total += 1
        self.clients[client.fileno] = client
        log.debug("%s: connected (uid %s, %d active)", client.label, client.uid,
                  len(self.clients))
        # Read what it sent with its connect (a RELAY_SUBSCRIBE, a replay request, a
        # query) before it joins the fan-out, so it does not get a few messages it never
        # asked for first, and so `stats` is answered even while backpressure pauses
        # reading (this one read is all a newcomer gets until the pause ends).
        self.selector.register(sock, selectors.EVENT_READ, client)
        self._read_ready(client)
        if self.backpressure.paused and not client.closed:
            client.reading = False  # joins the pause; resumes with everyone else
            self._update_events(client)
        if (self.history is not None and not client.leaving and not client.messages_in
                and client.mode != SUBSCRIBE_NONE):
            # It sent nothing with its connect yet: hold its live data a moment, so a
            # replay request on its way still comes first (the seam stays in order).
            client.out.hold(grace=True)
            client.joining = True
            self.joiners[client] = _monotonic() + JOIN_GRACE_S
        client.listed = True
        if self.history is not None:
            client.since = self.history.serial + 1
        self._relist(client)

    def _refuse_connection(self, sock: socket.socket, why: str) -> None:
        """Tell a connection it is refused (an Error frame), then close it."""
        try:
            sock.setblocking(False)
            sock.send(logic.error_message(why, source=self.relay_source))
        except OSError:
            pass  # it is gone already, or its buffer is full: the close says enough
        sock.close()

    def _joined(self, client: Client) -> None:
        """A new client's first frames arrived (or the grace ran out): release the live
        data held for it, unless a replay now goes first."""
        client.joining = False
        self.joiners.pop(client, None)
        if client.leaving:
            return
        try:
            status = client.out.release()
        except OSError as exc:
            self._write_failed(client, exc)
            return
        if status:
            self._pushed(client, status)
        self._wrote(client)

    def _admitted(self, credentials: tuple[int, int, int] | None) -> bool:
        if self.allow_uids is None and self.allow_gids is None:
            return True
        if credentials is None:
            return False
        pid, uid, gid = credentials
        if self.allow_uids and uid in self.allow_uids:
            return True
        if not self.allow_gids:
            return False
        return gid in self.allow_gids or not self.allow_gids.isdisjoint(
            _supplementary_groups(pid))

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
        self.accept_resume_at = _monotonic() + ACCEPT_RETRY_S

    def _resume_accepting(self) -> None:
        self.accept_resume_at = 0.0
        if self.listener is not None and not self.stopping:
            self.selector.register(self.listener, selectors.EVENT_READ, None)
        if self.spare_fd is None:
            try:
                self.spare_fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                pass

    # -- the read path: one recv, then the scanner walks and forwards --------------------

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
            self._close(client, f"read failed: {exc.strerror or exc}", logging.DEBUG)
            return
        if not received:
            why = "peer closed the connection" if not fill else (
                f"peer closed the connection with {fill} bytes of an incomplete frame")
            self._close(client, why, logging.DEBUG)
            return
        self.bytes_in += received
        client.bytes_in += received
        end = fill + received
        client.base = client.bytes_in - end  # stream offset of buffer[0], for log lines
        scanner = self.scanner
        before = scanner.messages_in
        pos = scanner.scan(client, buffer, end)
        client.messages_in += scanner.messages_in - before
        if client.joining:
            self._joined(client)
        if pos == end and len(buffer) == BUFFER_SIZE:
            client.fill = 0  # the common case of _keep_rest: nothing left over
        elif pos >= 0:
            self._keep_rest(client, buffer, pos, end)
        else:
            self._protocol_error(client, buffer, ~pos)

    def _keep_rest(self, client: Client, buffer: bytearray, pos: int, end: int) -> None:
        """Move an incomplete frame to the buffer's start. A frame larger than the
        buffer grows it as its bytes arrive (doubling, never past the frame's size), so
        memory follows what was received, not what a header announced; the buffer
        shrinks back once that frame has gone."""
        rest = end - pos
        client.fill = rest
        size = len(buffer)
        if pos:
            buffer[:rest] = buffer[pos:end]
        needed = (HEADER_SIZE + FRAME_START.unpack_from(buffer, 0)[2]
                  if rest >= HEADER_SIZE else rest)
        if needed > size and rest * 2 >= size:
            grown = bytearray(min(needed, 2 * size))
            grown[:rest] = buffer[:rest]
            client.buffer, client.view = grown, memoryview(grown)
        elif size > BUFFER_SIZE and rest * 2 < BUFFER_SIZE and needed <= BUFFER_SIZE:
            small = bytearray(BUFFER_SIZE)
            small[:rest] = buffer[:rest]
            client.buffer, client.view = small, memoryview(small)

    def _protocol_error(self, client: Client, buffer: bytearray, pos: int) -> None:
        magic, domain_version, payload_size = FRAME_START.unpack_from(buffer, pos)
        if magic != MAGIC:
            why = f"bad magic 0x{magic:08x}"
        elif domain_version >> 8 != VERSION:
            why = f"unknown version {domain_version >> 8}"
        else:
            why = (f"payload_size {payload_size} makes a {HEADER_SIZE + payload_size}-byte "
                   f"frame, over max_message_size {self.max_message_size}")
        self.protocol_errors += 1
        self._close(client, f"{why} at offset {client.base + pos}", logging.WARNING)

    def _refuse(self, client: Client, why: str, pos: int, invalid: bool) -> None:
        """A frame the domain's rules dropped: count it, say so (at most once a second)."""
        if invalid:
            self.messages_invalid += 1
            client.invalid += 1
            self._warn("invalid", "%s: dropped an invalid frame at offset %d: %s "
                       "(%d invalid frames in total; at most one such line a second)",
                       client.label, client.base + pos, why, self.messages_invalid)
        else:
            self.messages_filtered += 1
            client.filtered += 1
            if self.scanner.default_filter:  # a custom filter refuses by design
                self._warn("filtered", "%s: filtered a frame at offset %d: %s (%d filtered "
                           "in total; at most one such line a second)", client.label,
                           client.base + pos, why, self.messages_filtered)

    # -- fan-out -------------------------------------------------------------------------

    def _relist(self, client: Client) -> None:
        """Put ``client`` in the fan-out lists its subscription and state call for.
        Only lists that change are replaced, so a flood of identical RELAY_SUBSCRIBEs
        costs next to nothing."""
        if not client.listed:
            return  # still being accepted: it is listed once its first read is done
        wanted = 0
        if not client.leaving:
            if client.mode == SUBSCRIBE_ALL:
                wanted = RECEIVERS | (0 if client.bridge else LOCAL_RECEIVERS)
            elif client.mode == SUBSCRIBE_TYPES:
                wanted = SELECTIVE | (0 if client.bridge else LOCAL_SELECTIVE)
        had = client.lists
        if had == wanted:
            return
        client.lists = wanted
        for bit, name in ((RECEIVERS, "receivers"), (LOCAL_RECEIVERS, "local_receivers"),
                          (SELECTIVE, "selective"), (LOCAL_SELECTIVE, "local_selective")):
            if (had ^ wanted) & bit:
                members = dict(getattr(self, name))
                if wanted & bit:
                    members[client] = None
                else:
                    del members[client]
                setattr(self, name, members)

    def _broadcast(self, sender: Client, chunk: bytes, count: int) -> None:
        """Queue one chunk (``count`` whole frames) for every other client: the same
        ``bytes`` object in every queue. What a bridge published skips the bridges."""
        entry = (chunk, count, 0)
        if sender.bridge:
            receivers, selective = self.local_receivers, self.local_selective
        else:
            receivers, selective = self.receivers, self.selective
        for receiver in receivers:
            if receiver is not sender and not receiver.leaving:
                # _deliver, inline: one call fewer per receiver and chunk.
                try:
                    status = receiver.out.push(entry)
                except OSError as exc:
                    self._write_failed(receiver, exc)
                    continue
                if status:
                    self._pushed(receiver, status)
        if selective:
            self._broadcast_selective(sender, chunk, selective)

    def _broadcast_retained(self, sender: Client, chunk: bytes, count: int) -> None:
        """``_broadcast``, then keep the chunk for replays (the same object)."""
        self._broadcast(sender, chunk, count)
        history = self.history
        assert history is not None
        history.append(chunk, count, sender.id, sender.bridge)

    def _broadcast_selective(self, sender: Client, chunk: bytes,
                             selective: dict[Client, None]) -> None:
        """Mode 1 clients get the frames whose first TLV type they listed; clients with
        the same list share one filtered copy."""
        frames: list[tuple[int, int, int | None]] = []
        pos, end = 0, len(chunk)
        while pos < end:
            nxt = pos + HEADER_SIZE + FRAME_START.unpack_from(chunk, pos)[2]
            frames.append((pos, nxt, logic.first_tlv_type(chunk, pos)))
            pos = nxt
        shared: dict[frozenset[int], Entry | None] = {}
        for receiver in selective:
            if receiver is sender or receiver.leaving:
                continue
            types = receiver.types
            if types not in shared:
                parts = [chunk[a:b] for a, b, t in frames if t in types]
                shared[types] = (b"".join(parts), len(parts), 0) if parts else None
            entry = shared[types]
            if entry is not None:
                self._deliver(receiver, entry)

    def _deliver(self, client: Client, entry: Entry) -> None:
        """Queue one entry for one client, and act on what its queue reports."""
        try:
            status = client.out.push(entry)
        except OSError as exc:
            self._write_failed(client, exc)
            return
        if status:
            self._pushed(client, status)

    def _deliver_own(self, client: Client, frame: bytes, kind: int) -> None:
        """Queue a frame the relay made for this client (a notice or a reply)."""
        try:
            status = client.out.push_notice(frame, kind)
        except OSError as exc:
            self._write_failed(client, exc)
            return
        if status:
            self._pushed(client, status)

    def _pushed(self, client: Client, status: int) -> None:
        if status & WAITING and not client.writing:
            self._watch_writes(client, True)
        if status & OVER:
            self._overflow(client)

    # -- the write path ------------------------------------------------------------------

    def _write_ready(self, client: Client) -> None:
        """The socket is writable: write what is pending, in one sendmsg."""
        out = client.out
        try:
            out.write()
        except OSError as exc:
            self._write_failed(client, exc)
            return
        if not out.pending:
            self._watch_writes(client, False)
        self._wrote(client)

    def _wrote(self, client: Client) -> None:
        """Its queue shrank: back under low water, it no longer holds a pause."""
        holders = self.backpressure.holders
        if holders and client in holders and client.out.under_low_water():
            self._unhold(client)

    def _write_failed(self, client: Client, exc: OSError) -> None:
        """The client cannot take data (it closed, or shut down its reading side). Do
        not close it yet: what it sent before going away may still wait in its socket.
        Mark it leaving (it is never subscribed again, and leaves every fan-out list),
        stop writing to it; after this batch of events ``_finish_failed_writers``
        forwards what it sent and closes it (later, not here: forwarding its data may
        fail a write to another departed client, and recursion has no bound)."""
        if client.leaving:
            return
        client.leaving = True
        client.out.clear()
        client.writing = False
        self._relist(client)
        self._update_events(client)
        self._unhold(client)
        self.failed_writers.append(client)
        log.debug("%s: write failed (%s); reading what it sent, then closing",
                  client.label, exc.strerror or exc)

    def _finish_failed_writers(self) -> None:
        """Forward what departed clients sent before they went away, then close them."""
        while self.failed_writers:
            client = self.failed_writers.pop()
            if self.backpressure.paused:
                continue  # reading stays paused; on resume the read path finds its EOF
            for _ in range(FAILED_WRITER_READS):
                if client.closed:
                    break
                received = client.bytes_in
                self._read_ready(client)  # closes it at EOF or on a reset
                if client.bytes_in == received:
                    break  # nothing more waiting
            if not client.closed:
                self._close(client, "went away (a write to it failed)", logging.DEBUG)

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

    # -- overflow: the three policies ----------------------------------------------------

    def _drop_oldest(self, client: Client) -> None:
        """drop_oldest: drop whole chunks from the head of its queue; tell it in-band."""
        out = client.out
        dropped = out.drop_oldest(client.gap_notices)
        if not dropped:
            return
        self.messages_dropped += dropped
        client.dropped_unlogged += dropped
        now = _monotonic()
        if now - client.last_drop_log >= WARNING_INTERVAL_S:
            log.warning("%s: slow consumer, dropped %d oldest messages (%d in total for "
                        "this client)", client.label, client.dropped_unlogged, out.dropped)
            client.last_drop_log = now
            client.dropped_unlogged = 0

    def _gap_notice(self, dropped: int, total: int) -> bytes:
        self.notice_sequence += 1
        return logic.gap_message(dropped, total, source=self.relay_source,
                                 sequence=self.notice_sequence)

    def _disconnect_slow(self, client: Client) -> None:
        """disconnect: the slow client is closed; the others never notice."""
        self.slow_disconnects += 1
        out = client.out
        self._close(client, f"slow consumer: {out.messages} messages / {out.bytes} bytes "
                    f"pending, over the limit of {self.queue_limit} / {self.queue_bytes}",
                    logging.WARNING)

    # -- backpressure: pause, resume, stalls ---------------------------------------------

    def _hold_back(self, client: Client) -> None:
        """backpressure: over its limit, the client pauses reading from everyone (or
        holds the pause that is on). A publish-only client never holds anyone back."""
        if client.mode == SUBSCRIBE_NONE or client.leaving:
            return
        backpressure = self.backpressure
        if backpressure.paused:
            backpressure.hold(client, _monotonic())
            return
        holders = {c for c in self.clients.values()
                   if c.mode != SUBSCRIBE_NONE and not c.leaving and not c.out.under_low_water()}
        holders.add(client)
        backpressure.pause(holders, _monotonic())
        for other in self.clients.values():
            other.reading = False
            self._update_events(other)
        self._note("pause", "backpressure: paused reading, %d slow clients over the limit "
                   "(%d pauses so far)", len(holders), backpressure.pauses)

    def _unhold(self, client: Client) -> None:
        """``client`` no longer holds the pause (drained, leaving, publish-only)."""
        if self.backpressure.release(client):
            self._resume()

    def _resume(self) -> None:
        if self.stopping:
            return  # draining: reading stays off
        backpressure = self.backpressure
        paused_for = _monotonic() - backpressure.paused_at
        backpressure.end()
        for client in list(self.clients.values()):
            client.reading = True
            self._update_events(client)
        self._note("resume", "backpressure: resumed reading after %.3f s", paused_for)

    def _check_stalls(self, now: float) -> None:
        for client in self.backpressure.stalled(now):
            since = max(client.blocked_at, client.out.progress_at)
            self.slow_disconnects += 1
            self._close(client, f"no write progress for {now - since:.1f} s while the relay "
                        f"is paused ({client.out.messages} messages pending)",
                        logging.WARNING)

    # -- control frames: addressed to the relay, never forwarded -------------------------

    def _control(self, client: Client, frame: bytes, pos: int) -> None:
        if frame[HEADER_SIZE:] == client.subscribed:
            return  # the same RELAY_SUBSCRIBE again (no replay): nothing changes
        try:
            self._apply_control(client, frame, pos)
        except (ProtocolError, ValueError, OverflowError) as exc:
            # Whatever a control frame holds, it is counted, never let out of the loop.
            self._refuse(client, f"bad control frame: {exc}", pos, True)

    def _apply_control(self, client: Client, frame: bytes, pos: int) -> None:
        _, tlvs = logic.parse_message(frame)
        kind = tlvs[0][0]
        if kind == RELAY_SUBSCRIBE:
            self._subscribe(client, tlvs, pos)
        elif kind == RELAY_QUERY:
            self._query(client, tlvs[0][1], pos)
        elif kind == RELAY_GAP and client.bridge:
            self._upstream_gap(client, tlvs[0][1], pos)
        elif kind == RELAY_GAP:
            self._refuse(client, "RELAY_GAP from a client that is not a bridge", pos, True)
        else:
            self._refuse(client, f"{TLV_NAMES.get(kind, kind)} frames are sent by relays, "
                         "not to them", pos, True)

    def _subscribe(self, client: Client, tlvs: list[tuple[int, bytes]], pos: int) -> None:
        try:
            subscription = logic.decode_subscribe(tlvs[0][1])
            replay = (logic.decode_replay(tlvs[1][1])
                      if len(tlvs) > 1 and tlvs[1][0] == RELAY_REPLAY else None)
        except ProtocolError as exc:
            self._refuse(client, f"bad RELAY_SUBSCRIBE: {exc}", pos, True)
            return
        if client.leaving:
            return  # its write failed: it is never subscribed again
        if replay is not None and client.out.replaying():
            self._refuse(client, "RELAY_SUBSCRIBE with a RELAY_REPLAY while an earlier "
                         "replay is still being sent", pos, True)
            return
        before = (client.mode, client.types, client.bridge)
        client.subscribed = logic.encode_tlvs(tlvs[:1]) if replay is None else b""
        client.mode = subscription.mode
        client.types = subscription.tlv_types
        client.gap_notices = subscription.gap_notices
        client.bridge = subscription.bridge
        history = self.history
        if history is not None and client.listed and before != (
                client.mode, client.types, client.bridge):
            # What it received under the old subscription, for a replay's seam.
            if before[0] != SUBSCRIBE_NONE and client.since <= history.serial:
                client.received.append((client.since, history.serial + 1, *before))
                client.received = self._forget(client, client.received, SEGMENTS_KEPT)
            client.since = history.serial + 1
        self._relist(client)
        if client.mode == SUBSCRIBE_NONE:
            self._unhold(client)  # a publish-only client never holds a pause
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: subscribed mode %d types %s gap notices %s bridge %s%s",
                      client.label, client.mode, sorted(client.types), client.gap_notices,
                      client.bridge, f" replay {replay}" if replay else "")
        if replay is not None:
            self._replay(client, replay, pos)

    def _replay(self, client: Client, replay: logic.Replay, pos: int) -> None:
        """Start a replay: live data is held from now on, and the retained messages the
        client asked for are chosen a turn of work at a time (``_select_replays``);
        then they go out, then the RELAY_LIVE marker, then what was held (the seam:
        nothing twice, nothing missed)."""
        history = self.history
        if history is None or client.mode == SUBSCRIBE_NONE:
            self._send_replay(client, replay, [], 0, replay.last if history is None else 0)
            return
        received = list(client.received)
        if client.listed and client.since <= history.serial:
            received.append((client.since, history.serial + 1, client.mode, client.types,
                             client.bridge))
        client.out.begin_replay()
        self.selections[client] = ReplaySelection(history, client, replay, received,
                                                  client.replays, client.floor)

    def _select_replays(self) -> None:
        """A turn of selection work for every replay being chosen; send those done."""
        budget = max(1000, REPLAY_STEP_FRAMES // len(self.selections))
        for client, selection in list(self.selections.items()):
            if not selection.step(budget):
                continue
            del self.selections[client]
            history = self.history
            assert history is not None
            replay = selection.replay
            if selection.cut is not None:
                client.replays.append((*selection.cut, history.serial + 1, selection.mode,
                                       selection.types, selection.bridge, replay.since_ns))
                client.replays = self._forget(client, client.replays, REPLAYS_KEPT)
            # What left the ring, but never the client's own (it would not get them).
            lost = (history.trimmed - history.trimmed_from[client.id]
                    + selection.below_floor)
            if replay.since_ns and history.chunks and (
                    HEADER.unpack_from(history.chunks[0][0])[6] <= replay.since_ns):
                lost = selection.below_floor  # the time bound falls inside the ring
            self._send_replay(client, replay, selection.pieces(), selection.found, lost)

    def _send_replay(self, client: Client, replay: logic.Replay,
                     pieces: list[ReplayPiece], found: int, lost: int) -> None:
        unavailable = min(replay.last - found, lost) if replay.last > found else 0
        self.notice_sequence += 1
        marker = logic.live_message(found, unavailable, source=self.relay_source,
                                    sequence=self.notice_sequence)
        try:
            status = client.out.start_replay(pieces, marker)
        except OSError as exc:
            self._write_failed(client, exc)
            return
        if status:
            self._pushed(client, status)
        log.debug("%s: replaying %d messages (%d unavailable)", client.label, found,
                  unavailable)

    def _forget(self, client: Client, records: list[Any], kept: int) -> list[Any]:
        """Keep the last ``kept`` records of what a client received (stretches, or
        replays: the serial after each is ``record[1]`` / ``record[2]``) that the ring
        still holds. A record forgotten while the ring still holds its chunks raises
        the client's floor: no replay reaches below it (nothing twice)."""
        history = self.history
        assert history is not None
        oldest = history.chunks[0][2] if history.chunks else history.serial + 1
        end = 1 if len(records[0]) == 5 else 2  # Segment or Replayed
        for record in records[:-kept]:
            if record[end] > oldest:
                client.floor = max(client.floor, record[end])
        return [r for r in records[-kept:] if r[end] > oldest]

    def _upstream_gap(self, bridge: Client, value: bytes, pos: int) -> None:
        """A bridge reports messages lost before they reached this host: every other
        non-bridge client that receives data and asked for gap notices is told, after
        the data that bridge sent before it."""
        try:
            gap = logic.decode_gap(value)
        except ProtocolError as exc:
            self._refuse(bridge, f"bad RELAY_GAP: {exc}", pos, True)
            return
        if not gap.dropped:
            return
        for client in list(self.clients.values()):
            if (client is bridge or client.leaving or client.bridge or not client.gap_notices
                    or client.mode == SUBSCRIBE_NONE):
                continue
            try:
                status = client.out.tell_lost(gap.dropped)
            except OSError as exc:
                self._write_failed(client, exc)
                continue
            if status:
                self._pushed(client, status)
        log.debug("%s: upstream loss of %d messages reported", bridge.label, gap.dropped)

    # -- queries: stats and clients, answered to the asking client alone -----------------

    def _query(self, client: Client, value: bytes, pos: int) -> None:
        try:
            what = logic.decode_query(value)
        except ProtocolError as exc:
            self._refuse(client, f"bad RELAY_QUERY: {exc}", pos, True)
            return
        if client.leaving:
            return
        now = _monotonic()
        client.query_tokens = min(float(QUERY_BURST), client.query_tokens
                                  + (now - client.query_at) * QUERY_RATE_S)
        client.query_at = now
        if client.query_tokens < 1:
            self._refuse(client, f"query not answered: more than {QUERY_RATE_S:g} a second "
                         "from one client", pos, True)
            return
        client.query_tokens -= 1
        if client.out.bytes > self.queue_bytes:
            # Replies are never dropped, so a client that asks and never reads would
            # grow its queue without bound: it gets no answer until it drains.
            self._refuse(client, f"query not answered: {client.out.bytes} bytes already "
                         f"wait for it, over --queue-bytes {self.queue_bytes}", pos, True)
            return
        report = self.report(what)
        report["you"] = client.id
        document = json.dumps(report, separators=(",", ":")).encode()
        while len(document) > logic.MAX_MESSAGE_SIZE - HEADER_SIZE - 5 * (
                len(document) // logic.MAX_TLV_VALUE_SIZE + 1) and report.get("clients"):
            # One frame holds at most 1 MiB: leave out the oldest connections (never
            # the asker, which looks itself up: send and replay do).
            clients = report["clients"]
            drop = max(1, len(clients) // 4)
            kept = [c for c in clients if c["id"] == client.id]
            others = [c for c in clients if c["id"] != client.id]
            report["clients_left_out"] = report.get("clients_left_out", 0) + min(
                drop, len(others))
            report["clients"] = others[drop:] + kept
            document = json.dumps(report, separators=(",", ":")).encode()
        self.notice_sequence += 1
        frame = logic.report_message(document, source=self.relay_source,
                                     sequence=self.notice_sequence)
        self._deliver_own(client, frame, REPLY)

    def report(self, what: int) -> dict[str, Any]:
        """The JSON-ready answer to a ``RELAY_QUERY``: ``logic.QUERY_STATS`` or
        ``logic.QUERY_CLIENTS`` (SPEC.md "Operating a running relay")."""
        if what == logic.QUERY_STATS:
            return {"relay": self._relay_info(), "counters": asdict(self.stats())}
        return {"relay": self._relay_info(),
                "clients": [self._client_info(c) for c in self.clients.values()],
                "closed": list(self.closed_clients)}

    def _relay_info(self) -> dict[str, Any]:
        return {
            "name": self.logic.name, "domain": self.domain, "socket": self.socket_path,
            "pid": os.getpid(), "version": __version__, "started_at": self.started_at,
            "uptime_s": round(_monotonic() - self.started_monotonic, 3),
            "overflow": self.overflow,
            "checksum": self.logic.checksum, "max_message_size": self.max_message_size,
            "queue_limit": self.queue_limit, "queue_bytes": self.queue_bytes,
            "max_connections": self.max_connections, "paused": self.backpressure.paused,
            "socket_mode": f"{self.socket_mode:04o}", "retain": self.retain,
            "retain_bytes": self.retain_bytes,
            "retained_messages": self.history.messages if self.history else 0,
            "retained_bytes": self.history.bytes if self.history else 0,
            "pending_messages": sum(c.out.messages for c in self.clients.values()),
            "pending_bytes": sum(c.out.bytes for c in self.clients.values()),
        }

    @staticmethod
    def _client_info(client: Client) -> dict[str, Any]:
        out = client.out
        return {
            "id": client.id, "pid": client.pid, "uid": client.uid, "gid": client.gid,
            "process": client.process, "connected_at": client.connected_at,
            "mode": client.mode, "types": sorted(client.types),
            "gap_notices": client.gap_notices, "bridge": client.bridge,
            "messages_in": client.messages_in, "bytes_in": client.bytes_in,
            "filtered": client.filtered, "invalid": client.invalid,
            "messages_out": out.messages_out, "bytes_out": out.bytes_out,
            "pending_messages": out.messages, "pending_bytes": out.bytes,
            "dropped": out.dropped, "replaying": out.replaying(),
        }

    # -- closing and shutdown ------------------------------------------------------------

    def _close(self, client: Client, why: str, level: int = logging.INFO) -> None:
        """Close one client; others never notice. Pending data is discarded. ``why``
        is logged once, and kept for the ``clients`` report in the same words."""
        if client.closed:
            return
        client.closed = True
        client.leaving = True
        self.joiners.pop(client, None)
        self.selections.pop(client, None)
        if self.history is not None:
            self.history.trimmed_from.pop(client.id, None)  # it will never ask again
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        self.clients.pop(client.fileno, None)
        self._relist(client)
        out = client.out
        out.clear()
        self.departed_messages_out += out.messages_out
        self.departed_bytes_out += out.bytes_out
        self._unhold(client)
        self.closed_clients.appendleft({
            "id": client.id, "pid": client.pid, "process": client.process,
            "connected_at": client.connected_at, "closed_at": time.time(), "reason": why,
            "messages_in": client.messages_in, "messages_out": out.messages_out,
            "dropped": out.dropped})
        log.log(level, "%s: %s, closing (in %d, out %d, dropped %d messages)", client.label,
                why, client.messages_in, out.messages_out, out.dropped)

    def _drain(self) -> None:
        """Stop accepting and reading; write what is pending for up to drain_timeout
        (or until a second stop signal)."""
        if self.listener is not None:
            try:
                self.selector.unregister(self.listener)
            except (KeyError, ValueError):
                pass
            self.listener.close()
        self.accept_resume_at = 0.0
        self.backpressure.end()
        for client in list(self.clients.values()):
            client.reading = False
            self._update_events(client)
        deadline = _monotonic() + self.drain_timeout
        while any(c.out.pending for c in self.clients.values()):
            remaining = deadline - _monotonic()
            if remaining <= 0 or self.hurry:
                left = sum(c.out.messages for c in self.clients.values())
                log.warning("drain %s: %d messages still pending were discarded",
                            "cut short" if self.hurry else "timeout", left)
                break
            for key, mask in self.selector.select(min(remaining, MAX_WAIT_S)):
                if key.data is not None and mask & selectors.EVENT_WRITE:
                    self._write_ready(key.data)
                elif key.fileobj is self.wake_reader:
                    self._drain_wake()

    def _release(self) -> None:
        """Close every connection and the listener; remove the socket if still ours."""
        for client in list(self.clients.values()):
            client.closed = True
            client.sock.close()
            self.departed_messages_out += client.out.messages_out
            self.departed_bytes_out += client.out.bytes_out
        self.clients.clear()
        self.receivers, self.local_receivers = {}, {}
        self.selective, self.local_selective = {}, {}
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self.socket_file.remove()
        for sock in (self.wake_reader, self.wake_writer):
            sock.close()
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
        self.selector.close()

    # -- stats and warnings --------------------------------------------------------------

    def _log_stats(self, final: bool = False) -> None:
        now = _monotonic()
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
        self._limited(logging.WARNING, cause, message, *args)

    def _note(self, cause: str, message: str, *args: object) -> None:
        """Log an INFO line at most once a second per cause."""
        self._limited(logging.INFO, cause, message, *args)

    def _limited(self, level: int, cause: str, message: str, *args: object) -> None:
        now = _monotonic()
        if now - self.last_warning.get(cause, -math.inf) >= WARNING_INTERVAL_S:
            self.last_warning[cause] = now
            log.log(level, message, *args)


def _id_list(ids: frozenset[int] | None) -> str:
    return ",".join(map(str, sorted(ids))) if ids else "-"


def _notify_systemd(state: str) -> None:
    """Tell systemd (``Type=notify``) our state over ``NOTIFY_SOCKET``, if it is set."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc.strerror or exc)
# ---------------------------------------------------------------------------------------
# Clients: RelayClient (blocking) and AsyncRelayClient (asyncio)
# ---------------------------------------------------------------------------------------

RECV_BYTES = 256 * 1024  # one client read: thousands of small frames
CONNECT_TIMEOUT_S = 5.0  # a connect with no timeout of its own gives up after this
RECONNECT_FIRST_DELAY_S = 0.05  # reconnect backoff: doubling from this ...
RECONNECT_MAX_DELAY_S = 1.0  # ... to this
RECONNECT_TIMEOUT_S = 30.0  # give up when the relay has been gone this long


SPLIT_FRAMES = 64  # frames of one size cut per Struct call (FrameBatch.frames)
_SPLITTERS: dict[int, struct.Struct] = {}


class FrameBatch:
    """Whole frames from one read, without a copy each.

    ``data`` holds them back to back; frame ``i`` is ``data[offsets[i]:offsets[i + 1]]``
    (``offsets`` has one entry more than there are frames; a ``range`` when the batch
    is one run of 16 or more frames of one size, the common case of a feed of Trades).
    ``data`` is an immutable ``bytes`` object that no later read reuses, so a batch
    stays valid for as long as you keep it. Parse in place with
    ``struct.unpack_from(data, offset)``; iterating (or ``batch[i]``, negative indices
    too) copies each frame out as ``bytes``.
    """

    __slots__ = ("data", "offsets")

    def __init__(self, data: bytes, offsets: range | list[int]) -> None:
        self.data = data
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> bytes:
        count = len(self.offsets) - 1
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"frame {index} of a batch of {count}")
        offsets = self.offsets
        return self.data[offsets[index]:offsets[index + 1]]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.frames())

    def frames(self) -> list[bytes]:
        """Every frame as ``bytes``."""
        data, offsets = self.data, self.offsets
        if not isinstance(offsets, range):
            return [data[a:b] for a, b in itertools.pairwise(offsets)]
        size, start, count = offsets.step, offsets.start, len(offsets) - 1
        # Shaped for speed: frames of one size are cut by a Struct of SPLIT_FRAMES
        # "{size}s" fields, in C: ~20 ns a frame instead of ~100 for a comprehension.
        whole = count - count % SPLIT_FRAMES
        frames: list[bytes] = []
        if whole:
            splitter = _SPLITTERS.get(size)
            if splitter is None:
                if len(_SPLITTERS) > 64:
                    _SPLITTERS.clear()
                splitter = _SPLITTERS[size] = struct.Struct(f"{size}s" * SPLIT_FRAMES)
            frames = list(itertools.chain.from_iterable(
                splitter.iter_unpack(memoryview(data)[start:start + whole * size])))
        if whole < count:
            frames += [data[at:at + size] for at in offsets[whole:-1]]
        return frames

    def __repr__(self) -> str:
        return f"<FrameBatch {len(self)} frames, {len(self.data)} bytes>"


class _Received:
    """Bytes received but not returned yet, cut into whole frames on demand (both
    clients share it). A run of same-size frames is found a column at a time, as the
    relay does: ``data[pos+i:stop:size]`` gathers byte i of every frame in C."""

    __slots__ = ("data", "pos", "columns", "base")

    def __init__(self) -> None:
        self.data = b""
        self.pos = 0  # data[:pos] was already returned
        self.base = 0  # stream offset of data[0], for error messages
        self.columns: dict[int, tuple[tuple[int, bytes], ...]] = {}

    def feed(self, chunk: bytes) -> None:
        """Add what one read returned."""
        data, pos = self.data, self.pos
        self.base += pos
        self.data = data[pos:] + chunk if pos < len(data) else chunk
        self.pos = 0

    def buffered(self) -> int:
        """Bytes received and not returned yet (part of a frame, or whole frames)."""
        return len(self.data) - self.pos

    def clear(self) -> None:
        """Forget what is buffered and start a new stream (a new connection)."""
        self.data, self.pos, self.base = b"", 0, 0

    def _frame_size(self, pos: int) -> int:
        magic, _, payload_size = FRAME_START.unpack_from(self.data, pos)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic 0x{magic:08x} from the relay at offset "
                                f"{self.base + pos} of its stream; the stream is out of step")
        return HEADER_SIZE + int(payload_size)

    def _run(self, pos: int, size: int, frames: int) -> int:
        """How many of the next ``frames`` frames (from ``pos``) have the size
        ``size`` and the magic: they follow each other every ``size`` bytes."""
        columns = self.columns.get(size)
        if columns is None:
            magic = struct.pack("<I", MAGIC)
            payload_size = struct.pack("<I", size - HEADER_SIZE)
            columns = tuple((i, magic[i:i + 1]) for i in range(4)) + tuple(
                (PAYLOAD_SIZE_OFFSET + i, payload_size[i:i + 1]) for i in range(4))
            if len(self.columns) > 64:
                self.columns.clear()
            self.columns[size] = columns
        data = self.data
        stop = pos + frames * size
        for offset, expected in columns:
            rest = data[pos + offset:stop:size].lstrip(expected)
            if rest:
                frames -= len(rest)
                stop = pos + frames * size
        return frames

    def _whole_frame_at(self, pos: int) -> bool:
        """A whole frame (with a good magic) is buffered at ``pos``."""
        if len(self.data) - pos < HEADER_SIZE:
            return False
        try:
            return pos + self._frame_size(pos) <= len(self.data)
        except ProtocolError:
            return False

    def take_batch(self, max_frames: int | None = None) -> FrameBatch | None:
        """The whole frames buffered (at most ``max_frames``), or None. The batch
        shares the buffered ``bytes`` object: no copy."""
        data, pos = self.data, self.pos
        end = len(data)
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        limit = max_frames if max_frames is not None else end
        offsets: list[int] = []
        while len(offsets) < limit and end - pos >= HEADER_SIZE:
            try:
                size = self._frame_size(pos)
            except ProtocolError:
                if offsets:
                    break  # return the good frames first; the next call raises
                raise
            whole = min((end - pos) // size, limit - len(offsets))
            if whole >= UNIFORM_RUN_MIN_FRAMES:
                whole = self._run(pos, size, whole)
                if whole > 1:
                    stop = pos + whole * size
                    if not offsets and (whole == limit or not self._whole_frame_at(stop)):
                        # The common case: the batch is one run, its offsets a range.
                        self.pos = stop
                        return FrameBatch(data, range(pos, stop + size, size))
                    offsets.extend(range(pos, stop, size))
                    pos = stop
                    continue
            if pos + size > end:
                break
            offsets.append(pos)
            pos += size
        if not offsets:
            return None
        self.pos = pos
        offsets.append(pos)
        return FrameBatch(data, offsets)


def _refusal(sock: socket.socket) -> str | None:
    """The Error frame a relay sent before closing a connection it refused, if any."""
    try:
        sock.settimeout(0.2)
        data = sock.recv(RECV_BYTES)
        header, tlvs = logic.parse_message(data[:HEADER_SIZE + logic.parse_header(data)
                                               .payload_size])
    except (OSError, ProtocolError):
        return None
    if header.relay_domain == Domain.SYSTEM and tlvs and tlvs[0][0] == logic.TLV_ERROR:
        return logic.decode_error(tlvs[0][1])
    return None


class _ClientBase:
    """What the blocking and the asyncio client share: the options, the subscription
    they send on every connect, the frames received, and the reconnect schedule."""

    def __init__(self, path: str, *, subscribe: Iterable[int] | None = None,
                 publish_only: bool = False, gap_notices: bool = False,
                 bridge: bool = False, replay_last: int | None = None,
                 replay_since_ns: int | None = None, timeout: float | None = None,
                 reconnect: bool = False,
                 reconnect_timeout: float = RECONNECT_TIMEOUT_S) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.timeout = timeout
        self.reconnect = reconnect
        self.reconnect_timeout = reconnect_timeout
        self.reconnects = 0  # how many times the client reconnected
        replay = None
        if replay_last is not None or replay_since_ns is not None:
            replay = logic.Replay(replay_last or 0, replay_since_ns or 0)
        if publish_only or subscribe is not None or gap_notices or bridge or replay:
            mode = (SUBSCRIBE_NONE if publish_only
                    else SUBSCRIBE_TYPES if subscribe is not None else SUBSCRIBE_ALL)
            self.subscription: bytes | None = logic.subscribe_message(
                mode, subscribe or (), gap_notices, bridge=bridge, replay=replay)
            # Reconnects subscribe without the replay: a relay that did not restart
            # would replay what this client already has.
            self.resubscription: bytes | None = self.subscription if replay is None else (
                logic.subscribe_message(mode, subscribe or (), gap_notices, bridge=bridge))
        else:
            self.subscription = self.resubscription = None
        self._received = _Received()
        self._ready: collections.deque[bytes] = collections.deque()  # cut, not returned
        self._down_since = 0.0  # when the connection was lost (0: it is up)
        self._attempts = 0
        self._next_attempt_at = 0.0

    def _connect_error(self, exc: OSError) -> ConnectionError:
        """The one-line error a user can act on for a failed connect."""
        if isinstance(exc, RelayRefused):
            return exc
        if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
            return ConnectionError(
                f"no relay is listening on {self.path} ({exc.strerror}); start one with: "
                f"python relay.py --domain NAME --socket {self.path}")
        if isinstance(exc, BrokenPipeError | ConnectionResetError):
            return ConnectionError(
                f"the relay on {self.path} closed the connection at once: it may refuse "
                f"this user (uid {os.getuid()}; see its --allow-uid / --allow-gid)")
        if isinstance(exc, PermissionError):
            return ConnectionError(
                f"may not connect to {self.path} ({exc.strerror}): the socket's mode or "
                "its directory's keeps this user out; see the relay's --socket-mode, "
                "--allow-uid and --allow-gid")
        if exc.errno == errno.ENAMETOOLONG or "too long" in str(exc):
            size = len(os.fsencode(self.path))
            return ConnectionError(
                f"socket path {self.path} is {size} bytes; a Unix socket path holds at "
                f"most {SOCKET_PATH_MAX_BYTES}: use a shorter --socket")
        return ConnectionError(f"cannot connect to {self.path}: {exc.strerror or exc}")

    def _lost(self) -> Exception:
        """The connection is gone: forget what was buffered, and return the error to
        raise (``ConnectionError`` if it ended inside a frame, else ``EOFError``)."""
        buffered = self._received.buffered()
        self._received.clear()
        if buffered:
            return ConnectionError(f"the relay closed the connection in the middle of a "
                                   f"frame ({buffered} bytes received)")
        return EOFError("the relay closed the connection")

    def _drop(self) -> None:
        """The connection failed: keep what the relay had already delivered into it,
        then close it."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            sock.setblocking(False)
            while data := sock.recv(RECV_BYTES):
                self._received.feed(data)
        except OSError:
            pass
        sock.close()

    def fileno(self) -> int:
        """The socket's descriptor, to watch it in your own selector (-1 while
        reconnecting)."""
        return self.sock.fileno() if self.sock is not None else -1

    def _buffered_frame(self) -> bytes | None:
        """The next whole frame already received, or None."""
        ready = self._ready
        if not ready:
            batch = self._received.take_batch()
            if batch is None:
                return None
            ready.extend(batch.frames())
        return ready.popleft()

    def _buffered_batch(self, max_frames: int | None) -> FrameBatch | None:
        """The whole frames already received (those ``recv`` cut come first), or None."""
        if self._ready:
            return self._take_ready(max_frames)
        return self._received.take_batch(max_frames)

    def _timed_out(self, timeout: float | None) -> TimeoutError:
        return TimeoutError(f"no message from the relay within "
                            f"{timeout if timeout is not None else self.timeout} s")

    def _take_ready(self, max_frames: int | None) -> FrameBatch:
        """The frames ``recv`` already cut, as a batch (a copy: rare)."""
        ready = self._ready
        count = len(ready) if max_frames is None else min(max_frames, len(ready))
        frames = [ready.popleft() for _ in range(count)]
        offsets = [0, *itertools.accumulate(map(len, frames))]
        return FrameBatch(b"".join(frames), offsets)

    def _begin_outage(self) -> None:
        if not self._down_since:
            self._down_since = _monotonic()
            self._attempts = 0
            self._next_attempt_at = 0.0

    def _attempt_due(self) -> float:
        """Seconds until the next reconnect attempt is due (0: now). Raises
        ``ConnectionError`` once the relay has been gone for ``reconnect_timeout``."""
        now = _monotonic()
        if now - self._down_since > self.reconnect_timeout:
            raise ConnectionError(f"the relay at {self.path} has been gone for "
                                  f"{now - self._down_since:.1f} s; gave up reconnecting")
        return max(0.0, self._next_attempt_at - now)

    def _attempt_failed(self) -> None:
        self._attempts += 1
        delay = min(RECONNECT_MAX_DELAY_S, RECONNECT_FIRST_DELAY_S * 2 ** (self._attempts - 1))
        self._next_attempt_at = _monotonic() + delay

    def _salvage(self) -> None:
        """The connection is gone: keep the whole frames it delivered (they come
        first), forget a frame it left half received."""
        while True:
            batch = self._received.take_batch()
            if batch is None:
                break
            self._ready.extend(batch.frames())
        self._received.clear()

    def _reconnected(self) -> None:
        """Connected again: after the frames received before the outage, the next frame
        returned is a CLIENT_RECONNECTED notice."""
        outage_ns = int((_monotonic() - self._down_since) * 1e9)
        self._salvage()
        self._received.feed(logic.reconnected_message(outage_ns, self._attempts + 1))
        self._down_since = 0.0
        self.reconnects += 1
        log.info("reconnected to %s after %.3f s (%d attempts)", self.path, outage_ns / 1e9,
                 self._attempts + 1)

    def _deadline(self, timeout: float | None) -> float | None:
        if timeout is None:
            timeout = self.timeout
        return None if timeout is None else _monotonic() + timeout

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - _monotonic())


class RelayClient(_ClientBase):
    """A blocking connection to a relay: ``send`` messages, receive whole frames.

    ``subscribe`` (TLV types) receives only messages whose first TLV type is listed;
    ``publish_only`` receives nothing (the relay never queues for it); ``gap_notices``
    asks for a ``RELAY_GAP`` frame after messages were lost for this client; ``bridge``
    marks a bridge; ``replay_last`` / ``replay_since_ns`` ask for retained messages
    first (then a ``RELAY_LIVE`` marker). ``timeout`` is the default for receiving and
    sending (None blocks). With ``reconnect=True`` a lost relay is reconnected to with
    backoff (for up to ``reconnect_timeout`` seconds), the subscription is sent again,
    and the next frame received is a ``CLIENT_RECONNECTED`` notice (domain 4, TLV 119:
    ``logic.decode_reconnected``) saying how long the outage lasted.

    Receiving, fastest first: ``recv_batch`` (frames as offsets into one ``bytes``),
    ``recv_many`` (a list of frames), ``for frame in client``, ``recv`` (one frame).
    """

    def __init__(self, path: str, **options: Any) -> None:
        super().__init__(path, **options)
        try:
            self.sock = self._open(self._deadline(None) or _monotonic() + CONNECT_TIMEOUT_S,
                                   self.subscription)
        except OSError as exc:
            raise self._connect_error(exc) from None

    def _open(self, deadline: float | None, subscription: bytes | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._remaining(deadline))
            sock.connect(self.path)
            if subscription is not None:
                sock.sendall(subscription)
            sock.settimeout(self.timeout)
        except (BrokenPipeError, ConnectionResetError):
            refusal = _refusal(sock)
            sock.close()
            if refusal:
                raise RelayRefused(f"the relay on {self.path} {refusal}") from None
            raise
        except BaseException:
            sock.close()
            raise
        return sock

    def _socket(self, deadline: float | None) -> socket.socket:
        """The connected socket, reconnecting first if it is gone (reconnect=True)."""
        if self.sock is None and not self.reconnect:
            raise EOFError("the connection to the relay is closed")
        while self.sock is None:
            wait = self._attempt_due()
            remaining = self._remaining(deadline)
            if remaining is not None and wait > remaining:
                time.sleep(remaining)
                raise TimeoutError(f"the relay at {self.path} is gone; still reconnecting")
            time.sleep(wait)
            try:
                self.sock = self._open(deadline if deadline is not None
                                       else _monotonic() + CONNECT_TIMEOUT_S,
                                       self.resubscription)
            except OSError:
                self._attempt_failed()
                continue
            self._reconnected()
        return self.sock

    def send(self, message: bytes | bytearray | memoryview) -> None:
        """Send one message (or any whole frames) to the relay. With reconnect=True a
        message whose send failed is sent again once reconnected."""
        while True:
            sock = self._socket(self._deadline(None))
            try:
                sock.sendall(message)
                return
            except (BrokenPipeError, ConnectionResetError):
                if not self.reconnect:
                    raise
                self._drop()
                self._begin_outage()

    def send_many(self, messages: Iterable[bytes]) -> None:
        """Send many messages in one write."""
        self.send(b"".join(messages))

    def _read(self, deadline: float | None) -> bool:
        """One blocking read into the buffer. False if nothing came within the
        deadline; raises EOFError / ConnectionError when the relay went away (unless
        reconnecting, which puts a CLIENT_RECONNECTED notice in the buffer)."""
        if self.sock is None:
            self._socket(deadline)  # reconnects (the notice is then buffered) or raises
            return True
        sock = self.sock
        sock.settimeout(self._remaining(deadline))
        try:
            data = sock.recv(RECV_BYTES)
        except (TimeoutError, BlockingIOError):
            return False
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        finally:
            if self.sock is not None:
                self.sock.settimeout(self.timeout)  # send() keeps the client's timeout
        if data:
            self._received.feed(data)
            return True
        error = self._lost()
        self._drop()
        if not self.reconnect:
            raise error
        self._begin_outage()
        self._socket(deadline)
        return True

    def recv(self, timeout: float | None = None) -> bytes:
        """One whole frame as ``bytes``.

        ``TimeoutError`` if none arrives within ``timeout`` (default: the client's),
        ``EOFError`` when the relay closed the connection between frames,
        ``ConnectionError`` when it went away in the middle of one.
        """
        ready = self._ready
        if ready:
            # Shaped for speed: frames are cut a batch at a time and handed out one by
            # one, ~0.2 us a call instead of ~0.7 us cutting each on its own.
            return ready.popleft()
        deadline = self._deadline(timeout)
        while True:
            frame = self._buffered_frame()
            if frame is not None:
                return frame
            # Always one read, even with no time left: a frame may already be waiting.
            if not self._read(deadline):
                raise self._timed_out(timeout)

    def recv_batch(self, max_frames: int | None = None,
                   timeout: float | None = None) -> FrameBatch:
        """Every whole frame already buffered, or else what at most one blocking read
        brings (more reads only while no frame is whole yet), as a ``FrameBatch``: at
        least one frame, at most ``max_frames``; ``TimeoutError`` / ``EOFError`` /
        ``ConnectionError`` as ``recv``."""
        deadline = self._deadline(timeout)
        while True:
            batch = self._buffered_batch(max_frames)
            if batch is not None:
                return batch
            if not self._read(deadline):
                raise self._timed_out(timeout)

    def recv_many(self, max_frames: int | None = None,
                  timeout: float | None = None) -> list[bytes]:
        """``recv_batch`` as a list of ``bytes`` frames."""
        return self.recv_batch(max_frames, timeout).frames()

    def __iter__(self) -> Iterator[bytes]:
        """Frames until the relay closes the connection (read in batches; leaving the
        loop early keeps the rest for the next call)."""
        ready = self._ready
        while True:
            while ready:
                yield ready.popleft()
            try:
                frame = self.recv()
            except EOFError:
                return
            yield frame

    def close(self) -> None:
        """Close the connection."""
        self.reconnect = False
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> RelayClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncRelayClient(_ClientBase):
    """``RelayClient`` for asyncio programs (stdlib ``asyncio`` only), with the same
    options, methods and errors, each awaited:

        client = await AsyncRelayClient.connect(path, gap_notices=True)
        async with client:
            await client.send(message)
            frames = await client.recv_many()
            async for frame in client: ...
    """

    @classmethod
    async def connect(cls, path: str, **options: Any) -> AsyncRelayClient:
        """Connect (and subscribe, if an option asks); ``ConnectionError`` says why
        not."""
        client = cls(path, **options)
        deadline = client._deadline(None) or _monotonic() + CONNECT_TIMEOUT_S
        try:
            client.sock = await client._open(deadline, client.subscription)
        except OSError as exc:
            raise client._connect_error(exc) from None
        return client

    async def _open(self, deadline: float | None, subscription: bytes | None) -> socket.socket:
        import asyncio
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if sys.version_info >= (3, 11):
                # asyncio.timeout: wait_for can swallow a cancellation that lands as
                # the connect fails (3.11), and a caller's retry loop never stops.
                async with asyncio.timeout(self._remaining(deadline)):
                    await loop.sock_connect(sock, self.path)
            else:
                await asyncio.wait_for(loop.sock_connect(sock, self.path),
                                       self._remaining(deadline))
            if subscription is not None:
                await loop.sock_sendall(sock, subscription)
        except asyncio.TimeoutError:
            sock.close()
            raise TimeoutError(f"connecting to {self.path} timed out") from None
        except BaseException:
            sock.close()
            raise
        return sock

    async def _socket(self, deadline: float | None) -> socket.socket:
        import asyncio
        if self.sock is None and not self.reconnect:
            raise EOFError("the connection to the relay is closed")
        while self.sock is None:
            wait = self._attempt_due()
            remaining = self._remaining(deadline)
            if remaining is not None and wait > remaining:
                await asyncio.sleep(remaining)
                raise TimeoutError(f"the relay at {self.path} is gone; still reconnecting")
            await asyncio.sleep(wait)
            try:
                self.sock = await self._open(deadline if deadline is not None
                                             else _monotonic() + CONNECT_TIMEOUT_S,
                                             self.resubscription)
            except OSError:
                self._attempt_failed()
                continue
            self._reconnected()
        return self.sock

    async def send(self, message: bytes | bytearray | memoryview) -> None:
        """Send one message (or any whole frames) to the relay; ``TimeoutError``
        after the client's ``timeout``."""
        import asyncio
        loop = asyncio.get_running_loop()
        while True:
            deadline = self._deadline(None)
            sock = await self._socket(deadline)
            try:
                if deadline is None:
                    await loop.sock_sendall(sock, message)
                else:
                    try:
                        await asyncio.wait_for(loop.sock_sendall(sock, message),
                                               self._remaining(deadline))
                    except asyncio.TimeoutError:
                        raise TimeoutError(f"the relay did not take a message within "
                                           f"{self.timeout} s") from None
                return
            except (BrokenPipeError, ConnectionResetError):
                if not self.reconnect:
                    raise
                self._drop()
                self._begin_outage()

    async def send_many(self, messages: Iterable[bytes]) -> None:
        """Send many messages in one write."""
        await self.send(b"".join(messages))

    async def _read(self, deadline: float | None) -> bool:
        import asyncio
        if self.sock is None:
            await self._socket(deadline)  # reconnects (the notice is then buffered)
            return True
        sock = self.sock
        try:
            try:
                data = sock.recv(RECV_BYTES)  # what is already there, without a wait
            except BlockingIOError:
                loop = asyncio.get_running_loop()
                if deadline is None:
                    data = await loop.sock_recv(sock, RECV_BYTES)
                else:
                    data = await asyncio.wait_for(loop.sock_recv(sock, RECV_BYTES),
                                                  self._remaining(deadline))
        except asyncio.TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if data:
            self._received.feed(data)
            return True
        error = self._lost()
        self._drop()
        if not self.reconnect:
            raise error
        self._begin_outage()
        await self._socket(deadline)
        return True

    async def recv(self, timeout: float | None = None) -> bytes:
        """One whole frame; errors as ``RelayClient.recv``."""
        ready = self._ready
        if ready:
            return ready.popleft()
        deadline = self._deadline(timeout)
        while True:
            frame = self._buffered_frame()
            if frame is not None:
                return frame
            if not await self._read(deadline):
                raise self._timed_out(timeout)

    async def recv_batch(self, max_frames: int | None = None,
                         timeout: float | None = None) -> FrameBatch:
        """As ``RelayClient.recv_batch``."""
        deadline = self._deadline(timeout)
        while True:
            batch = self._buffered_batch(max_frames)
            if batch is not None:
                return batch
            if not await self._read(deadline):
                raise self._timed_out(timeout)

    async def recv_many(self, max_frames: int | None = None,
                        timeout: float | None = None) -> list[bytes]:
        """As ``RelayClient.recv_many``."""
        return (await self.recv_batch(max_frames, timeout)).frames()

    async def __aiter__(self) -> Any:
        """Frames until the relay closes the connection (read in batches; leaving the
        loop early keeps the rest for the next call)."""
        ready = self._ready
        while True:
            while ready:
                yield ready.popleft()
            try:
                frame = await self.recv()
            except EOFError:
                return
            yield frame

    async def close(self) -> None:
        """Close the connection."""
        self.reconnect = False
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def __aenter__(self) -> AsyncRelayClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


# ---------------------------------------------------------------------------------------
# Command line: run, tail, send, stats, clients, record, replay
# ---------------------------------------------------------------------------------------

VENUES = {100: "Binance", 101: "Kraken", 102: "Coinbase", 202: "Polygon"}
FIXED_POINT = 100_000_000  # 8 decimals
QUERY_TIMEOUT_S = 5.0  # how long stats / clients / send wait for the relay's answer
MIN_RATE = 0.001  # --rate / --speed: the slowest (one message in 1000 s)
REPLAY_CHUNK_BYTES = 1 << 20  # replay reads a recording this much at a time
SEND_BATCH_MESSAGES = 1000
EXIT_INTERRUPTED = 130  # send / replay stopped by Ctrl-C or SIGTERM before the end


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
    """The name of a header domain byte: a built-in or registered domain's, or the
    number."""
    if domain == Domain.SYSTEM:
        return "system"
    for name, factory in logic.LOGICS.items():
        if getattr(factory, "domain", None) == domain:
            return name
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
        if tlv_type == logic.RELAY_LIVE:
            return dict(logic.decode_live(value)._asdict())
        if tlv_type == logic.CLIENT_RECONNECTED:
            return dict(logic.decode_reconnected(value)._asdict())
        if tlv_type == logic.TLV_ERROR:
            return {"text": logic.decode_error(value)}
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
    if d["domain"] == Domain.SYSTEM and tlvs:
        first = tlvs[0]
        if first["type"] == RELAY_GAP:
            return (f"{d['time']} GAP: {first.get('dropped')} messages lost for this "
                    f"consumer ({first.get('total_dropped')} in total)")
        if first["type"] == logic.RELAY_LIVE:
            hint = (" (does the relay run with --retain?)"
                    if not first.get("replayed") and first.get("unavailable") else "")
            return (f"{d['time']} LIVE: the replay held {first.get('replayed')} messages "
                    f"({first.get('unavailable')} asked for were no longer retained{hint}); "
                    "live traffic follows")
        if first["type"] == logic.TLV_ERROR and d["source"] in RELAY_SOURCE.values():
            return f"{d['time']} ERROR from the relay: {first.get('text')}"
        if first["type"] == logic.CLIENT_RECONNECTED:
            return (f"{d['time']} RECONNECTED after {first.get('outage_ns', 0) / 1e9:.3f} s "
                    f"({first.get('attempts')} attempts): messages sent meanwhile are lost")
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


# -- asking a running relay: stats, clients ------------------------------------------


def query(path: str, what: int, timeout: float = QUERY_TIMEOUT_S) -> dict[str, Any]:
    """The relay's answer to a ``RELAY_QUERY`` (``logic.QUERY_STATS`` or
    ``logic.QUERY_CLIENTS``) as a dict; ``ConnectionError`` / ``TimeoutError`` say why
    not. The asking connection is publish-only."""
    with RelayClient(path, publish_only=True, timeout=timeout) as client:
        try:
            client.send(logic.query_message(what))
            return await_report(client, timeout)
        except (EOFError, BrokenPipeError, ConnectionResetError):
            raise ConnectionError(f"the relay on {path} closed the connection without "
                                  "answering") from None


def relay_error(frame: bytes) -> str | None:
    """The text of an Error frame a relay sent (it refused the connection), or None."""
    header = logic.parse_header(frame)
    if header.relay_domain != Domain.SYSTEM or logic.first_tlv_type(frame) != logic.TLV_ERROR:
        return None
    return logic.decode_error(logic.parse_message(frame).tlvs[0][1])


def await_report(client: RelayClient, timeout: float = QUERY_TIMEOUT_S) -> dict[str, Any]:
    """The next ``RELAY_REPORT`` the relay sends ``client`` (other frames are skipped);
    ``ConnectionError`` if the relay refused the connection."""
    deadline = _monotonic() + timeout
    while True:
        try:
            frame = client.recv(timeout=max(0.0, deadline - _monotonic()))
        except TimeoutError:
            raise TimeoutError(f"the relay on {client.path} did not answer a query within "
                               f"{timeout:g} s (a relay older than {__version__}?)") from None
        refused = relay_error(frame)
        if refused:
            raise ConnectionError(f"the relay on {client.path} {refused}")
        header, tlvs = logic.parse_message(frame)
        if header.relay_domain == Domain.SYSTEM and tlvs and tlvs[0][0] == logic.RELAY_REPORT:
            return logic.decode_report(tlvs)


PROMETHEUS_COUNTERS = {
    "connections_total": "Clients accepted since the relay started.",
    "connections_rejected": "Connections refused (limit, credentials, descriptors).",
    "messages_in": "Frames read from clients, control frames included.",
    "bytes_in": "Bytes read from clients.",
    "messages_out": "Deliveries: one message written to one client.",
    "bytes_out": "Bytes written to clients.",
    "messages_filtered": "Frames refused by the domain's filter.",
    "messages_invalid": "Frames that failed the checksum or TLV policy, bad control frames.",
    "protocol_errors": "Framing errors; each closed its client.",
    "messages_dropped": "Messages dropped for slow consumers (drop_oldest).",
    "slow_disconnects": "Clients closed as slow consumers (disconnect, stall timeout).",
    "backpressure_pauses": "Times backpressure paused reading.",
}
PROMETHEUS_GAUGES = {
    "connections_active": ("counters", "Clients connected now."),
    "paused": ("relay", "1 while backpressure has paused reading."),
    "uptime_seconds": ("relay", "Seconds since the relay started."),
    "start_time_seconds": ("relay", "When the relay started, Unix seconds."),
    "pending_messages": ("relay", "Messages waiting in the relay for all clients."),
    "pending_bytes": ("relay", "Bytes waiting in the relay for all clients."),
    "retained_messages": ("relay", "Messages kept for replays (--retain)."),
    "retained_bytes": ("relay", "Bytes kept for replays (--retain-bytes bounds it)."),
}
_GAUGE_SOURCE = {"uptime_seconds": "uptime_s", "start_time_seconds": "started_at"}


def prometheus_text(report: dict[str, Any]) -> str:
    """A stats report in the Prometheus text exposition format (version 0.0.4)."""
    relay_info, counters = report["relay"], report["counters"]
    def value(text: object) -> str:  # a label value, escaped as the format wants
        return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    label = f'{{domain="{value(relay_info["name"])}"}}'
    lines = ["# HELP torq_relay_info The relay's version and policies (always 1).",
             "# TYPE torq_relay_info gauge",
             f'torq_relay_info{{domain="{value(relay_info["name"])}",'
             f'version="{value(relay_info["version"])}",'
             f'overflow="{value(relay_info["overflow"])}",'
             f'checksum="{value(relay_info["checksum"])}"}} 1']
    for name, text in PROMETHEUS_COUNTERS.items():
        metric = f"torq_relay_{name.removesuffix('_total')}_total"
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} counter",
                  f"{metric}{label} {counters[name]}"]
    for name, (section, text) in PROMETHEUS_GAUGES.items():
        metric = f"torq_relay_{name}"
        source = report[section].get(_GAUGE_SOURCE.get(name, name), 0)
        number = int(source) if isinstance(source, bool | int) else repr(float(source))
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} gauge",
                  f"{metric}{label} {number}"]
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{seconds:02d}"


def stats_text(report: dict[str, Any], before: dict[str, Any] | None = None,
               elapsed: float = 0.0) -> str:
    """A stats report as ``redis-cli info``-style text; with ``before``, rates too."""
    relay_info, counters = report["relay"], report["counters"]
    lines = ["# relay"]
    for key in ("name", "domain", "socket", "pid", "version", "overflow", "checksum",
                "max_message_size", "queue_limit", "queue_bytes", "max_connections",
                "socket_mode", "retain", "paused"):
        lines.append(f"{key:<20} {relay_info.get(key)}")
    lines.append(f"{'uptime':<20} {_duration(relay_info['uptime_s'])}")
    lines.append(f"{'pending':<20} {relay_info['pending_messages']} messages, "
                 f"{relay_info['pending_bytes']} bytes")
    if relay_info.get("retain"):
        lines.append(f"{'retained':<20} {relay_info['retained_messages']} messages, "
                     f"{relay_info['retained_bytes']} bytes")
    lines.append("# counters" + (" " * 22 + "per second" if before else ""))
    for key, value in counters.items():
        line = f"{key:<20} {value:>12}"
        if before and elapsed > 0 and key != "connections_active":
            line += f"  {(value - before['counters'][key]) / elapsed:>12,.0f}"
        lines.append(line)
    return "\n".join(lines)


def _age(since: float, now: float) -> str:
    return _duration(max(0.0, now - since))


def clients_text(report: dict[str, Any]) -> str:
    """A clients report as two tables: connected clients, then recently closed ones."""
    now = time.time()
    rows: list[tuple[str, ...]] = [
        ("ID", "PID", "PROCESS", "UID", "MODE", "TYPES", "GAPS", "BRIDGE", "IN", "OUT",
         "PENDING", "DROPPED", "REFUSED", "CONNECTED")]
    for c in report["clients"]:
        rows.append((str(c["id"]), str(c["pid"] or "-"), c["process"] or "-",
                     str(c["uid"] if c["uid"] is not None else "-"),
                     ("all", "types", "none")[c["mode"]],
                     ",".join(map(str, c["types"])) or "-", "yes" if c["gap_notices"] else "no",
                     "yes" if c["bridge"] else "no", str(c["messages_in"]),
                     str(c["messages_out"]), f"{c['pending_messages']}/{c['pending_bytes']}B",
                     str(c["dropped"]), str(c.get("filtered", 0) + c.get("invalid", 0)),
                     _age(c["connected_at"], now)))
    lines = [f"{len(report['clients'])} clients connected"
             + (f" ({report['clients_left_out']} more left out)"
                if report.get("clients_left_out") else "")]
    lines += _table(rows)
    closed = report.get("closed", [])
    if closed:
        lines += ["", f"{len(closed)} recently closed, newest first"]
        rows = [("ID", "PID", "PROCESS", "CLOSED", "IN", "OUT", "DROPPED", "REASON")]
        for c in closed:
            rows.append((str(c["id"]), str(c["pid"] or "-"), c["process"] or "-",
                         f"{_age(c['closed_at'], now)} ago", str(c["messages_in"]),
                         str(c["messages_out"]), str(c["dropped"]), c["reason"]))
        lines += _table(rows)
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            .rstrip() for row in rows]


# -- option types --------------------------------------------------------------------


def _octal(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r} (e.g. 0600)") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text} is not a permission mode (0000..0777; "
                                         "the socket takes no setuid, setgid or sticky bit)")
    return mode


def domain_argument(text: str) -> RelayLogic:
    """An argparse type: a registered domain's name, as a new logic object."""
    try:
        return logic.get_logic(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def log_level_argument(text: str) -> str:
    """An argparse type: a logging level name in any case."""
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r}; use debug, info, warning, error or critical")
    return level


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _message_size(text: str) -> int:
    value = _integer(text)
    if not HEADER_SIZE <= value <= logic.MAX_MESSAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be {HEADER_SIZE}..{logic.MAX_MESSAGE_SIZE} bytes, got {value}")
    return value


def seconds_argument(text: str) -> float:
    """An argparse type: a duration, 0 or more seconds (``inf``: never; not ``nan``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds (inf: never), got {text}")
    return value


def _rate(text: str) -> float:
    """A rate or speed: 0 (as fast as possible), or at least MIN_RATE, finite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value == 0 or MIN_RATE <= value < math.inf):
        raise argparse.ArgumentTypeError(f"must be 0 (as fast as possible) or a finite "
                                         f"number of at least {MIN_RATE:g}, got {text}")
    return value


def _interval(text: str) -> float:
    """How often to repeat: 0 (once) or a finite number of seconds."""
    value = seconds_argument(text)
    if math.isinf(value):
        raise argparse.ArgumentTypeError("must be a finite number of seconds (0: once)")
    return value


def _socket_path(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("the socket path is empty (an unset variable?)")
    if text.endswith("/"):
        raise argparse.ArgumentTypeError(f"{text} ends in '/': name the socket file, e.g. "
                                         f"{text}market_data.sock")
    return text


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def count_argument(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _ids(kind: str) -> Callable[[str], frozenset[int]]:
    """``--allow-uid`` / ``--allow-gid`` values: numbers or names, comma-separated."""
    import grp
    import pwd

    def parse(text: str) -> frozenset[int]:
        ids = set()
        for item in filter(None, (part.strip() for part in text.split(","))):
            if item.isdigit():
                ids.add(int(item))
                continue
            try:
                ids.add(pwd.getpwnam(item).pw_uid if kind == "uid" else grp.getgrnam(item).gr_gid)
            except KeyError:
                raise argparse.ArgumentTypeError(
                    f"no {'user' if kind == 'uid' else 'group'} named {item!r}") from None
        if not ids:
            raise argparse.ArgumentTypeError(f"give at least one {kind}")
        return frozenset(ids)

    return parse


_TLV_TYPES_BY_NAME = {name.lower(): number for number, name in TLV_NAMES.items()}


def _tlv_type(text: str) -> int:
    """A TLV type by number (0..254) or by name (``Trade``, case-insensitive)."""
    number = _TLV_TYPES_BY_NAME.get(text.lower())
    if number is None:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"unknown TLV type {text!r}; use a number 0..254 or one of "
                f"{', '.join(f'{n} ({t})' for t, n in sorted(TLV_NAMES.items()))}") from None
    if not 0 <= number < logic.EXTENDED_TLV:
        raise argparse.ArgumentTypeError(f"TLV types are 0..254, got {number}")
    return number


# -- the parser ----------------------------------------------------------------------

def _add_connection_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes, before or after it. In sub-command parsers
    they default to SUPPRESS so they never overwrite what came before the command."""
    def d(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("connection") if not defaults else parser
    group.add_argument("--domain", type=domain_argument, default=d(domain_argument("market_data")),
                       metavar="NAME", help="the domain: "
                       f"{', '.join(sorted(logic.LOGICS))} (default: market_data)")
    group.add_argument("--socket", type=_socket_path, default=d(None), metavar="PATH",
                       help="Unix socket path (default: the domain's, e.g. "
                       "/tmp/torq/market_data.sock)")
    group.add_argument("--log-level", type=log_level_argument, default=d("INFO"), metavar="L",
                       help="debug, info, warning, error or critical (default: info)")
    group.add_argument("--log-format", choices=("text", "json"), default=d("text"),
                       help="text lines, or one JSON object per line for log shippers "
                       "(default: text)")


def _add_relay_options(parser: argparse.ArgumentParser, defaults: bool,
                       hidden: bool = False) -> None:
    """What only ``run`` uses. Client commands accept them too (SPEC: options go before
    or after the command) but leave them out of their --help."""
    def d(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    def h(text: str) -> str:
        return argparse.SUPPRESS if hidden else text

    add = parser.add_argument
    add("--queue-limit", type=_positive_int, default=d(QUEUE_LIMIT), metavar="N",
        help=h(f"messages pending per client before the overflow policy applies "
               f"(default: {QUEUE_LIMIT})"))
    add("--queue-bytes", type=_positive_int, default=d(QUEUE_BYTES), metavar="N",
        help=h(f"bytes pending per client before the overflow policy applies "
               f"(default: {QUEUE_BYTES} = 64 MiB)"))
    add("--max-connections", type=_positive_int, default=d(MAX_CONNECTIONS), metavar="N",
        help=h(f"clients served at once; more are accepted and closed at once "
               f"(default: {MAX_CONNECTIONS})"))
    add("--overflow", choices=OVERFLOW_POLICIES, default=d(None),
        help=h("slow-consumer policy (default: the domain's)"))
    add("--max-message-size", type=_message_size, default=d(None), metavar="N",
        help=h("largest frame in bytes, header included (default: the domain's)"))
    add("--stall-timeout", type=seconds_argument, default=d(STALL_TIMEOUT_S), metavar="S",
        help=h("backpressure: disconnect a client with no write progress for S seconds "
               f"while paused; inf = never (default: {STALL_TIMEOUT_S})"))
    add("--drain-timeout", type=seconds_argument, default=d(DRAIN_TIMEOUT_S), metavar="S",
        help=h("on shutdown, flush pending data for up to S seconds; inf = until done or a "
               f"second stop signal (default: {DRAIN_TIMEOUT_S})"))
    add("--socket-mode", type=_octal, default=d(SOCKET_MODE), metavar="MODE",
        help=h("socket file permissions, octal (default: 0600)"))
    add("--allow-uid", type=_ids("uid"), default=d(None), metavar="UID[,UID...]",
        help=h("admit only peers with one of these user ids or names (SO_PEERCRED), "
               "besides the file mode (default: no check)"))
    add("--allow-gid", type=_ids("gid"), default=d(None), metavar="GID[,GID...]",
        help=h("admit only peers with one of these group ids or names (default: no check)"))
    add("--retain", type=count_argument, default=d(0), metavar="N",
        help=h("keep the last N messages for late joiners' replays (default: 0 = off)"))
    add("--retain-bytes", type=_positive_int, default=d(RETAIN_BYTES), metavar="B",
        help=h(f"and at most B bytes of them (default: {RETAIN_BYTES} = 64 MiB)"))
    add("--stats-interval", type=seconds_argument, default=d(STATS_INTERVAL_S), metavar="S",
        help=h(f"log a stats line every S seconds, 0 = never (default: "
               f"{STATS_INTERVAL_S:g}); SIGUSR1 logs one at once"))
    add("--busy-poll-us", type=seconds_argument, default=d(BUSY_POLL_S * 1e6), metavar="US",
        help=h("after traffic, poll without sleeping for US microseconds: lower latency "
               f"for a little CPU, 0 = always sleep (default: {BUSY_POLL_S * 1e6:g})"))


RELAY_OPTION_DESTS = ("queue_limit", "queue_bytes", "max_connections", "overflow",
                      "max_message_size", "stall_timeout", "drain_timeout", "socket_mode",
                      "allow_uid", "allow_gid", "retain", "retain_bytes", "stats_interval",
                      "busy_poll_us")

COMMANDS = "{run,tail,send,stats,clients,record,replay}"


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python relay.py``."""
    parser = argparse.ArgumentParser(
        prog="relay.py", description="torq-relay: relay Protocol V2 messages between the "
        "clients of one Unix socket. Exit codes: 0 clean stop, 1 runtime error, 2 usage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python relay.py --domain market_data\n"
        "  python relay.py --domain market_data --retain 100000\n"
        "  python relay.py --domain market_data tail --count 10 --type Trade\n"
        "  python relay.py --domain market_data send --count 1000 --rate 100\n"
        "  python relay.py --domain market_data stats --watch 1\n"
        "  python relay.py --domain market_data clients\n"
        "  python relay.py --domain market_data record session.torq --duration 60\n"
        "  python relay.py --domain market_data replay session.torq --speed 10")
    parser.add_argument("--version", action="version",
                        version=f"relay.py (torq-relay) {__version__}")
    _add_connection_options(parser, defaults=True)
    _add_relay_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", metavar=COMMANDS)

    def command(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=description)
        return sub

    run = command("run", "serve the domain (the default command)",
                  "Serve the domain on its socket until SIGINT or SIGTERM.")
    _add_connection_options(run, defaults=False)
    _add_relay_options(run, defaults=False)

    tail = command("tail", "print each message, decoded, one per line",
                   "Print each message the relay forwards, decoded, one line each (gap "
                   "notices included), until --count or the relay stops.")
    tail.add_argument("--count", type=count_argument, default=0, metavar="N",
                      help="stop after N lines (default: 0 = until the relay stops)")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument("--type", type=_tlv_type, action="append", dest="types", metavar="T",
                      help="only messages whose first TLV type is T, a number or a name: "
                      + ", ".join(f"{name} ({number})" for number, name
                                  in sorted(TLV_NAMES.items()) if number < 100)
                      + " (repeatable; default: all)")
    tail.add_argument("--last", type=count_argument, default=None, metavar="N",
                      help="first the last N messages the relay retained (it runs with "
                      "--retain), then live traffic (default: live only)")
    tail.add_argument("--reconnect", action="store_true",
                      help="survive relay restarts: reconnect, say so, carry on")
    _add_connection_options(tail, defaults=False)
    _add_relay_options(tail, defaults=False, hidden=True)

    send = command("send", "publish synthetic messages of the domain",
                   "Publish valid synthetic messages of the domain (Trades, SignalIdentity "
                   "or OrderRequest), numbered 1, 2, 3, ..., then ask the relay whether it "
                   "refused any.")
    send.add_argument("--count", type=_positive_int, default=10, metavar="N",
                      help="messages to send (default: 10)")
    send.add_argument("--rate", type=_rate, default=0.0, metavar="R",
                      help="messages per second (default: 0 = as fast as possible)")
    send.add_argument("--source", type=_source_id, default=1, metavar="ID",
                      help="source id in the header, 0..255 (default: 1, Binance)")
    _add_connection_options(send, defaults=False)
    _add_relay_options(send, defaults=False, hidden=True)

    stats = command("stats", "show a running relay's counters",
                    "Ask the running relay for its stats (a RELAY_QUERY over its socket).")
    output = stats.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="the JSON object")
    output.add_argument("--prometheus", action="store_true",
                        help="the Prometheus text exposition format (torq_relay_* metrics)")
    stats.add_argument("--watch", type=_interval, default=0.0, metavar="S",
                       help="ask again every S seconds, with rates (default: 0 = once)")
    _add_connection_options(stats, defaults=False)
    _add_relay_options(stats, defaults=False, hidden=True)

    clients = command("clients", "list a running relay's clients",
                      "List the running relay's clients, each named by its process, and "
                      "the last 64 that left with the reason.")
    clients.add_argument("--json", action="store_true", help="the JSON object")
    _add_connection_options(clients, defaults=False)
    _add_relay_options(clients, defaults=False, hidden=True)

    record = command("record", "write the traffic to a file",
                     "Write every frame the relay forwards to FILE as received (gap "
                     "notices included, so a recording shows its own holes).")
    record.add_argument("file", metavar="FILE", help="where to write; - for stdout")
    record.add_argument("--count", type=count_argument, default=0, metavar="N",
                        help="stop after N frames (default: 0 = no limit)")
    record.add_argument("--duration", type=seconds_argument, default=0.0, metavar="S",
                        help="stop after S seconds (default: 0 = no limit)")
    record.add_argument("--max-bytes", type=count_argument, default=0, metavar="B",
                        help="stop before the file would pass B bytes (default: 0 = no limit)")
    record.add_argument("--type", type=_tlv_type, action="append", dest="types", metavar="T",
                        help="only messages whose first TLV type is T, a number or a name "
                        "as for tail (repeatable; default: all)")
    record.add_argument("--last", type=count_argument, default=None, metavar="N",
                        help="begin with the last N messages the relay retained "
                        "(default: live only)")
    _add_connection_options(record, defaults=False)
    _add_relay_options(record, defaults=False, hidden=True)

    replay = command("replay", "publish a recording again",
                     "Publish the data frames of a recording again, byte for byte, paced "
                     "by their header timestamps; the relay's own frames are skipped.")
    replay.add_argument("file", metavar="FILE", help="a recording; - for stdin")
    replay.add_argument("--speed", type=_rate, default=1.0, metavar="X",
                        help="1 = the original pace, 10 = ten times faster, 0 = as fast as "
                        "possible (default: 1)")
    replay.add_argument("--rate", type=_rate, default=0.0, metavar="R",
                        help="a fixed R messages per second instead (default: 0 = by --speed)")
    _add_connection_options(replay, defaults=False)
    _add_relay_options(replay, defaults=False, hidden=True)
    return parser


def _source_id(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"source ids are 0..255, got {value}")
    return value


# -- run -----------------------------------------------------------------------------


def _run(args: argparse.Namespace, logic_: RelayLogic, path: str) -> int:
    # A stop signal before serve_forever installs its handlers (while binding), or
    # after it restored them (the final stats are logged), must not kill the process:
    # these stay in place around it, and only note the request.
    stop_requested: list[int] = []

    def note_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, note_stop)
    relay = Relay(logic_, socket_path=path, queue_limit=args.queue_limit,
                  queue_bytes=args.queue_bytes, max_connections=args.max_connections,
                  overflow=args.overflow, max_message_size=args.max_message_size,
                  stall_timeout=args.stall_timeout, drain_timeout=args.drain_timeout,
                  socket_mode=args.socket_mode, stats_interval=args.stats_interval,
                  busy_poll=args.busy_poll_us / 1e6, allow_uids=args.allow_uid,
                  allow_gids=args.allow_gid, retain=args.retain,
                  retain_bytes=args.retain_bytes)
    try:
        if stop_requested:
            log.info("%s received while starting: stopping",
                     signal.Signals(stop_requested[0]).name)
            relay.close()
        else:
            relay.serve_forever()
    finally:
        # The interpreter's exit puts the default handler back for every signal that
        # has a Python handler: from here on, stop signals are ignored instead.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    return 0


# -- tail and record -----------------------------------------------------------------


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
    """Client commands stop on SIGTERM as on Ctrl-C."""
    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _quiet_stdout() -> None:
    """The reader of stdout went away (tail | head): keep the interpreter's final flush
    from failing again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _tail(args: argparse.Namespace, path: str) -> int:
    shown = 0
    _stop_on_sigterm()
    with RelayClient(path, subscribe=args.types, gap_notices=True, replay_last=args.last,
                     reconnect=args.reconnect) as client:
        for frame in client:  # read in batches (recv_many)
            refused = relay_error(frame)
            if refused:
                raise ConnectionError(f"the relay on {path} {refused}")
            try:
                line = json.dumps(describe(frame)) if args.json else format_line(frame)
            except ProtocolError as exc:
                line = _fallback_line(frame, exc, args.json)
            try:
                print(line, flush=True)
            except BrokenPipeError:
                _quiet_stdout()
                return 0
            shown += 1
            if args.count and shown >= args.count:
                break
    return 0


def _record(args: argparse.Namespace, path: str) -> int:
    _stop_on_sigterm()
    client = RelayClient(path, subscribe=args.types, gap_notices=True, replay_last=args.last)
    try:  # connected first: a relay that is not there must not cost an existing file
        out = sys.stdout.buffer if args.file == "-" else open(args.file, "wb")
    except OSError as exc:
        client.close()
        raise RelayError(f"cannot write {args.file}: {exc.strerror or exc}") from None
    frames = written = 0
    started = _monotonic()
    why = "the relay stopped"
    try:
        with client:
            while True:
                timeout = None
                if args.duration and not math.isinf(args.duration):
                    timeout = args.duration - (_monotonic() - started)
                    if timeout <= 0:
                        why = f"--duration {args.duration:g} s"
                        break
                try:
                    batch = client.recv_batch(args.count - frames if args.count else None,
                                              timeout)
                except TimeoutError:
                    continue
                except EOFError:
                    break
                if not frames and len(batch) == 1 and relay_error(batch[0]):
                    raise ConnectionError(f"the relay on {path} {relay_error(batch[0])}")
                offsets = batch.offsets
                cut = len(offsets) - 1
                if args.max_bytes and written + offsets[cut] - offsets[0] > args.max_bytes:
                    # The last whole frame that still fits.
                    cut = bisect.bisect_right(offsets, offsets[0] + args.max_bytes - written) - 1
                out.write(batch.data[offsets[0]:offsets[cut]])
                frames += cut
                written += offsets[cut] - offsets[0]
                if cut < len(offsets) - 1:
                    why = f"--max-bytes {args.max_bytes}"
                    break
                if args.count and frames >= args.count:
                    why = f"--count {args.count}"
                    break
    except KeyboardInterrupt:
        why = "interrupted"
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except OSError as exc:
        if isinstance(exc, ConnectionError):
            raise
        raise RelayError(f"cannot write {args.file}: {exc.strerror or exc}") from None
    finally:
        try:
            out.flush()
        except OSError:
            pass
        if out is not sys.stdout.buffer:
            out.close()
    print(f"recorded {frames} frames ({written} bytes) to {args.file} in "
          f"{_monotonic() - started:.1f} s; stopped: {why}", file=sys.stderr)
    return 0


# -- send and replay -----------------------------------------------------------------


def _check_refused(client: RelayClient, sent: int, what: str, path: str) -> int:
    """Ask the relay, after the data on the same connection, how many of this client's
    frames it refused (``what`` names the domains sent); say so and return 1 if any
    were (0 otherwise)."""
    try:
        client.send(logic.query_message(logic.QUERY_CLIENTS))
        report = await_report(client)
    except ConnectionError as exc:
        if "refused" in str(exc):
            raise
        print(f"relay.py: warning: could not confirm delivery: {exc}", file=sys.stderr)
        return 0
    except (TimeoutError, OSError, EOFError, ProtocolError) as exc:
        print(f"relay.py: warning: could not confirm delivery: {exc}", file=sys.stderr)
        return 0
    me = next((c for c in report["clients"] if c["id"] == report.get("you")), None)
    if me is None:
        return 0
    filtered, invalid = me.get("filtered", 0), me.get("invalid", 0)
    if not filtered and not invalid:
        return 0
    relay_info = report.get("relay", {})
    why = []
    if filtered:
        why.append(f"{filtered} filtered: it serves {relay_info.get('name')} (domain "
                   f"{relay_info.get('domain')}), these were {what}; pass the relay's "
                   "--domain")
    if invalid:
        why.append(f"{invalid} invalid (its checksum {relay_info.get('checksum')!r} or TLV "
                   "policy refused them)")
    print(f"relay.py: error: the relay on {path} refused {filtered + invalid} of {sent} "
          f"messages: {'; '.join(why)}", file=sys.stderr)
    return 1


def _closed_while_sending(client: RelayClient, sent: int, total: int) -> str:
    """Why the relay closed a publisher's connection: its Error frame, if it sent one."""
    try:
        for frame in client.recv_many(timeout=0.5):
            refused = relay_error(frame)
            if refused:
                return f"the relay on {client.path} {refused}"
    except (TimeoutError, EOFError, OSError):
        pass
    return (f"the relay on {client.path} closed the connection after {sent} of {total} "
            "messages")


def _send(args: argparse.Namespace, logic_: RelayLogic, path: str) -> int:
    batch = SEND_BATCH_MESSAGES if args.rate <= 0 else max(
        1, min(SEND_BATCH_MESSAGES, int(args.rate // 100)))
    started = _monotonic()
    sent = 0
    _stop_on_sigterm()
    with RelayClient(path, publish_only=True, timeout=QUERY_TIMEOUT_S * 2) as client:
        try:
            while sent < args.count:
                n = min(batch, args.count - sent)
                client.send_many(synthetic_messages(logic_, sent + 1, n, args.source))
                sent += n
                if args.rate > 0 and sent < args.count:
                    delay = started + sent / args.rate - _monotonic()
                    if delay > 0:
                        time.sleep(delay)
        except KeyboardInterrupt:
            print(f"interrupted: sent {sent} of {args.count} {logic_.name} messages to "
                  f"{path}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (BrokenPipeError, ConnectionResetError):
            raise ConnectionError(_closed_while_sending(client, sent, args.count)) from None
        elapsed = max(_monotonic() - started, 1e-9)
        print(f"sent {sent} {logic_.name} messages to {path} in {elapsed:.3f} s "
              f"({sent / elapsed:,.0f} msg/s)")
        return _check_refused(client, sent, f"{logic_.name} (domain {logic_.domain})", path)


def _frames_of(source: Any, name: str) -> Iterator[tuple[int, bytes]]:
    """``(offset, frame)`` for each frame of a recording read from ``source``;
    ``RelayError`` naming the offset at the first that is not a whole valid frame."""
    buffer = b""
    offset = 0  # of buffer[0] in the file
    while True:
        chunk = source.read(REPLAY_CHUNK_BYTES)
        buffer = buffer + chunk if buffer else chunk
        pos = 0
        while len(buffer) - pos >= HEADER_SIZE:
            magic, domain_version, payload_size = FRAME_START.unpack_from(buffer, pos)
            if magic != MAGIC or domain_version >> 8 != VERSION:
                what = (f"bad magic 0x{magic:08x}" if magic != MAGIC
                        else f"unknown version {domain_version >> 8}")
                raise RelayError(f"{name} is not a recording of whole frames: {what} at "
                                 f"offset {offset + pos}")
            size = HEADER_SIZE + payload_size
            if size > logic.MAX_MESSAGE_SIZE:
                raise RelayError(f"{name}: a {size}-byte frame at offset {offset + pos} is "
                                 f"over {logic.MAX_MESSAGE_SIZE} bytes: not a recording")
            if len(buffer) - pos < size:
                break
            yield offset + pos, buffer[pos:pos + size]
            pos += size
        buffer = buffer[pos:]
        offset += pos
        if not chunk:
            if buffer:
                raise RelayError(f"{name} ends in the middle of a frame at offset {offset} "
                                 f"({len(buffer)} bytes of it): truncated")
            return


def _replay_file(args: argparse.Namespace, logic_: RelayLogic, path: str) -> int:
    try:
        source = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    except OSError as exc:
        raise RelayError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    _stop_on_sigterm()
    sent = skipped = 0
    started = _monotonic()
    first_ts: int | None = None
    domains: set[int] = set()
    pending: list[bytes] = []
    with source, RelayClient(path, publish_only=True, timeout=QUERY_TIMEOUT_S * 2) as client:
        try:
            try:
                for _, frame in _frames_of(source, args.file):
                    domain = FRAME_START.unpack_from(frame)[1] & 0xFF
                    if domain == Domain.SYSTEM:
                        skipped += 1  # the relay's own frames: gap notices, markers
                        continue
                    domains.add(domain)
                    if args.rate > 0:
                        due = started + sent / args.rate
                    elif args.speed > 0:
                        timestamp = HEADER.unpack_from(frame)[6]
                        if first_ts is None:
                            first_ts = timestamp
                        due = started + max(0, timestamp - first_ts) / 1e9 / args.speed
                    else:
                        due = 0.0
                    delay = due - _monotonic()
                    if delay > 0 or len(pending) >= SEND_BATCH_MESSAGES:
                        if pending:
                            client.send_many(pending)
                            pending.clear()
                        if delay > 0:
                            time.sleep(delay)
                    pending.append(frame)
                    sent += 1
            finally:
                if pending:
                    client.send_many(pending)  # whatever whole frames came before an error
        except KeyboardInterrupt:
            print(f"interrupted: replayed {sent} messages of {args.file} to {path}",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        except RelayError as exc:
            raise RelayError(f"{exc}; the {sent} messages before it were sent") from None
        elapsed = max(_monotonic() - started, 1e-9)
        print(f"replayed {sent} messages of {args.file} to {path} in {elapsed:.3f} s "
              f"({skipped} of the relay's own frames skipped)")
        what = " and ".join(f"{_domain_name(d)} (domain {d})" for d in sorted(domains))
        return _check_refused(client, sent, what or "no data", path)


# -- stats and clients ---------------------------------------------------------------


def _stats(args: argparse.Namespace, path: str) -> int:
    _stop_on_sigterm()
    try:
        before: dict[str, Any] | None = None
        taken = 0.0
        while True:
            report = query(path, logic.QUERY_STATS)
            now = _monotonic()
            if args.json:
                print(json.dumps(report), flush=True)
            elif args.prometheus:
                print(prometheus_text(report), end="", flush=True)
            else:
                if before is not None:
                    print(flush=True)
                print(stats_text(report, before, now - taken), flush=True)
            if not args.watch:
                return 0
            before, taken = report, now
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        _quiet_stdout()
        return 0


def _clients(args: argparse.Namespace, path: str) -> int:
    report = query(path, logic.QUERY_CLIENTS)
    print(json.dumps(report) if args.json else clients_text(report))
    return 0


# -- main ----------------------------------------------------------------------------


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message, pid."""

    def format(self, record: logging.LogRecord) -> str:
        document = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
                    + f".{int(record.msecs):03d}", "level": record.levelname,
                    "logger": record.name, "message": record.getMessage(),
                    "pid": record.process}
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)


def configure_logging(level: str, fmt: str) -> None:
    """Log to stderr at ``level``, as text lines or JSON objects."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                               "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0 ok, 1 runtime error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    logic_: RelayLogic = args.domain
    path = args.socket or logic_.socket_path
    command = args.command or "run"
    if command != "run":
        given = [f"--{d.replace('_', '-')}" for d in RELAY_OPTION_DESTS
                 if getattr(args, d, None) != parser.get_default(d)]
        if given:
            print(f"relay.py: note: {', '.join(given)} only matter to run; {command} "
                  "ignores them", file=sys.stderr)
    try:
        if command == "tail":
            return _tail(args, path)
        if command == "send":
            return _send(args, logic_, path)
        if command == "stats":
            return _stats(args, path)
        if command == "clients":
            return _clients(args, path)
        if command == "record":
            return _record(args, path)
        if command == "replay":
            return _replay_file(args, logic_, path)
        return _run(args, logic_, path)
    except (RelayError, ConnectionError, TimeoutError, ValueError) as exc:
        print(f"relay.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        _quiet_stdout()
        return 0  # tail | head closed the pipe


def console_main() -> None:
    """The ``torq-relay`` command (``pip install .``): ``main`` with its exit code."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
