"""Shared pytest fixtures and helpers: short socket directories, relays in threads and in
processes (read through their logs), CLI processes, a fake relay, waiting, raw sockets,
frame builders, frame header getters and readers.

The test files import the helpers they use from here (``from conftest import ...``);
what only one test file uses stays in that file."""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

import pytest

import logic
from logic import Domain, Source, build_message, gas_price, trade
from relay import Relay, RelayClient

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 5.0  # every socket and wait in the tests is bounded by this
SHORT_S = 0.1  # how long "nothing more arrives" is given, once the peer is known idle
TS = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z: frames built twice are identical
PRICE = 4_500_000_000_000  # 45000.00000000 in fixed point (8 decimals)
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
SIGNAL_BITS = {signal.SIGUSR1, signal.SIGTERM}  # caught once a relay process serves

Cli: TypeAlias = Callable[..., "subprocess.Popen[str]"]  # the ``cli`` fixture


# ---------------------------------------------------------------------------------------
# Helpers: waiting, raw sockets, frame header fields
# ---------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], what: str = "the condition",
               timeout: float = TIMEOUT_S, poll_s: float = 0.005) -> None:
    """Poll ``predicate`` every ``poll_s`` until true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll_s)


def connect_raw(path: str, timeout: float = TIMEOUT_S) -> socket.socket:
    """A plain Unix socket connected to ``path`` with ``timeout`` (for misbehaving clients)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def leave_stale_socket(path: str) -> None:
    """Leave a socket file at ``path`` that nobody listens on, as a killed relay does."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # bound, never listening, then closed: the file stays
    stale.close()


def domain_of(frame: bytes) -> int:
    """The relay domain byte of ``frame``'s header."""
    return int(logic.HEADER.unpack_from(frame)[1])


def source_of(frame: bytes) -> int:
    """The source id of ``frame``'s header."""
    return int(logic.HEADER.unpack_from(frame)[3])


def sequence_of(frame: bytes) -> int:
    """The sequence number of ``frame``'s header."""
    return int(logic.HEADER.unpack_from(frame)[5])


# ---------------------------------------------------------------------------------------
# Helpers: frames built, frames taken apart
# ---------------------------------------------------------------------------------------


def trade_message(sequence: int, *, source: int = Source.BINANCE, price: int = PRICE,
                  side: int = 0, timestamp_ns: int = TS, pad: int = 0,
                  relay_domain: int = Domain.MARKET_DATA) -> bytes:
    """A market-data Trade message numbered ``sequence`` (74 bytes without ``pad``).

    The Trade's own execution timestamp is always ``TS``; ``timestamp_ns`` is the
    header's. ``pad`` adds a second TLV (type 200) of that many zero bytes to make it
    larger; ``relay_domain`` overrides the header's domain byte (a message a relay of
    another domain filters)."""
    tlvs = [trade(0x1234, price, 100_000_000, TS, 100, 50, side)]
    if pad:
        tlvs.append((200, bytes(pad)))
    return build_message(relay_domain, source, tlvs, sequence=sequence,
                         timestamp_ns=timestamp_ns)


def gas_message(sequence: int, *, source: int = Source.POLYGON, block: int = 19_000_000,
                timestamp_ns: int = TS) -> bytes:
    """A market-data GasPrice message numbered ``sequence`` (66 bytes; its first TLV type
    is 18, not a Trade's) for block ``block``; ``timestamp_ns`` is the header's."""
    return build_message(Domain.MARKET_DATA, source, [gas_price(block, TS, 30, 25, 5, 202)],
                         sequence=sequence, timestamp_ns=timestamp_ns)


def gap_of(frame: bytes) -> logic.Gap | None:
    """The ``RELAY_GAP`` value (``(dropped, total_dropped)``) of a gap notice, None for
    any other frame."""
    if domain_of(frame) != Domain.SYSTEM:
        return None
    tlvs = logic.parse_message(frame).tlvs
    if not tlvs or tlvs[0][0] != logic.RELAY_GAP:
        return None
    return logic.decode_gap(tlvs[0][1])


