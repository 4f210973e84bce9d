"""bridge.py: one domain's torq relays on many hosts, joined through NATS.

One bridge runs per host per domain. It is a *bridge-role* client of the host's relay
(a relay never hands one bridge's frames to another bridge, so any number of hosts form
no loop) and a client of the host's NATS server or cluster. Frames travel byte-identical
in batches of whole frames (up to 64 KiB) on subject ``PREFIX.DOMAIN.HOST``.
market_data and signal ride core NATS: at most once, and every frame lost on the way is
told to the consumers of the receiving host as a ``RELAY_GAP``. execution rides
JetStream: nothing lost and the order kept when a bridge is killed and restarted. The
one file of torq-relay with a dependency: ``pip install nats-py``.

    python relay.py --domain market_data &                             # on every host
    python bridge.py --domain market_data --nats nats://10.0.0.1:4222,nats://10.0.0.2:4222
    python bridge.py --domain market_data --nats nats://10.0.0.1:4222 stats   # counters

    import asyncio
    import logic
    from bridge import Bridge
    bridge = Bridge(logic.get_logic("market_data"), ["nats://127.0.0.1:4222"], host_id="a")
    asyncio.run(bridge.run())       # until SIGINT / SIGTERM, or bridge.stop() from a task

Reading order follows one batch from a relay on one host to a relay on another:
constants, ``BridgeStats``, the pure parts (``BatchHeader``: what a batch says about
itself; ``cut``: whole frames into batches; ``Arrivals``: duplicates and holes per
origin host), ``Bridge`` (NATS, the relay links, relay -> NATS, JetStream, NATS ->
relay, stats), then the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import logic
from logic import HEADER, HEADER_SIZE, RELAY_GAP, RELAY_LIVE, Domain, ProtocolError, RelayLogic
from relay import (
    AsyncRelayClient,
    FrameBatch,
    count_argument,
    domain_argument,
    log_level_argument,
    seconds_argument,
)

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js import JetStreamContext

__version__ = "0.2.0"

__all__ = ["Bridge", "BridgeStats", "BatchHeader", "Arrivals", "BridgeError", "Piece", "cut",
           "control_frames", "stats_subject", "stream_name", "main", "__version__"]

log = logging.getLogger("bridge")

# ---------------------------------------------------------------------------------------
# Constants and defaults
# ---------------------------------------------------------------------------------------

BATCH_BYTES = 64 * 1024  # a NATS message holds whole frames up to this (a bigger frame alone)
SUBJECT_PREFIX = "torq"
STATS_INTERVAL_S = 10.0
NATS_PENDING_BYTES = 8 * 1024 * 1024  # nats-py's outbound buffer: a publish waits beyond it
NATS_CONNECT_TIMEOUT_S = 2  # nats-py takes whole seconds here
NATS_RECONNECT_WAIT_S = 1  # between two attempts on one server
SUB_PENDING_MSGS = 4096  # batches waiting in this bridge; beyond, nats-py drops (a hole)
SUB_PENDING_BYTES = 128 * 1024 * 1024
RETRY_FIRST_DELAY_S = 0.05  # relay and JetStream retries: doubling from this ...
RETRY_MAX_DELAY_S = 1.0  # ... to this
RETRY_LOG_INTERVAL_S = 10.0  # "still cannot reach ..." at most this often
WARNING_INTERVAL_S = 1.0  # at most one line a second per cause (holes, drops, failures)
REPLAY_MARGIN_NS = 10 * 10**9  # a replay asks this much before the last published frame
JS_PUBLISH_TIMEOUT_S = 5.0  # a JetStream publish not acknowledged by then failed
JS_API_TIMEOUT_S = 5.0
JS_ACK_WAIT_S = 2.0  # an unacknowledged batch comes again after this (a crashed bridge's)
JS_PROGRESS_S = 0.5  # while a batch waits for a paused relay, tell JetStream this often
JS_LAG_CHECK_S = 0.1  # while held, how often a bridge looks at the other hosts' consumers
MAX_LAG_BATCHES = 256  # hold publishing while a live host is this many batches behind
STREAM_MAX_AGE_S = 24 * 3600.0
STREAM_DUPLICATE_WINDOW_S = 120.0  # Nats-Msg-Id dedupe window
IDLE_BATCH_S = 1.0  # core NATS: this long after the last batch, an empty one carries the count
STATS_REQUEST_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 1.0  # on SIGTERM, flush what is buffered to NATS for at most this long

# The one header of every batch (NATS message headers; the payload is the frames,
# untouched): "HOST EPOCH BATCH FRAMES SENT[ SOURCE:SEQUENCE:TIMESTAMP_NS]" (BatchHeader).
# One header, not five: nats-py parses each header line in Python, ~20 us apiece.
H_BATCH = "Torq-Batch"
H_MSG_ID = "Nats-Msg-Id"  # JetStream's dedupe key: "host:epoch:batch"

SYSTEM_PREFIX = logic.frame_prefix(Domain.SYSTEM)  # magic, domain 4, version 1
SYSTEM_DOMAIN = bytes((Domain.SYSTEM,))
DOMAIN_OFFSET = 4  # the header's relay_domain byte
TOKEN = re.compile(r"[A-Za-z0-9_-]+")  # one subject token: no dots, wildcards or spaces
TRANSPORTS = ("core", "jetstream")


class BridgeError(RuntimeError):
    """The bridge cannot start or run; the message is one line a user can act on."""


class _Resync(Exception):
    """JetStream did not store a batch: re-read where the stream stands and replay."""


# ---------------------------------------------------------------------------------------
# Stats
# ---------------------------------------------------------------------------------------


@dataclass
class BridgeStats:
    """The bridge's counters (``Bridge.stats()`` returns a copy).

    *out*: relay -> NATS (JetStream: acknowledged by the stream); *in*: NATS -> relay.
    """

    batches_out: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    batches_in: int = 0
    frames_in: int = 0
    bytes_in: int = 0
    duplicates: int = 0  # batches dropped because they were already seen
    holes: int = 0  # gaps in an origin's batches
    frames_lost: int = 0  # frames missing in those holes, told to the local relay
    relay_dropped: int = 0  # frames the local relay dropped for this bridge (sent on as holes)
    replayed: int = 0  # frames published from the local relay's replay after a restart
    replay_misses: int = 0  # replays that did not reach back to the last published frame
    send_failures: int = 0  # batches NATS did not take (core: lost; JetStream: sent again)
    frames_unsent: int = 0
    resyncs: int = 0  # JetStream: re-read the stream's last batch and replayed from it
    lag_holds: int = 0  # JetStream: publishing held because a host fell behind
    invalid: int = 0  # NATS messages on our subjects without valid batch headers
    nats_disconnects: int = 0
    nats_reconnects: int = 0
    relay_reconnects: int = 0


# ---------------------------------------------------------------------------------------
# Pure parts: batches of whole frames, and what arrived from each origin
# ---------------------------------------------------------------------------------------


class BatchHeader(NamedTuple):
    """What a batch's ``Torq-Batch`` header says.

    ``host``: the origin host id; ``epoch``: its bridge's start time (ns since the Unix
    epoch); ``batch``: 1, 2, 3, ... within the epoch; ``frames``: frames in this batch;
    ``sent``: frames sent in the epoch up to and including this batch, the losses before
    it included (so a hole is ``sent - frames`` minus the previous batch's ``sent``);
    ``last``: JetStream only, (source, sequence, timestamp_ns) of the last frame
    published so far, where a restarted bridge resumes.
    """

    host: str
    epoch: int
    batch: int
    frames: int
    sent: int
    last: tuple[int, int, int] | None = None

    def encode(self) -> str:
        """The header value."""
        text = f"{self.host} {self.epoch} {self.batch} {self.frames} {self.sent}"
        if self.last is not None:
            text += f" {self.last[0]}:{self.last[1]}:{self.last[2]}"
        return text

    @classmethod
    def decode(cls, text: str) -> BatchHeader:
        """Parse a header value; ``ValueError`` if it is not one."""
        parts = text.split()
        if len(parts) not in (5, 6):
            raise ValueError(f"a Torq-Batch header has 5 or 6 fields, not {text!r}")
        last = None
        if len(parts) == 6:
            source, sequence, timestamp_ns = (int(part) for part in parts[5].split(":"))
            last = (source, sequence, timestamp_ns)
        return cls(parts[0], int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4]),
                   last)


class Piece(NamedTuple):
    """Whole frames ``data[start:end]``: ``frames`` of them, the last one at ``last``."""

    start: int
    end: int
    frames: int
    last: int


def cut(offsets: range | list[int], start: int, end: int,
        limit: int = BATCH_BYTES) -> list[Piece]:
    """The whole frames between ``start`` and ``end`` (two frame boundaries among
    ``offsets``, a ``FrameBatch``'s) in pieces of at most ``limit`` bytes; a frame
    larger than ``limit`` is a piece of its own."""
    pieces: list[Piece] = []
    if isinstance(offsets, range):
        size = offsets.step
        step = max(1, limit // size) * size
        for at in range(start, end, step):
            stop = min(at + step, end)
            pieces.append(Piece(at, stop, (stop - at) // size, stop - size))
        return pieces
    i = bisect.bisect_left(offsets, start)
    last = bisect.bisect_left(offsets, end, i)
    while i < last:
        at = offsets[i]
        j = max(i + 1, bisect.bisect_right(offsets, at + limit, i + 1, last + 1) - 1)
        pieces.append(Piece(at, offsets[j], j - i, offsets[j - 1]))
        i = j
    return pieces


def _on_boundary(offsets: range | list[int], at: int) -> bool:
    if isinstance(offsets, range):
        return (at - offsets.start) % offsets.step == 0
    i = bisect.bisect_left(offsets, at)
    return i < len(offsets) - 1 and offsets[i] == at


def control_frames(data: bytes, offsets: range | list[int], start: int, end: int) -> list[int]:
    """Where the domain-4 frames (gap notices, replay markers) start between ``start``
    and ``end``. Shaped for speed: frames of one size have their domain bytes gathered
    with one strided slice and searched in C (one byte a frame read, ~20x less than
    scanning the bytes); otherwise ``bytes.find`` of their 6-byte prefix, a hit inside a
    payload told apart by checking that it is a frame boundary."""
    found = []
    if isinstance(offsets, range):
        size = offsets.step
        column = data[start + DOMAIN_OFFSET:end:size]
        at = column.find(SYSTEM_DOMAIN)
        while at >= 0:
            found.append(start + at * size)
            at = column.find(SYSTEM_DOMAIN, at + 1)
        return found
    at = data.find(SYSTEM_PREFIX, start, end)
    while at >= 0:
        if _on_boundary(offsets, at):
            found.append(at)
        at = data.find(SYSTEM_PREFIX, at + 1, end)
    return found


class Arrivals:
    """What arrived from each origin host: drops batches already seen and measures the
    frames missing before each new one.

    An origin is ``(epoch, batch, sent)`` as its last batch said. A batch of a newer
    epoch (the origin's bridge restarted) starts that origin afresh: what its first
    batches lost is known (``sent`` counts from the epoch's start), what the old epoch
    lost after its last batch seen is not. The first batch of an origin never seen
    before owes nothing, unless its epoch began after this bridge subscribed
    (``joined_ns``): then it was there from the start.
    """

    def __init__(self, joined_ns: int = 0) -> None:
        self.joined_ns = joined_ns
        self.origins: dict[str, tuple[int, int, int]] = {}

    def admit(self, host: str, epoch: int, batch: int, frames: int, sent: int) -> int | None:
        """None for a batch already seen (or of an older epoch): drop it. Otherwise the
        number of frames missing between the origin's previous batch and this one."""
        known = self.origins.get(host)
        if known is None:
            missing = sent - frames if epoch >= self.joined_ns > 0 else 0
        elif epoch < known[0] or (epoch == known[0] and batch <= known[1]):
            return None
        elif epoch > known[0]:
            missing = sent - frames
        else:
            missing = sent - frames - known[2]
        self.origins[host] = (epoch, batch, sent)
        return max(0, missing)


class Resume(NamedTuple):
    """Where a (re)connected bridge asks its relay to replay from: retained frames with
    a timestamp ``>= since_ns``, of which those up to the frame ``after`` (source,
    sequence) were published already."""

    since_ns: int
    after: tuple[int, int] | None


class _Replay:
    """The replay in progress on the relay link: frames before the ``RELAY_LIVE``
    marker, held until it is known which of them were published already."""

    def __init__(self, resume: Resume) -> None:
        self.after = resume.after
        self.found = resume.after is None  # the last published frame went by
        self.held: list[bytes] = []
        self.done = False  # the marker came: the link reads live traffic now


# ---------------------------------------------------------------------------------------
# Names: host ids, subjects, the stream
# ---------------------------------------------------------------------------------------


def default_host_id() -> str:
    """This host's name as a subject token (dots and other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def check_token(text: str, what: str) -> str:
    """``text`` if it is one NATS subject token of letters, digits, ``-`` and ``_``."""
    if not TOKEN.fullmatch(text):
        raise ValueError(f"{what} {text!r} must be letters, digits, '-' or '_' (it is one "
                         "token of a NATS subject)")
    return text


def check_prefix(text: str) -> str:
    """A subject prefix: one or more tokens joined by dots."""
    if not all(TOKEN.fullmatch(part) for part in text.split(".")) or text.startswith("_"):
        raise ValueError(f"subject prefix {text!r} must be tokens of letters, digits, '-' "
                         "or '_' joined by dots, e.g. torq or prod.torq")
    return text


def stats_subject(prefix: str, domain: str, host: str | None = None) -> str:
    """The request-reply subject of the bridges' stats: one host's, or every host's
    (``host`` None). Never matched by a data subscription ``PREFIX.DOMAIN.*``: its
    second token is ``_bridge`` and it has more tokens."""
    base = f"{prefix}._bridge.stats.{domain}"
    return base if host is None else f"{base}.{host}"


def stream_name(prefix: str, domain: str) -> str:
    """The JetStream stream of a domain, e.g. ``TORQ_EXECUTION``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{prefix}_{domain}").upper()


def _last_frame(data: bytes, at: int) -> tuple[int, int, int]:
    """(source, sequence, timestamp_ns) of the frame at ``at``."""
    header = HEADER.unpack_from(data, at)
    return int(header[3]), int(header[5]), int(header[6])


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------
# Bridge
# ---------------------------------------------------------------------------------------


class Bridge:
    """One domain's bridge between the host's relay and NATS (see the module docstring).

    ``transport`` is ``core`` or ``jetstream`` (default: JetStream for a domain whose
    overflow is backpressure, i.e. execution). ``run()`` serves until ``stop()``.
    """

    def __init__(self, logic_: RelayLogic, nats_urls: list[str], *,
                 socket_path: str | None = None, host_id: str | None = None,
                 subject_prefix: str = SUBJECT_PREFIX, transport: str | None = None,
                 stats_interval: float = STATS_INTERVAL_S, stream_replicas: int = 1,
                 max_lag: int = MAX_LAG_BATCHES) -> None:
        self.logic = logic.validate_logic(logic_)
        self.name = check_token(self.logic.name, "domain name")
        if not nats_urls:
            raise ValueError("give at least one NATS server URL (--nats)")
        self.nats_urls = list(nats_urls)
        self.socket_path = socket_path or self.logic.socket_path
        self.host_id = check_token(host_id or default_host_id(), "host id")
        self.prefix = check_prefix(subject_prefix)
        self.transport = transport or (
            "jetstream" if self.logic.overflow == "backpressure" else "core")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport {self.transport!r} unknown; use core or jetstream")
        if not stats_interval >= 0:
            raise ValueError(f"stats interval must be 0 or more seconds, got {stats_interval}")
        self.stats_interval = stats_interval
        self.stream_replicas = stream_replicas
        self.max_lag = max_lag
        self.jetstream = self.transport == "jetstream"

        self.subject = f"{self.prefix}.{self.name}.{self.host_id}"
        self.wildcard = f"{self.prefix}.{self.name}.*"
        self.stream = stream_name(self.prefix, self.name)
        self.durable = f"bridge_{self.host_id}"
        self.deliver_subject = f"{self.prefix}._bridge.deliver.{self.name}.{self.host_id}"
        self.relay_source = int(logic.RELAY_SOURCE.get(int(self.logic.domain), 0))

        self.epoch = time.time_ns()
        self.started_monotonic = time.monotonic()
        self.counters = BridgeStats()
        self.arrivals = Arrivals()
        # The outbound sequence of this epoch, and what the next batch carries.
        self.batch = 0
        self.sent = 0
        self.loss_owed = 0  # frames the relay dropped for us that no batch has carried yet
        self.last_frame: tuple[int, int, int] | None = None  # the last frame published
        self.failed: tuple[int, int] | None = None  # JetStream: (batch, loss it carried)
        self.first_unstored: tuple[int, int, int] | None = None
        self.published_at = 0.0  # when the last batch was published (monotonic)
        self.count_unconfirmed = False  # a batch went out that no later one has confirmed

        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self.sink: AsyncRelayClient | None = None  # NATS -> relay (publish only)
        self.source: AsyncRelayClient | None = None  # relay -> NATS
        self.subscriptions: list[Subscription] = []
        self.unchecked = 0  # JetStream: batches published since the lag was checked
        self.held = False  # JetStream: publishing held because a host fell behind
        self.writing_since = 0.0  # when the write to the relay under way began (0: none)
        self.stopping = asyncio.Event()
        self.connecting = True
        self.last_warning: dict[str, float] = {}
        self.last_stats: tuple[float, BridgeStats] = (time.monotonic(), BridgeStats())

    # -- public -----------------------------------------------------------------------

    def stats(self) -> BridgeStats:
        """A copy of the counters (relay reconnects include the writing link's)."""
        snapshot = BridgeStats(**asdict(self.counters))
        if self.sink is not None:
            snapshot.relay_reconnects += self.sink.reconnects
        return snapshot

    def report(self) -> dict[str, Any]:
        """What ``bridge.py stats`` prints: who this bridge is, and its counters."""
        url = self.nc.connected_url if self.nc is not None else None
        return {"bridge": {
            "host": self.host_id, "domain": self.name, "transport": self.transport,
            "epoch": self.epoch, "pid": os.getpid(), "version": __version__,
            "uptime_s": round(time.monotonic() - self.started_monotonic, 3),
            "socket": self.socket_path, "subject": self.subject,
            "subscribed": self.wildcard, "stream": self.stream if self.jetstream else None,
            "nats_connected": bool(self.nc is not None and self.nc.is_connected),
            "nats_url": url.geturl() if url is not None else None,
            "batch": self.batch, "sent": self.sent,
            "publishing_held": self.held},
            "counters": asdict(self.stats())}

    def stop(self) -> None:
        """Ask ``run()`` to finish (from the bridge's event loop)."""
        self.stopping.set()

    async def run(self) -> None:
        """Serve until ``stop()`` (or SIGINT / SIGTERM when the loop has handlers)."""
        _import_nats()
        tasks: list[asyncio.Task[Any]] = []
        try:
            if not await self._until_stopped(self._start()):
                return
            tasks.append(asyncio.ensure_future(self._relay_to_nats()))
            if not self.jetstream:
                tasks.append(asyncio.ensure_future(self._idle_batches()))
            if self.stats_interval > 0:
                tasks.append(asyncio.ensure_future(self._log_stats_forever()))
            stop = asyncio.ensure_future(self.stopping.wait())
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            for task in done:
                if task is not stop:
                    task.result()  # a task that ended on its own failed: say why
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close()
            self._log_stats(final=True)

    async def _start(self) -> None:
        """Connect to NATS, make the stream (JetStream), connect to the relay, subscribe:
        each retried until it works."""
        await self._connect_nats()
        if self.jetstream:
            await self._retrying("the JetStream stream", self._ensure_stream)
        self.sink = await self._connect_relay(publish_only=True, bridge=True, reconnect=True,
                                              reconnect_timeout=math.inf)
        await self._subscribe()
        log.info("bridging %s between %s and NATS as host %s: publishing on %s, subscribed "
                 "to %s (%s)", self.name, self.socket_path, self.host_id, self.subject,
                 self.wildcard,
                 f"JetStream stream {self.stream}" if self.jetstream else "core NATS")

    # -- NATS ---------------------------------------------------------------------------

    async def _until_stopped(self, work: Awaitable[Any]) -> bool:
        """Run ``work`` unless a stop comes first; True if it finished."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return False
        task.result()
        return True

    async def _connect_nats(self) -> None:
        import nats
        self.connecting = True
        self.nc = await nats.connect(
            self.nats_urls, name=f"torq-bridge {self.name} {self.host_id}",
            error_cb=self._nats_error, disconnected_cb=self._nats_disconnected,
            reconnected_cb=self._nats_reconnected, allow_reconnect=True,
            max_reconnect_attempts=-1, reconnect_time_wait=NATS_RECONNECT_WAIT_S,
            dont_randomize=True,  # the first URL is this host's own server
            connect_timeout=NATS_CONNECT_TIMEOUT_S, pending_size=NATS_PENDING_BYTES,
            no_echo=True)
        self.connecting = False
        self.js = self.nc.jetstream(timeout=JS_API_TIMEOUT_S)
        url = self.nc.connected_url
        version = self.nc.connected_server_version
        log.info("connected to NATS at %s (nats-server %d.%d.%d)",
                 url.geturl() if url else "?", version.major, version.minor, version.patch)

    def _stop_if_stopping(self) -> None:
        """End a retry loop once the bridge is stopping. Python 3.11's ``wait_for``
        (inside connects) can swallow a cancellation that meets a failed attempt; a loop
        that only caught the error would then retry forever instead of stopping."""
        if self.stopping.is_set():
            raise asyncio.CancelledError

    async def _nats_error(self, exc: Exception) -> None:
        from nats.errors import SlowConsumerError
        self._stop_if_stopping()  # ends nats-py's (re)connect loops too: see above
        if isinstance(exc, SlowConsumerError):
            self._warn("slow", "NATS: batches arrive faster than this bridge writes them "
                       "to its relay; nats-py dropped some (counted as holes)")
        elif self.connecting:
            self._limited(logging.WARNING, "connect", RETRY_LOG_INTERVAL_S,
                          "cannot reach NATS at %s (%s); retrying every %d s",
                          ",".join(self.nats_urls), _describe(exc), NATS_RECONNECT_WAIT_S)
        elif self.nc is not None and self.nc.is_reconnecting:
            self._limited(logging.WARNING, "reconnect", RETRY_LOG_INTERVAL_S,
                          "NATS: %s; still reconnecting", _describe(exc))
        else:
            self._warn("nats", "NATS: %s", _describe(exc))

    async def _nats_disconnected(self) -> None:
        if self.stopping.is_set() or self.connecting:
            return
        self.counters.nats_disconnects += 1
        log.warning("lost the NATS server; reconnecting (servers: %s)",
                    ", ".join(s.geturl() for s in self.nc.servers) if self.nc else "?")

    async def _nats_reconnected(self) -> None:
        self.counters.nats_reconnects += 1
        url = self.nc.connected_url if self.nc is not None else None
        log.info("reconnected to NATS at %s", url.geturl() if url else "?")

    def _nats(self) -> NatsClient:
        assert self.nc is not None, "connected in run()"
        return self.nc

    def _stream_api(self) -> JetStreamContext:
        assert self.js is not None, "connected in run()"
        return self.js

    async def _nats_connected(self) -> None:
        """Wait until the NATS connection is up."""
        nc = self._nats()
        while not nc.is_connected:
            if nc.is_closed:
                raise BridgeError("the NATS connection is closed")
            await asyncio.sleep(RETRY_FIRST_DELAY_S)

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[Any]]) -> Any:
        """``attempt()`` until it succeeds, with backoff and a rate-limited line."""
        from nats.errors import Error as NatsError
        from nats.errors import NoRespondersError
        from nats.js.errors import ServiceUnavailableError
        delay = RETRY_FIRST_DELAY_S
        while True:
            try:
                return await attempt()
            except (NatsError, OSError) as exc:
                self._stop_if_stopping()
                why = ("no JetStream answers: start nats-server with -js (a cluster may also "
                       "still be electing its leader)"
                       if isinstance(exc, NoRespondersError | ServiceUnavailableError)
                       else _describe(exc))
                self._limited(logging.WARNING, what, RETRY_LOG_INTERVAL_S,
                              "%s: %s; retrying", what, why)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)

    async def _subscribe(self) -> None:
        nc = self._nats()
        if self.jetstream:
            await self._retrying("the JetStream consumer", self._bind_consumer)
        else:
            self.subscriptions.append(await nc.subscribe(
                self.wildcard, cb=self._on_core_batch, pending_msgs_limit=SUB_PENDING_MSGS,
                pending_bytes_limit=SUB_PENDING_BYTES))
        for subject in (stats_subject(self.prefix, self.name, self.host_id),
                        stats_subject(self.prefix, self.name)):
            self.subscriptions.append(await nc.subscribe(subject, cb=self._on_stats_request))
        await nc.flush()  # the server has every subscription: batches from now on arrive
        self.arrivals.joined_ns = time.time_ns()

    async def _close(self) -> None:
        nc = self.nc
        if nc is not None and not nc.is_closed:
            # Shutting down: whatever NATS says (an error, a cancelled reconnect), go on.
            if nc.is_connected:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(nc.flush(), STOP_TIMEOUT_S)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(nc.close(), STOP_TIMEOUT_S)
        for client in (self.source, self.sink):
            if client is not None:
                await client.close()

    # -- the relay links ------------------------------------------------------------------

    async def _connect_relay(self, **options: Any) -> AsyncRelayClient:
        """Connect to the local relay, retrying (with a rate-limited line) until it
        answers."""
        delay = RETRY_FIRST_DELAY_S
        while True:
            try:
                return await AsyncRelayClient.connect(self.socket_path, **options)
            except (ConnectionError, OSError) as exc:
                self._stop_if_stopping()
                self._limited(logging.WARNING, "relay", RETRY_LOG_INTERVAL_S,
                              "%s; retrying", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)

    # -- relay -> NATS ------------------------------------------------------------------

    async def _relay_to_nats(self) -> None:
        """Read the local relay and publish; reconnect and replay when it goes away, and
        (JetStream) resynchronise with the stream when a publish fails."""
        resume = await self._stream_resume() if self.jetstream else None
        while True:
            replay = _Replay(resume) if resume is not None else None
            source = await self._connect_relay(
                bridge=True, gap_notices=True,
                replay_since_ns=resume.since_ns if resume is not None else None)
            self.source = source
            try:
                while True:
                    batch: FrameBatch | None = await source.recv_batch()
                    if replay is not None and batch is not None:
                        batch = await self._replayed(replay, batch)
                        if replay.done:
                            replay = None
                    if batch is not None:
                        await self._forward(batch)
            except (EOFError, ConnectionError, ProtocolError) as exc:
                self.counters.relay_reconnects += 1
                log.warning("the relay at %s went away (%s); reconnecting", self.socket_path,
                            exc)
                resume = await self._resume_point()
            except _Resync:
                await source.close()
                self.counters.resyncs += 1
                await self._nats_connected()
                resume = await self._stream_resume()
                log.info("resynchronised with JetStream: it holds batch %d of this epoch; "
                         "replaying from the relay what it does not hold", self.batch)
            finally:
                await source.close()
                self.source = None

    async def _resume_point(self) -> Resume | None:
        """Where to replay from after the relay link was lost."""
        if self.jetstream:
            await self._nats_connected()
            return await self._stream_resume()
        if self.last_frame is None:
            return None
        source, sequence, timestamp_ns = self.last_frame
        return Resume(max(0, timestamp_ns - REPLAY_MARGIN_NS), (source, sequence))

    async def _replayed(self, replay: _Replay, batch: FrameBatch) -> FrameBatch | None:
        """Frames of a replay: hold them until the ``RELAY_LIVE`` marker, dropping those
        up to the last frame already published; returns what follows the marker."""
        data, offsets = batch.data, batch.offsets
        for i in range(len(offsets) - 1):
            at, end = offsets[i], offsets[i + 1]
            header = HEADER.unpack_from(data, at)
            if header[1] == Domain.SYSTEM:
                if logic.first_tlv_type(data, at) == RELAY_LIVE:
                    await self._end_replay(replay, data[at:end])
                    rest = offsets[i + 1:]
                    return FrameBatch(data, rest) if len(rest) > 1 else None
                self._control(data[at:end])
            elif not replay.found:
                if (header[3], header[5]) == replay.after:
                    replay.found = True
                    replay.held.clear()
                else:
                    replay.held.append(data[at:end])
            else:
                replay.held.append(data[at:end])
        return None

    async def _end_replay(self, replay: _Replay, marker: bytes) -> None:
        live = logic.decode_live(logic.parse_message(marker).tlvs[0][1])
        held = replay.held
        if not replay.found:
            self.counters.replay_misses += 1
            if held:
                log.warning("the relay no longer retains the last frame published from this "
                            "host (source %d, sequence %d): publishing all %d frames it "
                            "replayed; any before them are lost unless the relay restarted "
                            "(raise its --retain to cover an outage)", *replay.after or (0, 0),
                            len(held))
        log.info("replay from the relay: %d frames retained since the last published one, "
                 "%d of them new (%d unavailable)", live.replayed, len(held), live.unavailable)
        replay.done = True
        if held:
            data = b"".join(held)
            offsets = [0]
            for frame in held:
                offsets.append(offsets[-1] + len(frame))
            self.counters.replayed += len(held)
            await self._forward(FrameBatch(data, offsets))

    async def _forward(self, batch: FrameBatch) -> None:
        """Publish one read's frames in batches; act on the relay's notices among them."""
        data, offsets = batch.data, batch.offsets
        pos, end = offsets[0], offsets[-1]
        for at in control_frames(data, offsets, pos, end):
            if at > pos:
                await self._publish_frames(data, offsets, pos, at)
            stop = at + HEADER_SIZE + int(HEADER.unpack_from(data, at)[7])
            self._control(data[at:stop])
            pos = stop
        if pos < end:
            await self._publish_frames(data, offsets, pos, end)
        if self.loss_owed:
            await self._publish(b"", 0, None)  # carry the loss now, not with the next data

    def _control(self, frame: bytes) -> None:
        """A frame the relay made: a gap notice is loss to send on as a hole."""
        try:
            _, tlvs = logic.parse_message(frame)
        except ProtocolError as exc:
            log.debug("ignored a malformed frame from the relay: %s", exc)
            return
        if tlvs and tlvs[0][0] == RELAY_GAP:
            dropped = logic.decode_gap(tlvs[0][1]).dropped
            self.loss_owed += dropped
            self.counters.relay_dropped += dropped
            self._warn("relay-dropped", "the relay dropped %d frames for this bridge (it is "
                       "behind the relay's traffic); remote hosts are told of them as a hole",
                       dropped)

    async def _publish_frames(self, data: bytes, offsets: range | list[int], start: int,
                              end: int) -> None:
        for piece in cut(offsets, start, end):
            await self._publish(data[piece.start:piece.end], piece.frames,
                                _last_frame(data, piece.last))

    async def _idle_batches(self) -> None:
        """Core NATS: once traffic stops, an empty batch carries the count so far, so the
        other hosts learn of a batch lost at the end of a burst within ``IDLE_BATCH_S``,
        not only when the next burst comes."""
        while True:
            await asyncio.sleep(IDLE_BATCH_S / 4)
            if (self.count_unconfirmed and self._nats().is_connected
                    and time.monotonic() - self.published_at >= IDLE_BATCH_S):
                await self._publish(b"", 0, None)
                self.count_unconfirmed = False

    async def _publish(self, payload: bytes, frames: int,
                       last: tuple[int, int, int] | None) -> None:
        """Publish one batch: ``frames`` whole frames (``last`` the last one's header
        fields), with the loss owed before them."""
        from nats.errors import Error as NatsError
        self.published_at = time.monotonic()
        self.count_unconfirmed = True
        carried = self.loss_owed
        self.batch += 1
        self.sent += frames + carried
        self.loss_owed = 0
        if self.jetstream:
            await self._publish_to_stream(payload, frames, carried, last)
        else:
            header = BatchHeader(self.host_id, self.epoch, self.batch, frames, self.sent)
            try:
                await self._nats().publish(self.subject, payload,
                                           headers={H_BATCH: header.encode()})
            except (NatsError, OSError) as exc:
                self.counters.send_failures += 1
                self.counters.frames_unsent += frames
                self._warn("send", "NATS did not take batch %d (%d frames): %s; remote hosts "
                           "see a hole", self.batch, frames, _describe(exc))
                return
        counters = self.counters
        counters.batches_out += 1
        counters.frames_out += frames
        counters.bytes_out += len(payload)
        if last is not None:
            self.last_frame = last

    # -- JetStream ----------------------------------------------------------------------

    async def _ensure_stream(self) -> None:
        """Create the domain's stream if it is missing."""
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig
        from nats.js.errors import BadRequestError, NotFoundError
        js = self._stream_api()
        try:
            await js.stream_info(self.stream)
            return
        except NotFoundError:
            pass
        config = StreamConfig(name=self.stream, subjects=[self.wildcard],
                              retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                              max_age=STREAM_MAX_AGE_S, num_replicas=self.stream_replicas,
                              duplicate_window=STREAM_DUPLICATE_WINDOW_S)
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.stream_info(self.stream)  # another bridge made it first
            return
        log.info("created the JetStream stream %s for %s (%d replicas)", self.stream,
                 self.wildcard, self.stream_replicas)

    async def _stream_resume(self) -> Resume | None:
        """Ask the stream for the last batch it holds from this host: the numbering of
        this epoch goes on from it, and the relay replays what came after its last
        frame."""
        from nats.js.errors import NotFoundError
        js = self._stream_api()

        async def last_stored() -> Any:
            try:
                return await js.get_last_msg(self.stream, self.subject)
            except NotFoundError:
                return None

        stored = await self._retrying("the stream's last batch", last_stored)
        header = None
        if stored is not None and stored.headers and H_BATCH in stored.headers:
            try:
                header = BatchHeader.decode(stored.headers[H_BATCH])
            except ValueError as exc:
                log.warning("the stream's last batch from this host is unreadable (%s): "
                            "starting afresh", exc)
        failed, self.failed = self.failed, None
        if header is not None and header.epoch == self.epoch:
            self.batch, self.sent = header.batch, header.sent
        else:
            self.batch = self.sent = 0
        if failed is not None and failed[0] > self.batch:
            self.loss_owed += failed[1]  # the failed batch carried loss: carry it again
        if header is not None and header.last is not None:
            source, sequence, timestamp_ns = header.last
            self.first_unstored = None
            return Resume(max(0, timestamp_ns - REPLAY_MARGIN_NS), (source, sequence))
        if self.first_unstored is not None:  # nothing stored in this epoch: all of it
            return Resume(max(0, self.first_unstored[2] - REPLAY_MARGIN_NS), None)
        return None

    async def _publish_to_stream(self, payload: bytes, frames: int, carried: int,
                                 last: tuple[int, int, int] | None) -> None:
        from nats.errors import Error as NatsError
        if self.max_lag:
            self.unchecked += 1
            if self.unchecked >= max(1, self.max_lag // 2):
                await self._hold_while_behind()
        header = BatchHeader(self.host_id, self.epoch, self.batch, frames, self.sent,
                             last if last is not None else self.last_frame)
        headers = {H_BATCH: header.encode(),
                   H_MSG_ID: f"{self.host_id}:{self.epoch}:{self.batch}"}
        try:
            ack = await self._stream_api().publish(self.subject, payload, stream=self.stream,
                                                   timeout=JS_PUBLISH_TIMEOUT_S,
                                                   headers=headers)
        except (NatsError, OSError) as exc:
            self.counters.send_failures += 1
            self.counters.frames_unsent += frames
            self.failed = (self.batch, carried)
            if self.first_unstored is None and self.last_frame is None and last is not None:
                self.first_unstored = last
            self._warn("send", "JetStream did not store batch %d (%d frames): %s; "
                       "resynchronising", self.batch, frames, _describe(exc))
            raise _Resync from None
        if ack.duplicate:
            # Stored before, by an attempt we thought had failed: see what it held.
            log.info("JetStream already held batch %d; resynchronising", self.batch)
            raise _Resync

    async def _bind_consumer(self) -> None:
        """Subscribe to this host's durable push consumer (made on first start): one
        batch in flight at a time, acknowledged once written to the relay, so a crash
        costs at most that batch twice and never the order."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError
        js, nc = self._stream_api(), self._nats()
        try:
            info = await js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            info = None
        if info is not None and info.config.deliver_subject != self.deliver_subject:
            raise BridgeError(
                f"the JetStream consumer {self.durable} on {self.stream} is not this bridge's "
                f"(it delivers to {info.config.deliver_subject}); delete it: nats consumer "
                f"rm {self.stream} {self.durable}")
        self.subscriptions.append(await nc.subscribe(
            self.deliver_subject, cb=self._on_stream_batch, pending_msgs_limit=SUB_PENDING_MSGS,
            pending_bytes_limit=SUB_PENDING_BYTES))
        if info is None:
            await js.add_consumer(self.stream, ConsumerConfig(
                name=self.durable, durable_name=self.durable,
                deliver_subject=self.deliver_subject, deliver_policy=DeliverPolicy.NEW,
                ack_policy=AckPolicy.EXPLICIT, ack_wait=JS_ACK_WAIT_S, max_ack_pending=1,
                filter_subject=self.wildcard,
                description=f"torq bridge on host {self.host_id}"))
            log.info("created the durable JetStream consumer %s on %s", self.durable,
                     self.stream)

    async def _hold_while_behind(self) -> None:
        """Wait while a live host's consumer is more than ``max_lag`` batches behind
        (asked every ``max_lag / 2`` batches published): the stream would absorb it
        all, so this is how a paused relay on another host holds back this one's
        publishers. A host whose bridge is down does not count (its consumer keeps its
        place in the stream); when JetStream does not answer, or this host's own relay
        is paused too (hosts holding each other would never move), publishing goes on."""
        from nats.errors import Error as NatsError
        js = self._stream_api()
        self.unchecked = 0
        while True:
            try:
                consumers = await js.consumers_info(self.stream)
            except (NatsError, OSError):
                return
            behind = [(int(c.num_pending or 0) + int(c.num_ack_pending or 0), c.name)
                      for c in consumers if c.name != self.durable and c.push_bound]
            worst = max(behind, default=(0, ""))
            writing = self.writing_since
            stuck = bool(writing) and time.monotonic() - writing > JS_LAG_CHECK_S
            if worst[0] <= self.max_lag or stuck:
                if self.held:
                    self.held = False
                    log.info("publishing again: %s", "every live host is within "
                             f"{self.max_lag} batches" if not stuck else "this host's relay "
                             "is paused too (two hosts holding each other would never "
                             "move); the stream takes the rest")
                return
            if not self.held:
                self.held = True
                self.counters.lag_holds += 1
                log.info("holding: consumer %s is %d batches behind (more than %d); the "
                         "relay holds this host's publishers meanwhile", worst[1], worst[0],
                         self.max_lag)
            await asyncio.sleep(JS_LAG_CHECK_S)

    # -- NATS -> relay ------------------------------------------------------------------

    def _origin(self, msg: Msg) -> BatchHeader | None:
        """What a batch from another host says about itself, else None."""
        headers = msg.headers
        try:
            header = BatchHeader.decode(headers[H_BATCH]) if headers else None
        except (KeyError, ValueError):
            header = None
        if header is None:
            self.counters.invalid += 1
            self._warn("invalid", "ignored a message on %s without a valid %s header",
                       msg.subject, H_BATCH)
            return None
        return header if header.host != self.host_id else None

    async def _on_core_batch(self, msg: Msg) -> None:
        origin = self._origin(msg)
        if origin is None:
            return
        missing = self.arrivals.admit(*origin[:5])
        if missing is None:
            self.counters.duplicates += 1
            return
        await self._write_local(origin.host, msg.data, origin.frames, missing)

    async def _on_stream_batch(self, msg: Msg) -> None:
        from nats.errors import Error as NatsError
        origin = self._origin(msg)
        if origin is not None:
            missing = self.arrivals.admit(*origin[:5])
            if missing is None:
                self.counters.duplicates += 1
            else:
                write = asyncio.ensure_future(
                    self._write_local(origin.host, msg.data, origin.frames, missing))
                while not write.done():
                    await asyncio.wait([write], timeout=JS_PROGRESS_S)
                    if not write.done():
                        try:
                            await msg.in_progress()  # a paused relay: keep the batch ours
                        except (NatsError, OSError):
                            pass
                write.result()
        try:
            await msg.ack()
        except (NatsError, OSError) as exc:
            self._warn("ack", "could not acknowledge a batch (%s): it comes again, and is "
                       "dropped as a duplicate", _describe(exc))

    async def _write_local(self, host: str, data: bytes, frames: int, missing: int) -> None:
        """Write one batch to the local relay (awaited: a paused relay holds this bridge),
        preceded by a ``RELAY_GAP`` for the frames missing before it."""
        counters = self.counters
        size = len(data)
        if missing:
            counters.holes += 1
            counters.frames_lost += missing
            self._warn("hole", "host %s: %d frames lost on the way to this host; the local "
                       "consumers are told (RELAY_GAP)", host, missing)
            data = logic.gap_message(missing, counters.frames_lost,
                                     source=self.relay_source) + data
        if data:
            assert self.sink is not None, "connected in run()"
            self.writing_since = time.monotonic()
            await self.sink.send(data)
            self.writing_since = 0.0
        counters.batches_in += 1
        counters.frames_in += frames
        counters.bytes_in += size

    # -- stats ----------------------------------------------------------------------------

    async def _on_stats_request(self, msg: Msg) -> None:
        if msg.reply:
            await self._nats().publish(msg.reply, json.dumps(self.report()).encode())

    async def _log_stats_forever(self) -> None:
        while True:
            await asyncio.sleep(self.stats_interval)
            self._log_stats()

    def _log_stats(self, final: bool = False) -> None:
        now = time.monotonic()
        s = self.stats()
        then, before = self.last_stats
        elapsed = max(now - then, 1e-9)
        self.last_stats = (now, s)
        log.info(
            "%sstats: out %d batches, %d frames (%.0f/s), %d B | in %d batches, %d frames "
            "(%.0f/s), %d B | duplicates %d, holes %d, frames lost %d | relay dropped %d, "
            "replayed %d | send failures %d (%d frames), resyncs %d, lag holds %d | "
            "nats disconnects %d, reconnects %d | relay reconnects %d",
            "final " if final else "", s.batches_out, s.frames_out,
            (s.frames_out - before.frames_out) / elapsed, s.bytes_out, s.batches_in,
            s.frames_in, (s.frames_in - before.frames_in) / elapsed, s.bytes_in,
            s.duplicates, s.holes, s.frames_lost, s.relay_dropped, s.replayed,
            s.send_failures, s.frames_unsent, s.resyncs, s.lag_holds, s.nats_disconnects,
            s.nats_reconnects, s.relay_reconnects)

    def _warn(self, cause: str, message: str, *args: object) -> None:
        """A warning at most once a second per cause (no per-batch flood)."""
        self._limited(logging.WARNING, cause, WARNING_INTERVAL_S, message, *args)

    def _limited(self, level: int, cause: str, interval: float, message: str,
                 *args: object) -> None:
        now = time.monotonic()
        if now - self.last_warning.get(cause, -math.inf) >= interval:
            self.last_warning[cause] = now
            log.log(level, message, *args)


# ---------------------------------------------------------------------------------------
# Command line: run, stats
# ---------------------------------------------------------------------------------------


def _import_nats() -> None:
    """Import nats-py, or say in one line how to install it."""
    try:
        import nats  # noqa: F401
    except ImportError:
        raise BridgeError("nats-py is not installed; pip install nats-py") from None


class _OneLine(logging.Filter):
    """nats-py logs some errors with a traceback; the bridge's log keeps one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()}: {_describe(record.exc_info[1])}"
            record.args = None
            record.exc_info = None
        return True


def _urls(text: str) -> list[str]:
    urls = [url.strip() for url in text.split(",") if url.strip()]
    if not urls:
        raise argparse.ArgumentTypeError("give at least one NATS URL, e.g. nats://127.0.0.1:4222")
    return [url if "://" in url else f"nats://{url}" for url in urls]


def _token(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return check_token(text, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _prefix(text: str) -> str:
    try:
        return check_prefix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Options accepted before or after the command (SUPPRESS in the sub-command, so
    they never overwrite what came before it)."""
    def d(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    add = parser.add_argument
    add("--domain", type=domain_argument, default=d(domain_argument("market_data")), metavar="NAME",
        help=f"the domain: {', '.join(sorted(logic.LOGICS))} (default: market_data)")
    add("--nats", type=_urls, default=d(None), metavar="URL[,URL...]",
        help="the host's NATS servers, all of them for reconnects (required)")
    add("--socket", default=d(None), metavar="PATH",
        help="the local relay's socket (default: the domain's, e.g. "
        "/tmp/torq/market_data.sock)")
    add("--host-id", type=_token("host id"), default=d(None), metavar="ID",
        help="this host's name in subjects (default: the hostname, dots as _)")
    add("--subject-prefix", type=_prefix, default=d(SUBJECT_PREFIX), metavar="P",
        help=f"subjects are P.DOMAIN.HOST (default: {SUBJECT_PREFIX})")
    add("--log-level", type=log_level_argument, default=d("INFO"), metavar="L",
        help="debug, info, warning, error or critical (default: info)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python bridge.py``."""
    parser = argparse.ArgumentParser(
        prog="bridge.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="torq-relay bridge: join one domain's relays on many hosts through "
        "NATS (core NATS for market_data and signal, JetStream for execution). Needs "
        "nats-py (pip install nats-py). Exit codes: 0 clean stop, 1 runtime error, 2 usage.",
        epilog="examples:\n"
        "  python bridge.py --domain market_data --nats nats://10.0.0.1:4222,"
        "nats://10.0.0.2:4222\n"
        "  python bridge.py --domain execution --nats nats://127.0.0.1:4222 --host-id h1\n"
        "  python bridge.py --domain market_data --nats nats://127.0.0.1:4222 stats --json\n"
        "  python bridge.py --domain market_data --nats nats://127.0.0.1:4222 stats --all")
    parser.add_argument("--version", action="version",
                        version=f"bridge.py (torq-relay) {__version__}")
    _add_options(parser, defaults=True)
    parser.add_argument("--transport", choices=TRANSPORTS, default=None,
                        help="core NATS or JetStream (default: JetStream for a backpressure "
                        "domain, i.e. execution; core NATS otherwise)")
    parser.add_argument("--stats-interval", type=seconds_argument, default=STATS_INTERVAL_S,
                        metavar="S", help=f"log a stats line every S seconds, 0 = never "
                        f"(default: {STATS_INTERVAL_S:g}); SIGUSR1 logs one at once")
    parser.add_argument("--stream-replicas", type=int, choices=(1, 3, 5), default=1,
                        help="JetStream: replicas of a stream this bridge creates (default: "
                        "1; 3 on a cluster to survive a node)")
    parser.add_argument("--max-lag", type=count_argument, default=MAX_LAG_BATCHES, metavar="N",
                        help="JetStream: hold publishing while another live host is more "
                        f"than N batches behind, 0 = never (default: {MAX_LAG_BATCHES})")
    commands = parser.add_subparsers(dest="command", metavar="{run,stats}")
    run = commands.add_parser("run", help="bridge the domain (the default command)")
    _add_options(run, defaults=False)
    stats = commands.add_parser(
        "stats", help="show a running bridge's counters",
        description="Ask a running bridge for its counters (NATS request-reply on "
        "PREFIX._bridge.stats.DOMAIN.HOST).")
    stats.add_argument("--json", action="store_true", help="the JSON object")
    stats.add_argument("--all", action="store_true",
                       help="every bridge of the domain that answers, one after the other")
    _add_options(stats, defaults=False)
    return parser


async def _ask_stats(args: argparse.Namespace) -> list[dict[str, Any]]:
    import nats
    from nats.errors import Error as NatsError
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    host = args.host_id or default_host_id()
    domain = args.domain.name
    try:
        nc = await nats.connect(args.nats, allow_reconnect=False,
                                connect_timeout=NATS_CONNECT_TIMEOUT_S,
                                max_reconnect_attempts=0, error_cb=_quiet)
    except (NatsError, OSError) as exc:
        raise BridgeError(f"cannot reach NATS at {','.join(args.nats)}: {_describe(exc)}") \
            from None
    try:
        if not args.all:
            subject = stats_subject(args.subject_prefix, domain, host)
            try:
                reply = await nc.request(subject, b"", timeout=STATS_REQUEST_TIMEOUT_S)
            except (NoRespondersError, NatsTimeout):
                raise BridgeError(f"no bridge of {domain} on host {host} answers on {subject}; "
                                  "is it running (and is --host-id right)?") from None
            return [json.loads(reply.data)]
        inbox = nc.new_inbox()
        replies: list[dict[str, Any]] = []
        sub = await nc.subscribe(inbox)
        await nc.publish(stats_subject(args.subject_prefix, domain), b"", reply=inbox)
        deadline = time.monotonic() + STATS_REQUEST_TIMEOUT_S / 2
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=remaining)
            except (NatsTimeout, asyncio.TimeoutError):
                break
            replies.append(json.loads(msg.data))
        if not replies:
            raise BridgeError(f"no bridge of {domain} answered on "
                              f"{stats_subject(args.subject_prefix, domain)}")
        return sorted(replies, key=lambda r: str(r["bridge"]["host"]))
    finally:
        await nc.close()


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback for the stats command: the caller reports failures."""


def _stats_table(report: dict[str, Any]) -> str:
    """A running bridge's report as a small human table."""
    b = report["bridge"]
    lines = [f"bridge {b['domain']} on host {b['host']} (pid {b['pid']}, up {b['uptime_s']:.1f}"
             f" s, {'JetStream ' + str(b['stream']) if b['stream'] else 'core NATS'}, "
             f"{b['nats_url'] or 'NATS disconnected'})"]
    counters: dict[str, int] = report["counters"]
    width = max(len(name) for name in counters)
    lines += [f"  {name.replace('_', ' '):<{width}}  {value:>14,}"
              for name, value in counters.items()]
    return "\n".join(lines)


async def _serve(bridge: Bridge) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, bridge.stop)
    loop.add_signal_handler(signal.SIGUSR1, bridge._log_stats)
    await bridge.run()


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0 ok, 1 runtime error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("nats").addFilter(_OneLine())
    if args.nats is None:
        parser.error("--nats URL[,URL...] is required (the host's NATS servers)")
    try:
        _import_nats()
        if args.command == "stats":
            reports = asyncio.run(_ask_stats(args))
            for report in reports:
                print(json.dumps(report) if args.json else _stats_table(report))
            return 0
        bridge = Bridge(args.domain, args.nats, socket_path=args.socket,
                        host_id=args.host_id, subject_prefix=args.subject_prefix,
                        transport=args.transport, stats_interval=args.stats_interval,
                        stream_replicas=args.stream_replicas, max_lag=args.max_lag)
        asyncio.run(_serve(bridge))
        return 0
    except (BridgeError, ValueError, ConnectionError) as exc:
        print(f"bridge.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def console_main() -> None:
    """The ``torq-bridge`` command (``pip install .[bridge]``)."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