def split_frames(data: bytes) -> list[bytes]:
    """Cut ``data``, a concatenation of whole frames (a recording, what a socket
    received), into its frames; a stream that ends inside a frame is a failure."""
    frames: list[bytes] = []
    pos = 0
    while pos < len(data):
        end = pos + logic.HEADER_SIZE + logic.HEADER.unpack_from(data, pos)[7]
        assert end <= len(data), f"the stream ends inside the frame at offset {pos}"
        frames.append(data[pos:end])
        pos = end
    return frames


# ---------------------------------------------------------------------------------------
# Helpers: reading from a client
# ---------------------------------------------------------------------------------------


def assert_nothing_more(client: RelayClient, wait: float = SHORT_S) -> None:
    """Nothing else arrives for ``client`` within ``wait`` (call it once the relay is
    known idle); a frame that does is a failure naming it."""
    try:
        frame = client.recv(timeout=wait)
    except TimeoutError:
        return
    raise AssertionError(f"an unexpected frame: seq {sequence_of(frame)}, domain "
                         f"{domain_of(frame)}, {len(frame)} B: {frame[:64].hex()}")


class Reader(threading.Thread):
    """Reads ``count`` frames from a client in a thread, ``burst`` at a time (all at
    once by default) with a pause of ``pause_s`` between bursts. ``received`` may be
    read while it runs; ``finish()`` returns the frames or re-raises what went wrong."""

    def __init__(self, client: RelayClient, count: int, burst: int | None = None,
                 pause_s: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.count = count
        self.burst = burst or count
        self.pause_s = pause_s
        self.frames: list[bytes] = []
        self.error: BaseException | None = None

    @property
    def received(self) -> int:
        """How many frames it has read so far."""
        return len(self.frames)

    def run(self) -> None:
        try:
            while len(self.frames) < self.count:
                for _ in range(min(self.burst, self.count - len(self.frames))):
                    self.frames.append(self.client.recv(timeout=TIMEOUT_S))
                if self.pause_s:
                    time.sleep(self.pause_s)
        except BaseException as exc:  # re-raised in the test thread by finish()
            self.error = exc

    def finish(self, timeout: float = TIMEOUT_S * 4) -> list[bytes]:
        """Join the thread (at most ``timeout``); the frames, or the reader's error."""
        self.join(timeout)
        assert not self.is_alive(), f"reader stuck after {len(self.frames)} frames"
        if self.error is not None:
            raise AssertionError(f"reader failed after {len(self.frames)} frames: "
                                 f"{self.error!r}") from self.error
        return self.frames


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """A fresh, short temp directory: AF_UNIX paths must stay under 108 bytes, which
    pytest's tmp_path does not promise."""
    path = tempfile.mkdtemp(prefix="torq-test-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def socket_path(socket_dir: str) -> str:
    """A socket path inside ``socket_dir`` (not yet created)."""
    return os.path.join(socket_dir, "relay.sock")


class RunningRelay:
    """A Relay serving in a background thread; ``stop()`` drains and joins it."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.path = relay.socket_path
        self.thread = threading.Thread(target=relay.serve_forever, daemon=True)
        self.thread.start()

    def client(self, **kwargs: Any) -> RelayClient:
        kwargs.setdefault("timeout", TIMEOUT_S)
        return RelayClient(self.path, **kwargs)

    def stats(self) -> Any:
        return self.relay.stats()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
        """Poll ``predicate`` until true; fail the test after ``timeout``, with the stats."""
        try:
            wait_until(predicate, "the relay", timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; stats: {self.relay.stats()}") from None

    def wait_clients(self, n: int) -> None:
        """Wait until the relay has accepted ``n`` clients in total."""
        self.wait_for(lambda: self.relay.stats().connections_total >= n)

    def stop(self) -> None:
        self.relay.shutdown()
        self.thread.join(TIMEOUT_S * 2)
        assert not self.thread.is_alive(), "relay did not stop"


StartRelay: TypeAlias = Callable[..., RunningRelay]  # the ``start_relay`` fixture


def wait_subscribed(running: RunningRelay, clients: int = 1) -> None:
    """Wait until ``clients`` clients are connected and the relay has read as many
    frames (their RELAY_SUBSCRIBE: control frames count in messages_in)."""
    running.wait_for(lambda: running.stats().connections_active >= clients
                     and running.stats().messages_in >= clients)


def publish_past_a_stopped_consumer(running: RunningRelay,
                                    consumer: subprocess.Popen[str],
                                    message: Callable[[int], bytes], batch: int = 1000) -> int:
    """Make ``running`` lose messages at ``consumer``, a CLI process reading from it (a
    ``tail`` or a ``record``), by publishing past it while it is stopped.

    Once the consumer has subscribed (``wait_subscribed``), stop it (SIGSTOP); publish
    ``message(1)``, ``message(2)``, ... in writes of ``batch`` from a new publish-only
    client until the relay drops a message, and wait until the relay has read them all
    (and the two clients' RELAY_SUBSCRIBE); then let the consumer run on (SIGCONT), also
    on failure. Fails if nothing is dropped within ``TIMEOUT_S``; returns how many
    messages were sent."""
    wait_subscribed(running)
    consumer.send_signal(signal.SIGSTOP)
    try:
        sent = 0
        with running.client(publish_only=True) as producer:
            deadline = time.monotonic() + TIMEOUT_S
            while running.stats().messages_dropped == 0:
                assert time.monotonic() < deadline, f"no drop: {running.stats()}"
                producer.send_many([message(sent + i + 1) for i in range(batch)])
                sent += batch
                time.sleep(0.01)
            running.wait_for(lambda: running.stats().messages_in >= sent + 2)
    finally:
        consumer.send_signal(signal.SIGCONT)
    return sent


@pytest.fixture
def start_relay(socket_path: str) -> Iterator[StartRelay]:
    """``start_relay(logic=MarketDataLogic(), **limits)`` starts a relay in a thread on
    ``socket_path`` (or ``socket_path=...``); every relay is stopped at teardown."""
    running: list[RunningRelay] = []

    def start(logic_: logic.RelayLogic | None = None, **kwargs: Any) -> RunningRelay:
        kwargs.setdefault("socket_path", socket_path)
        kwargs.setdefault("stats_interval", 0)
        relay = RunningRelay(Relay(logic_ or logic.MarketDataLogic(), **kwargs))
        running.append(relay)
        return relay

    yield start
    for relay in running:
        if relay.thread.is_alive():
            relay.stop()


def relay_command(*args: str) -> list[str]:
    """The command line of ``python relay.py ARGS``."""
    return [sys.executable, os.path.join(HERE, "relay.py"), *args]


@pytest.fixture
def cli() -> Iterator[Cli]:
    """``cli(*args)`` starts ``python relay.py ARGS`` as a process (text pipes); every
    process still running at teardown is killed."""
    processes: list[subprocess.Popen[str]] = []

    def start(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        process = subprocess.Popen(relay_command(*args), text=True, cwd=HERE, **kwargs)
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=TIMEOUT_S)


def read_text(path: str) -> str:
    """The text of the file at ``path`` (a log, a command's output), "" if there is none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def finish(process: subprocess.Popen[str],
           timeout: float = TIMEOUT_S * 2) -> tuple[int, str, str]:
    """Wait for ``process`` to exit on its own: (exit code, stdout, stderr)."""
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out or "", err or ""


def stop(process: subprocess.Popen[str],
         signum: int = signal.SIGTERM) -> tuple[int, str, str]:
    """Send ``signum`` to ``process`` and wait for it to exit: (exit code, stdout, stderr)."""
    process.send_signal(signum)
    return finish(process, TIMEOUT_S)


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = TIMEOUT_S * 2) -> subprocess.CompletedProcess[str]:
    """Run ``python relay.py ARGS`` to completion (for commands that exit by themselves)."""
    return subprocess.run(relay_command(*args), capture_output=True, text=True,
                          timeout=timeout, cwd=HERE, env=env)


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of process ``pid`` in clock ticks (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.fixture
def nofile_limit() -> Iterator[Callable[[int], None]]:
    """``nofile_limit(n)`` raises this process's RLIMIT_NOFILE soft limit to at least
    ``n`` (skips the test if the hard limit is lower); restored at teardown."""
    original = resource.getrlimit(resource.RLIMIT_NOFILE)

    def raise_to(n: int) -> None:
        soft, hard = original
        if soft >= n:
            return
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"needs {n} file descriptors; the hard RLIMIT_NOFILE is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))

    yield raise_to
    resource.setrlimit(resource.RLIMIT_NOFILE, original)


# ---------------------------------------------------------------------------------------
# A real relay process, read through its log (SIGUSR1 stats lines) and /proc
# ---------------------------------------------------------------------------------------

STATS_LINE = re.compile(
    r"(?P<final>final )?stats: clients (?P<connections_active>\d+) active, "
    r"(?P<connections_total>\d+) total, (?P<connections_rejected>\d+) rejected \| "
    r"in (?P<messages_in>\d+) msg \([^)]*\), (?P<bytes_in>\d+) B \| "
    r"out (?P<messages_out>\d+) deliveries \([^)]*\), (?P<bytes_out>\d+) B \| "
    r"filtered (?P<messages_filtered>\d+), invalid (?P<messages_invalid>\d+), "
    r"protocol errors (?P<protocol_errors>\d+) \| dropped (?P<messages_dropped>\d+), "
    r"slow disconnects (?P<slow_disconnects>\d+), "
    r"backpressure pauses (?P<backpressure_pauses>\d+)")


def parse_stats(line: str) -> dict[str, int] | None:
    """The counters of a relay's (final) stats log line, None for any other line."""
    match = STATS_LINE.search(line)
    if match is None:
        return None
    return {k: int(v) for k, v in match.groupdict().items() if k != "final"}


class RelayProcess:
    """``python relay.py`` on a temp socket with its stderr in a file: its counters come
    from the stats line it logs on SIGUSR1, its memory, descriptors, CPU time and signal
    handlers from ``/proc/<pid>``."""

    def __init__(self, process: subprocess.Popen[str], path: str, log_path: str) -> None:
        self.process = process
        self.pid = process.pid
        self.path = path
        self.log_path = log_path

    # -- the log --------------------------------------------------------------------------

    def log(self) -> str:
        """Everything the relay has logged so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stats_lines(self, final: bool = False) -> list[dict[str, int]]:
        """The counters of every stats line logged so far (the final ones if ``final``)."""
        found = []
        for line in self.log().splitlines():
            match = STATS_LINE.search(line)
            if match and bool(match.group("final")) == final:
                found.append(parse_stats(line) or {})
        return found

    def stats(self) -> dict[str, int]:
        """SIGUSR1, then the counters of the stats line it makes the relay log."""
        self.assert_alive()
        before = len(self.stats_lines())
        os.kill(self.pid, signal.SIGUSR1)
        wait_until(lambda: len(self.stats_lines()) > before or not self.alive(),
                   "the stats line SIGUSR1 asks for")
        self.assert_alive()
        return self.stats_lines()[-1]

    def wait_stats(self, predicate: Callable[[dict[str, int]], bool], what: str,
                   timeout: float = TIMEOUT_S) -> dict[str, int]:
        """Ask for stats until ``predicate`` holds for them (fail naming ``what`` after
        ``timeout``); those stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last stats: {stats}")
            time.sleep(0.02)

    def wait_log(self, text: str) -> None:
        """Wait until ``text`` is in the log; fail if the relay exits first."""
        wait_until(lambda: text in self.log() or not self.alive(), f"{text!r} in the log")
        assert text in self.log(), f"the relay exited before logging {text!r}:\n{self.log()}"

    # -- /proc ----------------------------------------------------------------------------

    def _status(self, field: str) -> str:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return line.split(":", 1)[1].strip()
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

    def rss_bytes(self) -> int:
        """Its resident memory (VmRSS)."""
        value, unit = self._status("VmRSS").split()
        assert unit == "kB"
        return int(value) * 1024

    def fd_count(self) -> int:
        """How many file descriptors it has open."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_seconds(self) -> float:
        """Its user + system CPU time."""
        return cpu_ticks(self.pid) / CLOCK_TICKS_PER_S

    def state(self) -> str:
        """Its scheduler state letter ("T" when stopped by SIGSTOP)."""
        with open(f"/proc/{self.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    def catches(self, signum: int) -> bool:
        """Whether it has a handler installed for ``signum``."""
        return bool(int(self._status("SigCgt"), 16) & (1 << (signum - 1)))

    # -- life -----------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.process.poll() is None

    def assert_alive(self) -> None:
        assert self.alive(), (f"the relay exited with {self.process.returncode}; its log:\n"
                              f"{self.log()[-3000:]}")

    def wait_ready(self) -> None:
        """Serving: the socket answers, the signal handlers are in (serve_forever
        installed them), and the probe connection is gone."""
        try:
            wait_for_socket(self.path)
        except ConnectionError:
            raise AssertionError(f"the relay never listened; its log:\n{self.log()}") from None
        wait_until(lambda: all(self.catches(s) for s in SIGNAL_BITS) or not self.alive(),
                   "the relay to install its signal handlers")
        self.wait_stats(lambda s: s["connections_active"] == 0,
                        "the socket probe to be cleaned up")

    def assert_clean_exit(self, code: int | None) -> None:
        """Exit ``code`` 0, a final stats line, no traceback, the socket file removed."""
        log = self.log()
        assert code == 0, f"exit code {code}; log:\n{log[-3000:]}"
        assert "Traceback" not in log, log[-3000:]
        assert self.stats_lines(final=True), f"no final stats line; log:\n{log[-3000:]}"
        assert not os.path.exists(self.path), "the socket file was left behind"

    def terminate(self, timeout: float = TIMEOUT_S * 2) -> dict[str, int]:
        """SIGTERM; assert exit 0 and a final stats line; return the final stats."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        log = self.log()
        assert code == 0, f"exit code {code}; log:\n{log[-3000:]}"
        finals = self.stats_lines(final=True)
        assert finals, f"no final stats line; log:\n{log[-3000:]}"
        return finals[-1]


@pytest.fixture
def relay_process(cli: Cli, socket_dir: str) -> Iterator[Callable[..., RelayProcess]]:
    """``relay_process(*args, domain="market_data", socket_path=None, ready=True,
    **popen)`` starts ``python relay.py --domain D --socket P --stats-interval 0 ARGS``
    (stderr to a file; a later ``--stats-interval`` in ARGS wins) on a fresh socket in
    ``socket_dir`` or on ``socket_path``, and returns once it serves (unless not
    ``ready``). The ``cli`` fixture kills it at teardown if it still runs."""
    count = 0

    def start(*args: str, domain: str = "market_data", socket_path: str | None = None,
              ready: bool = True, **popen: Any) -> RelayProcess:
        nonlocal count
        count += 1
        path = socket_path or os.path.join(socket_dir, f"relay{count}.sock")
        log_path = os.path.join(socket_dir, f"relay{count}.log")
        with open(log_path, "w") as log_file:
            process = cli("--domain", domain, "--socket", path, "--stats-interval", "0",
                          *args, stderr=log_file, **popen)
        relay = RelayProcess(process, path, log_path)
        if ready:
            relay.wait_ready()
        return relay

    yield start


# ---------------------------------------------------------------------------------------
# A fake relay: a plain listening socket, to feed a client exact bytes
# ---------------------------------------------------------------------------------------


class FakeRelay:
    """A plain listening socket on ``path`` standing in for a relay, to feed a client
    exact bytes; ``close()`` closes it and every connection it accepted."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.settimeout(TIMEOUT_S)
        self.server.bind(path)
        self.server.listen(8)
        self.connections: list[socket.socket] = []

    def accept(self) -> socket.socket:
        """The next client's connection, with ``TIMEOUT_S`` (the client connected
        already: the backlog holds it)."""
        conn, _ = self.server.accept()
        conn.settimeout(TIMEOUT_S)
        self.connections.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.connections:
            conn.close()
        self.server.close()


@pytest.fixture
def fake_relay(socket_path: str) -> Iterator[FakeRelay]:
    """A ``FakeRelay`` listening on ``socket_path``, closed at teardown."""
    relay = FakeRelay(socket_path)
    try:
        yield relay
    finally:
        relay.close()


def wait_for_socket(path: str, timeout: float = TIMEOUT_S) -> None:
    """Wait until a relay answers on ``path``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            RelayClient(path, timeout=TIMEOUT_S).close()
            return
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
