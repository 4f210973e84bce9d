"""The engine of relay.py, room by room, and the six defects of issue #9.

Part B (first in this file) is behaviour over real Unix sockets and real processes: one
test (or a few) per defect of issue #9, each written to fail against the engine before
the fix (``git show 426d972:relay.py``) and to pass now, plus the subscribe flood. A
relay in another process is read through the stats line it logs on SIGUSR1 and through
``/proc/<pid>``.

Part A drives the engine's rooms in process, without sockets where the room allows:
``FrameScanner`` against a frame-by-frame reference model (a seeded fuzz of both walks),
``Outbound`` (a client's queue) with a fake socket, and ``Backpressure`` with stand-in
clients. Part A reaches those classes through ``relay.NAME`` at run time, so this file
still imports against an engine that does not have them (only its part B then runs).

Every socket has a timeout, every loop is bounded, and nothing measures speed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import math
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

import logic
import relay
from conftest import (
    HERE,
    PRICE,
    TIMEOUT_S,
    TS,
    Reader,
    RelayProcess,
    StartRelay,
    connect_raw,
    gap_of,
    leave_stale_socket,
    relay_command,
    sequence_of,
    source_of,
    split_frames,
    trade_message,
    wait_for_socket,
    wait_until,
)
from logic import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    SUBSCRIBE_ALL,
    SUBSCRIBE_NONE,
    SUBSCRIBE_TYPES,
    VERSION,
    Domain,
    ExecutionLogic,
    MarketDataLogic,
    build_message,
    order_request,
    subscribe_message,
)
from relay import Relay, RelayClient, RelayError

MiB = 1024 * 1024
PUBLISHER = 7  # source id of the publishers here; other sources are named where used
STUCK = 9  # source id of what a stuck (or departing) client publishes


# ---------------------------------------------------------------------------------------
# Frames and readers
# ---------------------------------------------------------------------------------------


def market_frame(seq: int, *, source: int = PUBLISHER, pad: int = 0) -> bytes:
    """A market-data Trade numbered ``seq`` (its price and side follow ``seq``); ``pad``
    bytes more in a second TLV."""
    return trade_message(seq, source=source, price=PRICE + seq, side=seq % 2, pad=pad)


def execution_frame(seq: int, *, source: int = PUBLISHER, pad: int = 0) -> bytes:
    """An execution OrderRequest numbered ``seq`` with its checksum (the domain requires
    one); ``pad`` adds that many bytes in standard TLVs of type 79 (at most 255 each)."""
    tlvs = [order_request(seq, 0x1234, PRICE, 100, seq % 2)]
    while pad > 0:
        length = min(pad, 257) - 2
        tlvs.append((79, bytes(length)))
        pad -= length + 2
    return build_message(Domain.EXECUTION, source, tlvs, sequence=seq, timestamp_ns=TS,
                         checksum=True)


def by_source(frames: Sequence[bytes]) -> dict[int, list[int]]:
    """The sequence numbers received from each source, in arrival order."""
    seen: dict[int, list[int]] = {}
    for frame in frames:
        seen.setdefault(source_of(frame), []).append(sequence_of(frame))
    return seen


class Sender(threading.Thread):
    """Sends ``data`` in one ``sendall`` from a thread (it may block while the relay
    pauses); ``finish()`` re-raises what went wrong."""

    def __init__(self, client: RelayClient, data: bytes) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.data = data
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            sock = self.client.sock
            assert sock is not None
            sock.settimeout(TIMEOUT_S * 3)  # it may wait while the relay pauses
            self.client.send(self.data)
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float = TIMEOUT_S * 3) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the publisher is still blocked"
        if self.error is not None:
            raise AssertionError(f"publisher failed: {self.error!r}") from self.error


# =======================================================================================
# Part B: the six defects of issue #9, as a user meets them
# =======================================================================================

# -- 1. A consumer that turns publish-only never holds a backpressure pause -------------


def test_a_consumer_that_turns_publish_only_with_data_queued_never_holds_a_pause(
        start_relay: StartRelay) -> None:
    """Issue #9, defect 1. ``stuck`` stops reading with hundreds of messages queued
    (over low water, under the limit), then switches to publish-only. When ``slow``
    later goes over the limit the relay pauses; once ``slow`` catches up the pause must
    end, and ``stuck`` (which now receives nothing) must never be cut off for stalling."""
    stall_s = 1.0
    running = start_relay(ExecutionLogic(), queue_limit=1000, stall_timeout=stall_s,
                          drain_timeout=0.1)  # low water: 250 messages
    healthy = running.client()
    running.wait_clients(1)
    stuck = running.client()
    running.wait_clients(2)
    slow = running.client()
    running.wait_clients(3)
    publisher = running.client(publish_only=True)
    running.wait_for(lambda: running.stats().messages_in == 1)  # its RELAY_SUBSCRIBE
    first, second, third = 800, 800, 200
    total = first + second + third
    frames = [execution_frame(seq, pad=750) for seq in range(1, total + 1)]  # 816 B each
    healthy_reader = Reader(healthy, total + 1)
    healthy_reader.start()

    # ~640 KB: the stuck and slow consumers' sockets hold ~200 KB, so ~550 messages
    # stay queued for each: over low water (250), under the limit (1000).
    publisher.send_many(frames[:first])
    running.wait_for(lambda: running.stats().messages_in == 1 + first)
    assert running.stats().backpressure_pauses == 0
    stuck.send(subscribe_message(SUBSCRIBE_NONE))
    running.wait_for(lambda: running.stats().messages_in == 2 + first)

    # slow goes over the limit: the relay pauses until slow is back under low water.
    sender = Sender(publisher, b"".join(frames[first:first + second]))
    sender.start()
    running.wait_for(lambda: running.stats().backpressure_pauses >= 1)
    paused_at = time.monotonic()
    slow_reader = Reader(slow, total)
    slow_reader.start()
    sender.finish()
    running.wait_for(lambda: slow_reader.received >= first + second)
    running.wait_for(lambda: not running.relay.paused)
    stats = running.stats()
    assert stats.slow_disconnects == 0, "the publish-only client was held to the pause"
    assert stats.connections_active == 4

    # Traffic flows on; past the stall timeout, stuck is still connected and can publish.
    publisher.send_many(frames[first + second:])
    running.wait_for(lambda: slow_reader.received == total)
    time.sleep(max(0.0, paused_at + 2 * stall_s - time.monotonic()))
    stuck.send(execution_frame(1, source=STUCK))
    received = healthy_reader.finish()
    assert by_source(received) == {PUBLISHER: list(range(1, total + 1)), STUCK: [1]}
    assert by_source(slow_reader.finish()) == {PUBLISHER: list(range(1, total + 1))}
    stats = running.stats()
    assert stats.slow_disconnects == 0
    assert stats.connections_active == 4
    assert not running.relay.paused
    # What it had queued before it turned publish-only may still reach it; nothing after.
    stuck_sequences = []
    with contextlib.suppress(TimeoutError):
        for _ in range(total):
            stuck_sequences.append(sequence_of(stuck.recv(timeout=0.3)))
    assert stuck_sequences == list(range(1, len(stuck_sequences) + 1))
    assert len(stuck_sequences) <= first
    for client in (healthy, stuck, slow, publisher):
        client.close()


# -- 2. Relays started at the same moment: exactly one serves ----------------------------

REFUSED = re.compile(r"another relay is already listening on (?P<path>.+) "
                     r"\(pid (?P<pid>\d+|unknown)\); stop it or pass --socket")


def _start_at_once(path: str, starters: int) -> tuple[list[Relay], list[str]]:
    """``starters`` threads construct ``Relay(...)`` on ``path``, released by one
    barrier: the relays that started, and what the refused ones were told."""
    barrier = threading.Barrier(starters)
    started: list[Relay] = []
    refused: list[str] = []
    unexpected: list[BaseException] = []

    def start() -> None:
        barrier.wait(TIMEOUT_S)
        try:
            started.append(Relay(MarketDataLogic(), socket_path=path, stats_interval=0))
        except RelayError as exc:
            refused.append(str(exc))
        except BaseException as exc:
            unexpected.append(exc)

    threads = [threading.Thread(target=start, daemon=True) for _ in range(starters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S * 2)
    if any(t.is_alive() for t in threads) or unexpected:
        for running in started:
            running.close()
        raise AssertionError(f"a start never returned or failed otherwise: {unexpected}")
    return started, refused


def test_relays_started_at_the_same_moment_on_a_stale_socket_leave_exactly_one_serving(
        socket_dir: str) -> None:
    """Issue #9, defect 2, in one process: eight ``Relay(...)`` constructions released by
    one barrier, twenty times over, each on a fresh stale socket."""
    starters = 8
    for round_ in range(20):
        path = os.path.join(socket_dir, f"race{round_}.sock")
        leave_stale_socket(path)
        started, refused = _start_at_once(path, starters)
        try:
            assert len(started) == 1, (f"round {round_}: {len(started)} relays serving; "
                                       f"the others said {refused}")
            assert len(refused) == starters - 1
            for why in refused:
                match = REFUSED.fullmatch(why)
                assert match and match["path"] == path, why
                assert match["pid"] in (str(os.getpid()), "unknown"), why
            listener = started[0].listener
            assert listener is not None
            with connect_raw(path):  # the socket file is the winner's
                conn, _ = listener.accept()
                conn.close()
        finally:
            for running in started:
                running.close()
        assert not os.path.exists(path), "the winner left its socket file"
        assert not os.path.exists(path + ".lock"), "the winner left its lock file"


_RACER = """\
import os, sys, time
sys.path.insert(0, sys.argv[1])
import relay
open(sys.argv[2], "w").close()  # imported: ready
deadline = time.monotonic() + 10
while not os.path.exists(sys.argv[3]) and time.monotonic() < deadline:
    time.sleep(0.0002)
sys.exit(relay.main(sys.argv[4:]))
"""


def test_a_relay_refused_while_the_winner_is_still_writing_its_pid_names_that_pid(
        socket_path: str) -> None:
    """The winner's state between taking the lock and writing its pid: PATH.lock is
    locked and still empty; the pid follows 0.1 s later. A relay refused meanwhile
    should still name it."""
    fd = os.open(socket_path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    timer = threading.Timer(0.1, os.write, (fd, f"{os.getpid()}\n".encode()))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        timer.start()
        with pytest.raises(RelayError) as refused:
            Relay(MarketDataLogic(), socket_path=socket_path, stats_interval=0)
        assert f"(pid {os.getpid()})" in str(refused.value)
    finally:
        timer.cancel()
        timer.join(TIMEOUT_S)
        os.close(fd)


def _race_processes(socket_dir: str, round_: int, starters: int) -> None:
    """One round: ``starters`` processes that have imported ``relay`` call
    ``relay.main(["--socket", P, ...])`` at one go, on a fresh stale socket."""
    path = os.path.join(socket_dir, f"race{round_}.sock")
    go = os.path.join(socket_dir, f"go{round_}")
    leave_stale_socket(path)
    logs = [os.path.join(socket_dir, f"race{round_}-{i}.log") for i in range(starters)]
    ready = [os.path.join(socket_dir, f"ready{round_}-{i}") for i in range(starters)]
    processes: list[subprocess.Popen[str]] = []
    try:
        for i in range(starters):
            with open(logs[i], "w") as log_file:
                processes.append(subprocess.Popen(
                    [sys.executable, "-c", _RACER, HERE, ready[i], go, "--socket", path,
                     "--stats-interval", "0"], stderr=log_file, text=True, cwd=HERE))
        wait_until(lambda: all(map(os.path.exists, ready)), "every process to import")
        open(go, "w").close()
        wait_until(lambda: sum(p.poll() is not None for p in processes) >= starters - 1,
                   f"round {round_}: all but one relay to give up")
        alive = [p for p in processes if p.poll() is None]
        assert len(alive) == 1, f"round {round_}: {len(alive)} relays serving"
        winner = alive[0]
        wait_for_socket(path)
        with connect_raw(path) as probe:  # the socket file is the winner's
            pid = struct.unpack("3i", probe.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        assert pid == winner.pid
        for process, log_path in zip(processes, logs, strict=True):
            if process is winner:
                continue
            assert process.returncode == 1
            with open(log_path) as f:
                err = f.read()
            match = REFUSED.search(err)
            assert match and match["path"] == path, err
            assert match["pid"] in (str(winner.pid), "unknown"), err
            assert "Traceback" not in err, err
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(TIMEOUT_S) == 0
        assert not os.path.exists(path)
        assert not os.path.exists(path + ".lock")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(TIMEOUT_S)


@pytest.mark.slow
def test_relay_processes_started_at_the_same_moment_leave_exactly_one_serving(
        socket_dir: str) -> None:
    """Issue #9, defect 2, as processes: six processes that have all imported ``relay``
    and wait for one go, three times over."""
    for round_ in range(3):
        _race_processes(socket_dir, round_, starters=6)


def test_after_a_relay_stops_cleanly_a_new_one_starts_on_the_path_and_no_lock_is_left(
        start_relay: StartRelay, socket_path: str) -> None:
    first = start_relay()
    first.stop()
    assert not os.path.exists(socket_path)
    assert not os.path.exists(socket_path + ".lock"), "the lock file was left behind"
    second = start_relay()
    with second.client() as consumer, second.client() as producer:
        second.wait_clients(2)
        producer.send(market_frame(1))
        assert consumer.recv() == market_frame(1)


def test_what_a_killed_relay_left_behind_does_not_block_a_new_start(
        relay_process: Callable[..., RelayProcess], start_relay: StartRelay) -> None:
    killed = relay_process("--stats-interval", "0")
    killed.process.send_signal(signal.SIGKILL)
    assert killed.process.wait(TIMEOUT_S) == -signal.SIGKILL
    assert os.path.exists(killed.path), "a killed relay leaves its socket file"
    running = start_relay(socket_path=killed.path)
    with running.client() as consumer, running.client() as producer:
        running.wait_clients(2)
        producer.send(market_frame(1))
        assert consumer.recv() == market_frame(1)
    running.stop()
    assert not os.path.exists(killed.path)
    assert not os.path.exists(killed.path + ".lock")


# -- 3. Any number of stop signals ends in a clean exit ----------------------------------


def _queue_data_for_a_consumer_that_does_not_read(running: RelayProcess) -> socket.socket:
    """Connect a consumer that never reads and publish ~2 MB past it: most of it stays
    queued in the relay. Returns the consumer (close it when done)."""
    stuck = connect_raw(running.path)
    with RelayClient(running.path, publish_only=True, timeout=TIMEOUT_S) as publisher:
        running.wait_stats(lambda s: s["connections_active"] == 2 and s["messages_in"] == 1,
                           "the two clients")
        payload = b"".join(market_frame(seq, pad=900) for seq in range(1, 2001))
        publisher.send(payload)
        expected = len(payload) + len(subscribe_message(SUBSCRIBE_NONE))
        running.wait_stats(lambda s: s["bytes_in"] == expected, "the relay to read it all")
    return stuck


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_second_stop_signal_during_the_drain_ends_it_at_once_and_the_exit_is_clean(
        relay_process: Callable[..., RelayProcess], second: signal.Signals) -> None:
    """Issue #9, defect 3: SIGTERM starts a drain towards a consumer that does not read
    (``--drain-timeout 60``); a second stop signal ends it: exit 0, final stats, the
    socket file removed, no traceback."""
    running = relay_process("--drain-timeout", "60", "--stats-interval", "0")
    stuck = _queue_data_for_a_consumer_that_does_not_read(running)
    with stuck:
        running.process.send_signal(signal.SIGTERM)
        running.wait_log("received: draining")
        running.process.send_signal(second)
        code = running.process.wait(TIMEOUT_S)
    running.assert_clean_exit(code)


@pytest.mark.parametrize("storm", [(signal.SIGTERM,), (signal.SIGINT,),
                                   (signal.SIGTERM, signal.SIGINT)],
                         ids=["sigterm", "sigint", "both"])
def test_a_storm_of_stop_signals_until_the_relay_is_gone_still_ends_in_exit_0(
        relay_process: Callable[..., RelayProcess], storm: tuple[signal.Signals, ...]) -> None:
    """Issue #9, defect 3, "any number of stop signals": SIGTERM starts a drain towards
    a consumer that does not read; then stop signals keep coming, every 0.5 ms, through
    the drain, the release of the socket, the final stats and the exit."""
    running = relay_process("--drain-timeout", "5", "--stats-interval", "0")
    stuck = _queue_data_for_a_consumer_that_does_not_read(running)
    with stuck:
        running.process.send_signal(signal.SIGTERM)
        running.wait_log("received: draining")
        deadline = time.monotonic() + TIMEOUT_S * 2
        sent = 0
        while running.process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(running.pid, storm[sent % len(storm)])
            sent += 1
            time.sleep(0.0005)
        code = running.process.wait(TIMEOUT_S)
    assert sent > 1
    running.assert_clean_exit(code)


# -- 4. Durations of years, and inf, mean "never" ----------------------------------------

DURATIONS = {
    "stall-1e9": ("--stall-timeout", "1e9", "--stats-interval", "0"),
    "stall-inf": ("--stall-timeout", "inf", "--stats-interval", "0"),
    "stats-3e6": ("--stats-interval", "3e6"),
    "drain-inf": ("--drain-timeout", "inf", "--stats-interval", "0"),
    "all": ("--stall-timeout", "1e9", "--stats-interval", "3e6", "--drain-timeout", "inf"),
}


@pytest.mark.parametrize("options", DURATIONS.values(), ids=DURATIONS.keys())
def test_durations_beyond_24_days_and_inf_never_crash_a_relay_that_pauses_and_resumes(
        relay_process: Callable[..., RelayProcess], options: tuple[str, ...]) -> None:
    """Issue #9, defect 4: an execution relay (backpressure) with such a duration serves,
    pauses for a consumer that stopped reading, resumes once it reads again, and stops
    at once on SIGTERM (nothing is left to drain)."""
    running = relay_process("--queue-limit", "4", *options, domain="execution")
    total = 10_000
    frames = b"".join(execution_frame(seq) for seq in range(1, total + 1))  # ~660 KB
    with RelayClient(running.path, timeout=TIMEOUT_S) as healthy, \
            RelayClient(running.path, timeout=TIMEOUT_S) as stuck, \
            RelayClient(running.path, publish_only=True, timeout=TIMEOUT_S) as publisher:
        running.wait_stats(lambda s: s["connections_active"] == 3 and s["messages_in"] == 1,
                           "three clients")
        healthy_reader = Reader(healthy, total)
        healthy_reader.start()
        sender = Sender(publisher, frames)
        sender.start()
        running.wait_stats(lambda s: s["backpressure_pauses"] >= 1, "a pause")
        stuck_reader = Reader(stuck, total)
        stuck_reader.start()
        sender.finish()
        assert [sequence_of(f) for f in healthy_reader.finish()] == list(range(1, total + 1))
        assert [sequence_of(f) for f in stuck_reader.finish()] == list(range(1, total + 1))
        running.assert_alive()
        stats = running.stats()
        assert stats["slow_disconnects"] == 0
        started = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        code = running.process.wait(TIMEOUT_S)
    running.assert_clean_exit(code)
    assert time.monotonic() - started < TIMEOUT_S


def test_drain_timeout_inf_delivers_everything_queued_and_then_exits_0(
        relay_process: Callable[..., RelayProcess]) -> None:
    running = relay_process("--drain-timeout", "inf", "--queue-limit", "1000000",
                            "--stats-interval", "0")
    total = 20_000
    payload = b"".join(market_frame(seq) for seq in range(1, total + 1))
    with RelayClient(running.path, timeout=TIMEOUT_S) as consumer, \
            RelayClient(running.path, publish_only=True, timeout=TIMEOUT_S) as publisher:
        running.wait_stats(lambda s: s["connections_active"] == 2 and s["messages_in"] == 1,
                           "two clients")
        publisher.send(payload)
        expected = len(payload) + len(subscribe_message(SUBSCRIBE_NONE))
        stats = running.wait_stats(lambda s: s["bytes_in"] == expected, "everything read")
        assert stats["messages_out"] < total, "some of it should still be queued"
        running.process.send_signal(signal.SIGTERM)
        sequences = [sequence_of(consumer.recv()) for _ in range(total)]
        assert sequences == list(range(1, total + 1))
        with pytest.raises(EOFError):
            consumer.recv()
        code = running.process.wait(TIMEOUT_S)
    running.assert_clean_exit(code)


@pytest.mark.parametrize("option", ["--stall-timeout", "--drain-timeout", "--stats-interval"])
def test_a_nan_duration_is_refused_at_parse_time_with_exit_2(option: str,
                                                             socket_path: str) -> None:
    result = subprocess.run(relay_command("--socket", socket_path, option, "nan"),
                            capture_output=True, text=True, timeout=TIMEOUT_S * 2, cwd=HERE)
    assert result.returncode == 2, result.stderr
    assert option in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(socket_path)


def test_the_relay_api_takes_inf_durations_and_refuses_nan(socket_path: str) -> None:
    with pytest.raises(ValueError, match="stall_timeout"):
        Relay(MarketDataLogic(), socket_path=socket_path, stall_timeout=math.nan)
    assert not os.path.exists(socket_path)
    running = Relay(MarketDataLogic(), socket_path=socket_path, stall_timeout=math.inf,
                    drain_timeout=math.inf, stats_interval=math.inf)
    running.close()
    assert not os.path.exists(socket_path)


# -- 5. Memory follows the bytes received, not what a header announces -------------------


def test_headers_announcing_1_mib_frames_do_not_make_the_relay_allocate_them(
        relay_process: Callable[..., RelayProcess]) -> None:
    """Issue #9, defect 5: 200 clients each send one header announcing a 1 MiB frame and
    stall. The relay's RSS grows by far less than 200 MiB, it still serves, and a real
    1 MiB frame sent in pieces still arrives whole."""
    max_size = 1 << 20
    running = relay_process("--max-message-size", str(max_size), "--stats-interval", "0")
    header = HEADER.pack(MAGIC, Domain.MARKET_DATA, VERSION, PUBLISHER, 0, 1, TS,
                         max_size - HEADER_SIZE, 0)
    with RelayClient(running.path, timeout=TIMEOUT_S) as consumer, \
            RelayClient(running.path, timeout=TIMEOUT_S) as producer:
        running.wait_stats(lambda s: s["connections_active"] == 2, "two clients")
        producer.send(market_frame(1))
        assert consumer.recv() == market_frame(1)
        before = running.stats()
        rss_before = running.rss_bytes()
        stallers: list[socket.socket] = []
        try:
            for _ in range(200):
                sock = connect_raw(running.path)
                stallers.append(sock)
                sock.sendall(header)
            running.wait_stats(lambda s: s["bytes_in"] >= before["bytes_in"] + 200 * HEADER_SIZE
                               and s["connections_active"] == 202, "every header read")
            grown = running.rss_bytes() - rss_before
            assert grown < 40 * MiB, f"RSS grew by {grown / MiB:.1f} MiB for 6.4 KB of headers"
            producer.send(market_frame(2))  # still serving
            assert consumer.recv() == market_frame(2)
        finally:
            for sock in stallers:
                sock.close()
        running.wait_stats(lambda s: s["connections_active"] == 2, "the stallers to leave")
        grown = running.rss_bytes() - rss_before
        assert grown < 40 * MiB, f"RSS is still {grown / MiB:.1f} MiB up after they left"

        payload = random.Random(5).randbytes(max_size - HEADER_SIZE)
        big = HEADER.pack(MAGIC, Domain.MARKET_DATA, VERSION, PUBLISHER, 0, 3, TS,
                          len(payload), 0) + payload
        for at in range(0, len(big), 100_000):
            producer.send(big[at:at + 100_000])
        assert consumer.recv(timeout=TIMEOUT_S) == big
        stats = running.stats()
        assert stats["protocol_errors"] == 0
    running.process.send_signal(signal.SIGTERM)
    running.assert_clean_exit(running.process.wait(TIMEOUT_S))


# -- 6. A client whose write failed is never subscribed again ----------------------------

CLIENT_LINE = re.compile(r"client (\d+)\b")


def test_a_client_whose_write_failed_is_never_resubscribed_by_its_own_pending_subscribe(
        start_relay: StartRelay, caplog: pytest.LogCaptureFixture) -> None:
    """Issue #9, defect 6. ``leaver`` stops reading until the relay pauses (execution
    domain: backpressure), so the relay reads from nobody; it then sends data frames and
    a RELAY_SUBSCRIBE (mode 0) and closes with data unread, so the relay's next write to
    it fails *before* it reads what ``leaver`` sent. That subscribe must not bring it
    back, and the other consumers get everything, in order."""
    caplog.set_level(logging.DEBUG, logger="relay")
    running = start_relay(ExecutionLogic(), queue_limit=4, stall_timeout=TIMEOUT_S * 2,
                          drain_timeout=0.1)
    consumers = []
    for n in (1, 2):
        consumers.append(running.client())
        running.wait_clients(n)
    leaver = connect_raw(running.path)
    running.wait_clients(3)  # client 3
    publisher = running.client(publish_only=True)
    running.wait_for(lambda: running.stats().messages_in == 1)
    total, own = 20_000, 5
    readers = [Reader(c, total + own) for c in consumers]
    for reader in readers:
        reader.start()
    sender = Sender(publisher, b"".join(execution_frame(seq) for seq in range(1, total + 1)))
    sender.start()
    # Paused, with both consumers holding everything the relay read: leaver holds it.
    running.wait_for(lambda: running.relay.paused and all(
        r.received == running.stats().messages_in - 1 for r in readers))
    leaver.sendall(b"".join(execution_frame(seq, source=STUCK) for seq in range(1, own + 1))
                   + subscribe_message(SUBSCRIBE_ALL))
    leaver.close()
    sender.finish()
    for reader in readers:
        assert by_source(reader.finish()) == {PUBLISHER: list(range(1, total + 1)),
                                              STUCK: list(range(1, own + 1))}
    running.wait_for(lambda: running.stats().connections_active == 3)

    lines = [r.getMessage() for r in caplog.records if r.name == "relay"]
    mine = [line for line in lines if (m := CLIENT_LINE.match(line)) and m[1] == "3"]
    failed = [i for i, line in enumerate(mine) if "write failed" in line]
    assert failed, f"the relay never failed a write to client 3: {mine}"
    after = [line for line in mine[failed[0]:] if "subscribed" in line]
    assert not after, f"client 3 was subscribed again after its write failed: {after}"
    for client in (*consumers, publisher):
        client.close()


def test_a_subscribe_read_after_a_failed_write_leaves_the_client_in_no_fan_out_list(
        socket_path: str) -> None:
    """Issue #9, defect 6, the mechanism in process: a Relay that never serves, one
    accepted client, its write failing, then RELAY_SUBSCRIBEs of every kind from it."""
    engine = Relay(MarketDataLogic(), socket_path=socket_path, stats_interval=0)
    sock = connect_raw(socket_path)
    try:
        engine._accept_ready()
        (client,) = engine.clients.values()
        assert client in engine.receivers
        engine._write_failed(client, BrokenPipeError(errno.EPIPE, "Broken pipe"))
        for frame in (subscribe_message(SUBSCRIBE_ALL),
                      subscribe_message(SUBSCRIBE_TYPES, [1, 2], gap_notices=True),
                      subscribe_message(SUBSCRIBE_ALL, bridge=True)):
            engine._control(client, frame, 0)
            for name in ("receivers", "local_receivers", "selective", "local_selective"):
                assert client not in getattr(engine, name), f"subscribed again into {name}"
    finally:
        sock.close()
        engine.close()


# -- The subscribe flood ------------------------------------------------------------------


def test_a_flood_of_identical_subscribes_leaves_the_fan_out_lists_alone(
        start_relay: StartRelay) -> None:
    """1000 identical RELAY_SUBSCRIBEs from one client, with 100 others connected: the
    receiver list is never rebuilt (the same list object), and everyone gets the data."""
    running = start_relay()
    others = [running.client() for _ in range(100)]
    flooder = running.client()
    publisher = running.client(publish_only=True)
    running.wait_for(lambda: len(running.relay.receivers) == 101
                     and running.stats().messages_in == 1)
    receivers = running.relay.receivers
    flooder.send(subscribe_message(SUBSCRIBE_ALL) * 1000)
    running.wait_for(lambda: running.stats().messages_in == 1001)
    assert running.relay.receivers is receivers, "the receiver list was rebuilt"
    frames = [market_frame(seq) for seq in range(1, 11)]
    publisher.send_many(frames)
    for client in (*others, flooder):
        assert [client.recv() for _ in frames] == frames
    stats = running.stats()
    assert stats.messages_invalid == 0
    assert stats.connections_active == 102
    for client in (*others, flooder, publisher):
        client.close()


# =======================================================================================
# Part A: the engine's rooms, in process
# =======================================================================================

# -- FrameScanner against a frame-by-frame reference model --------------------------------

CONTROL_TYPES = range(113, 120)  # the relay's own TLV types: a domain-4 frame led by one


class EvenOrSignalLogic(logic.BaseLogic):
    """A user's domain with its own filter: even sequences of any domain, and every
    signal-domain frame; checksums verified when present."""

    name = "even_or_signal"
    domain = Domain.MARKET_DATA
    checksum = "verify"
    tlv_types = None
    max_message_size = 65536

    def should_forward(self, header: logic.Header) -> bool:
        return header.sequence % 2 == 0 or header.relay_domain == Domain.SIGNAL


class ChecksummedLogic(logic.BaseLogic):
    """The default filter with a required checksum and no TLV parsing."""

    name = "checksummed"
    domain = Domain.SIGNAL
    checksum = "require"
    tlv_types = None
    max_message_size = 8192


# name: (logic, max_message_size, fast walk expected)
SCANNER_CONFIGS: dict[str, tuple[Callable[[], logic.RelayLogic], int, bool]] = {
    "market_data": (MarketDataLogic, 65536, True),
    "market_data_1mib": (MarketDataLogic, 1 << 20, True),
    "market_data_small_max": (MarketDataLogic, 4096, False),
    "signal": (logic.SignalLogic, 32768, False),
    "execution": (ExecutionLogic, 16384, False),
    "custom_filter": (EvenOrSignalLogic, 65536, False),
    "checksum_only": (ChecksummedLogic, 8192, False),
}


class Model:
    """What the scanner must do with one buffer, walked one frame at a time."""

    def __init__(self) -> None:
        self.runs: list[list[bytes]] = []  # maximal runs of consecutive accepted frames
        self.controls: list[tuple[bytes, int]] = []
        self.refused: list[tuple[int, bool]] = []
        self.frames_read = 0
        self.result = 0

    def forwarded(self) -> bytes:
        return b"".join(b"".join(run) for run in self.runs)


def model_scan(stream: bytes, logic_: logic.RelayLogic, max_size: int) -> Model:
    """SPEC.md's rules, frame by frame: a framing error (bad magic, version != 1, or
    32 + payload_size over ``max_size``) ends the walk; a control frame is never
    forwarded; then the checksum policy, the TLV policy and the filter."""
    model = Model()
    default_filter = logic.uses_default_filter(logic_)
    tlv_types = logic_.tlv_types
    run_open = False
    pos = 0
    while pos + HEADER_SIZE <= len(stream):
        fields = HEADER.unpack_from(stream, pos)
        size = HEADER_SIZE + fields[7]
        if fields[0] != MAGIC or fields[2] != VERSION or size > max_size:
            model.frames_read += 1
            model.result = ~pos
            return model
        if pos + size > len(stream):
            break
        frame = stream[pos:pos + size]
        model.frames_read += 1
        accepted = False
        if fields[1] == Domain.SYSTEM and logic.first_tlv_type(frame) in CONTROL_TYPES:
            model.controls.append((frame, pos))
        elif not logic.checksum_ok(frame, logic_.checksum):
            model.refused.append((pos, True))
        elif tlv_types is not None and not logic.tlvs_ok(frame, tlv_types):
            model.refused.append((pos, True))
        elif (fields[1] == logic_.domain if default_filter
              else logic_.should_forward(logic.Header(*fields))):
            accepted = True
        else:
            model.refused.append((pos, False))
        if accepted:
            if not run_open:
                model.runs.append([])
            model.runs[-1].append(frame)
        run_open = accepted
        pos += size
    model.result = pos
    return model


def frames_in(chunk: bytes) -> int:
    """How many whole frames ``chunk`` holds; it must hold nothing else."""
    count = pos = 0
    while pos < len(chunk):
        pos += HEADER_SIZE + HEADER.unpack_from(chunk, pos)[7]
        count += 1
    assert pos == len(chunk), "a forwarded chunk ends inside a frame"
    return count


def fill_tlvs(tlv_type: int, size: int, rng: random.Random) -> list[tuple[int, bytes]]:
    """TLVs of ``tlv_type`` filling exactly ``size`` payload bytes (``size`` >= 2)."""
    tlvs = []
    while size:
        if size <= 257:
            length = size - 2
            size = 0
        elif size <= 514:
            length = size // 2 - 2
            size -= length + 2
        else:
            length = min(logic.MAX_TLV_VALUE_SIZE, size - 5)
            if 0 < size - 5 - length < 2:
                length -= 2
            size -= length + 5
        tlvs.append((tlv_type, rng.randbytes(length)))
    return tlvs


class StreamMaker:
    """Seeded random buffers for one scanner configuration: runs of same-size frames
    (the column-checked path, 16 frames and more), mixed sizes, other domains, bad
    checksums and TLVs, control frames, framing errors, a corrupt byte, a cut end."""

    def __init__(self, rng: random.Random, logic_: logic.RelayLogic, max_size: int,
                 limit: int) -> None:
        self.rng = rng
        self.logic = logic_
        self.domain = int(logic_.domain)
        self.max_size = max_size
        self.limit = limit  # longest buffer (the fast walk needs it <= max_message_size)
        types = logic_.tlv_types
        self.good_types = list(types) if types is not None else [1, 2, 18]
        self.bad_types = [t for t in (0, 5, 19, 40, 80, 100, 200, 254)
                          if types is None or t not in types]
        self.checksum = logic_.checksum
        self.sequence = 0

    def frame(self, domain: int, tlvs: list[tuple[int, bytes]], *, checksum: bool) -> bytes:
        self.sequence += 1
        return build_message(domain, self.rng.randrange(1, 255), tlvs, sequence=self.sequence,
                             timestamp_ns=TS, checksum=checksum)

    def checksum_wanted(self) -> bool:
        return self.rng.random() < (0.9 if self.checksum == "require" else 0.7)

    def data_tlvs(self, size: int) -> list[tuple[int, bytes]]:
        return fill_tlvs(self.rng.choice(self.good_types), size, self.rng)

    def spoil(self, frame: bytes) -> bytes:
        """Sometimes a wrong checksum, a TLV type outside the domain's range, or a TLV
        length that no longer fills the payload (the checksum made again after)."""
        roll = self.rng.random()
        if roll < 0.03:
            return frame[:28] + b"\x01\x02\x03\x04" + frame[32:]
        if roll < 0.07 and len(frame) > HEADER_SIZE + 1 and frame[HEADER_SIZE] != 255:
            spoilt = bytearray(frame)
            if roll < 0.05:
                spoilt[HEADER_SIZE] = self.rng.choice(self.bad_types)
            else:
                spoilt[HEADER_SIZE + 1] = (spoilt[HEADER_SIZE + 1] - 1) % 256
            if HEADER.unpack_from(frame)[8]:
                spoilt[28:32] = struct.pack("<I", logic.compute_checksum(spoilt))
            return bytes(spoilt)
        return frame

    def run(self) -> list[bytes]:
        """Same-size frames of the domain with one standard TLV each."""
        count = self.rng.choice((2, 15, 16, 17, 24, 40, 120))
        length = self.rng.choice((0, 1, 8, 30, 32, 100, 255))
        tlv_type = self.rng.choice(self.good_types)
        checksum = self.checksum_wanted()
        return [self.spoil(self.frame(self.domain, [(tlv_type, self.rng.randbytes(length))],
                                      checksum=checksum)) for _ in range(count)]

    def mixed(self) -> list[bytes]:
        frames = []
        for _ in range(self.rng.randrange(1, 25)):
            size = self.rng.choice((2, 10, 40, 200, 257, 258, 300, 600, 1500, 5000))
            size = min(size, self.max_size - HEADER_SIZE)
            frames.append(self.spoil(self.frame(self.domain, self.data_tlvs(size),
                                                checksum=self.checksum_wanted())))
        return frames

    def foreign(self) -> list[bytes]:
        frames = []
        for _ in range(self.rng.randrange(1, 6)):
            domain = self.rng.choice([d for d in (0, 1, 2, 3, 4, 9) if d != self.domain])
            tlv_type = logic.TLV_HEARTBEAT if domain == Domain.SYSTEM else self.rng.choice(
                self.good_types)
            frames.append(self.frame(domain, [(tlv_type, bytes(16))],
                                     checksum=self.checksum_wanted()))
        return frames

    def control(self) -> list[bytes]:
        rng = self.rng
        choice = rng.randrange(6)
        if choice == 0:
            return [subscribe_message(rng.choice((0, 1, 2)), [1, 2], rng.random() < 0.5)]
        if choice == 1:
            return [logic.query_message(rng.choice((1, 2)))]
        if choice == 2:
            return [logic.gap_message(3, 7, source=rng.randrange(256))]
        if choice == 3:  # a RELAY_SUBSCRIBE in an extended TLV
            return [self.frame(Domain.SYSTEM, [(logic.RELAY_SUBSCRIBE, bytes(300))],
                               checksum=False)]
        if choice == 4:  # control frames skip the checksum policy: a wrong one
            frame = subscribe_message(0)
            return [frame[:28] + b"\x09\x09\x09\x09" + frame[32:]]
        return [self.frame(Domain.SYSTEM, [(rng.choice(CONTROL_TYPES), b"")], checksum=False)]

    def malformed_tlvs(self) -> list[bytes]:
        """Frames of the domain whose payload is not exactly filled by TLVs."""
        tlv_type = self.rng.choice(self.good_types)
        payloads = [bytes((tlv_type, 10)) + bytes(5), bytes((tlv_type,)),
                    bytes((255, 1, tlv_type, 4, 0)), bytes((tlv_type, 2, 0, 0, tlv_type))]
        frames = []
        for payload in self.rng.sample(payloads, 2):
            self.sequence += 1
            frame = HEADER.pack(MAGIC, self.domain, VERSION, 1, 0, self.sequence, TS,
                                len(payload), 0) + payload
            if self.checksum != "off":
                frame = frame[:28] + struct.pack("<I", logic.compute_checksum(frame)) + frame[32:]
            frames.append(frame)
        return frames

    def at_the_limit(self) -> list[bytes]:
        """A frame of exactly max_message_size, of this domain or another, or one of a
        byte more (a framing error as soon as its header is in)."""
        rng = self.rng
        if rng.random() < 0.4:
            header = HEADER.pack(MAGIC, self.domain, VERSION, 1, 0, 1, TS,
                                 self.max_size - HEADER_SIZE + 1, 0)
            return [header + bytes(64)]
        domain = self.domain if rng.random() < 0.6 else rng.choice(
            [d for d in (1, 2, 3) if d != self.domain])
        return [self.frame(domain, self.data_tlvs(self.max_size - HEADER_SIZE),
                           checksum=self.checksum_wanted())]

    def framing_error(self) -> list[bytes]:
        rng = self.rng
        kind = rng.randrange(3)
        magic, version, payload_size = MAGIC, VERSION, 16
        if kind == 0:
            magic = rng.choice((0, 0xDEADBEEE, 0xEFBEADDE))
        elif kind == 1:
            version = rng.choice((0, 2, 255))
        else:  # a header announcing more than max_message_size (the rest never comes)
            payload_size = self.max_size - HEADER_SIZE + rng.choice((1, 2, 1000, 1 << 20))
        header = HEADER.pack(magic, self.domain, version, 1, 0, 1, TS, payload_size, 0)
        return [header + bytes(16)]

    def stream(self) -> bytes:
        rng = self.rng
        frames: list[bytes] = []
        makers: list[tuple[float, Callable[[], list[bytes]]]] = [
            (0.35, self.run), (0.55, self.mixed), (0.65, self.foreign), (0.77, self.control),
            (0.84, self.malformed_tlvs), (0.87, self.framing_error), (1.0, self.run)]
        if self.max_size <= 65536 and rng.random() < 0.05:
            frames += self.at_the_limit()  # first: it may fill the whole buffer
        for _ in range(rng.randrange(1, 7)):
            roll = rng.random()
            for bound, make in makers:
                if roll < bound:
                    frames += make()
                    break
        stream = bytearray(b"".join(frames)[:self.limit])
        if stream and rng.random() < 0.25:
            stream[rng.randrange(len(stream))] ^= 1 << rng.randrange(8)
        if stream and rng.random() < 0.3:
            del stream[rng.randrange(len(stream)):]
        return bytes(stream)


class ScanRecorder:
    """The scanner's three callbacks, recording what they are given."""

    def __init__(self, sender: object) -> None:
        self.sender = sender
        self.forwarded: list[tuple[bytes, int]] = []
        self.controls: list[tuple[bytes, int]] = []
        self.refused: list[tuple[int, bool]] = []

    def forward(self, sender: Any, chunk: bytes, count: int) -> None:
        assert sender is self.sender
        assert type(chunk) is bytes
        self.forwarded.append((chunk, count))

    def control(self, sender: Any, frame: bytes, pos: int) -> None:
        assert sender is self.sender
        self.controls.append((bytes(frame), pos))

    def refuse(self, sender: Any, why: str, pos: int, invalid: bool) -> None:
        assert sender is self.sender
        assert why
        self.refused.append((pos, invalid))

    def scanner(self, logic_: logic.RelayLogic, max_size: int) -> Any:
        return relay.FrameScanner(logic_, max_size, forward=self.forward,
                                  control=self.control, refuse=self.refuse)


@pytest.mark.parametrize("config", SCANNER_CONFIGS, ids=SCANNER_CONFIGS.keys())
def test_scanner_does_what_the_frame_by_frame_model_says_for_every_random_buffer(
        config: str) -> None:
    factory, max_size, fast = SCANNER_CONFIGS[config]
    logic_ = factory()
    rng = random.Random(20261201)
    limit = max_size if fast else 80_000  # the fast walk's buffer never outgrows the max
    maker = StreamMaker(rng, logic_, max_size, limit)
    sender = object()
    column_runs = 0
    for case in range(600):
        stream = maker.stream()
        model = model_scan(stream, logic_, max_size)
        recorder = ScanRecorder(sender)
        scanner = recorder.scanner(logic_, max_size)
        assert scanner.fast is fast
        # The buffer holds more than ``end`` bytes, as a read buffer does.
        room = rng.randrange(0, max(1, min(64, limit - len(stream))))
        buffer = bytearray(stream + rng.randbytes(room))
        result = scanner.scan(sender, buffer, len(stream))
        where = f"case {case}: {len(stream)} bytes"
        assert result == model.result, where
        assert recorder.forwarded == [(b"".join(run), len(run)) for run in model.runs], where
        for chunk, count in recorder.forwarded:
            assert frames_in(chunk) == count, where
        assert recorder.controls == model.controls, where
        assert recorder.refused == model.refused, where
        assert scanner.messages_in == model.frames_read, where
        column_runs += any(len(run) >= 16 for run in model.runs)
    if logic.uses_default_filter(logic_):  # (a custom filter is asked frame by frame)
        assert column_runs > 30, "too few long runs of same-size frames were tried"


@pytest.mark.parametrize("config", ["market_data", "signal", "custom_filter"])
def test_scanner_fed_in_pieces_forwards_what_the_model_says_of_the_whole_stream(
        config: str) -> None:
    """The relay's use of ``scan``: keep the incomplete rest, append the next read,
    scan again. Whatever the cuts, the frames forwarded are those of the whole stream."""
    factory, max_size, fast = SCANNER_CONFIGS[config]
    logic_ = factory()
    rng = random.Random(20261202)
    maker = StreamMaker(rng, logic_, max_size, 60_000)
    sender = object()
    for case in range(150):
        stream = maker.stream()
        model = model_scan(stream, logic_, max_size)
        recorder = ScanRecorder(sender)
        scanner = recorder.scanner(logic_, max_size)
        rest = b""
        pos = 0
        result = 0
        while pos < len(stream):
            piece = rng.choice((1, 7, 31, 32, 33, 100, 1000, 20_000))
            piece = min(piece, max_size - len(rest)) if fast else piece
            buffer = bytearray(rest + stream[pos:pos + piece])
            pos += piece
            result = scanner.scan(sender, buffer, len(buffer))
            if result < 0:
                break
            rest = bytes(buffer[result:])
        where = f"case {case}"
        forwarded = b"".join(chunk for chunk, _ in recorder.forwarded)
        assert forwarded == model.forwarded(), where
        assert sum(n for _, n in recorder.forwarded) == sum(map(len, model.runs)), where
        assert [f for f, _ in recorder.controls] == [f for f, _ in model.controls], where
        assert len(recorder.refused) == len(model.refused), where
        assert scanner.messages_in == model.frames_read, where
        assert (result < 0) == (model.result < 0), where


def test_scanner_column_checked_run_stops_exactly_at_the_first_bad_frame() -> None:
    """A run of 40 same-size execution frames whose 23rd has a wrong checksum: 22
    forwarded as one chunk, the 23rd refused as invalid, the 17 after as one chunk."""
    frames = [execution_frame(seq) for seq in range(1, 41)]
    frames[22] = frames[22][:28] + b"\x01\x02\x03\x04" + frames[22][32:]
    stream = b"".join(frames)
    recorder = ScanRecorder(None)
    scanner = recorder.scanner(ExecutionLogic(), 16384)
    assert scanner.scan(None, bytearray(stream), len(stream)) == len(stream)
    assert recorder.forwarded == [(b"".join(frames[:22]), 22), (b"".join(frames[23:]), 17)]
    assert recorder.refused == [(22 * len(frames[0]), True)]
    assert scanner.messages_in == 40


def test_scanner_returns_where_an_incomplete_frame_starts_and_counts_only_whole_ones() -> None:
    frames = [market_frame(seq) for seq in range(1, 21)]
    stream = b"".join(frames)
    for cut in (len(stream) - 1, len(stream) - 40, len(stream) - 70):
        recorder = ScanRecorder(None)
        scanner = recorder.scanner(MarketDataLogic(), 65536)
        whole = cut // len(frames[0])
        assert scanner.scan(None, bytearray(stream), cut) == whole * len(frames[0])
        assert b"".join(c for c, _ in recorder.forwarded) == b"".join(frames[:whole])
        assert scanner.messages_in == whole


def test_scanner_reports_a_framing_error_after_forwarding_the_frames_before_it() -> None:
    frames = [market_frame(seq) for seq in range(1, 31)]
    bad = HEADER.pack(MAGIC, Domain.MARKET_DATA, 2, 1, 0, 1, TS, 0, 0)
    stream = b"".join(frames[:25]) + bad + b"".join(frames[25:])
    for logic_, max_size in ((MarketDataLogic(), 65536), (MarketDataLogic(), 4096)):
        recorder = ScanRecorder(None)
        scanner = recorder.scanner(logic_, max_size)
        at = 25 * len(frames[0])
        assert scanner.scan(None, bytearray(stream), len(stream)) == ~at
        assert recorder.forwarded == [(b"".join(frames[:25]), 25)]
        assert scanner.messages_in == 26


# -- Outbound: a client's queue, with a fake socket -----------------------------------------


class FakeSocket:
    """Stands in for a client's socket: takes up to ``budget`` bytes in all (None: all it
    is given), then would block; or raises ``error``."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self.error: OSError | None = None
        self.received = bytearray()
        self.calls: list[str] = []

    def send(self, data: bytes) -> int:
        self.calls.append("send")
        return self._take(bytes(data))

    def sendmsg(self, buffers: Sequence[bytes | memoryview]) -> int:
        self.calls.append("sendmsg")
        return self._take(b"".join(bytes(b) for b in buffers))

    def _take(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        taken = len(data) if self.budget is None else min(self.budget, len(data))
        if data and not taken:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        if self.budget is not None:
            self.budget -= taken
        self.received += data[:taken]
        return taken


def frames(first: int, count: int = 1) -> bytes:
    """``count`` consecutive 74-byte market frames from sequence ``first``."""
    return b"".join(market_frame(seq) for seq in range(first, first + count))


def notice(dropped: int, total: int) -> bytes:
    return logic.gap_message(dropped, total)


def queued(out: Any) -> list[tuple[int, int]]:
    """(messages, kind) of each pending entry; also checks the queue's counters."""
    pending = list(out.pending)
    assert out.unbuilt == sum(chunk is relay.GAP_PLACEHOLDER
                              for chunk, _, _ in [*pending, *(out.held or ())])
    assert out.messages == sum(count for _, count, _ in pending)
    assert out.bytes == sum(len(chunk) for chunk, _, _ in pending)
    return [(count, kind) for _, count, kind in pending]


def outbound(sock: FakeSocket, high_water: int = 100, high_water_bytes: int = 1 << 30) -> Any:
    return relay.Outbound(sock, high_water, high_water_bytes, notice)


def test_outbound_push_writes_at_once_when_nothing_waits_and_queues_nothing() -> None:
    sock = FakeSocket()
    out = outbound(sock)
    chunk = frames(1, 3)
    assert out.push((chunk, 3, 0)) == 0
    assert sock.received == chunk and sock.calls == ["send"]
    assert not out.pending and out.messages == 0 and out.bytes == 0
    assert (out.messages_out, out.bytes_out) == (3, len(chunk))


def test_outbound_partial_send_queues_the_entry_and_reports_waiting_once() -> None:
    sock = FakeSocket(budget=10)
    out = outbound(sock)
    first, second = frames(1, 2), frames(3)
    assert out.push((first, 2, 0)) == relay.WAITING
    assert out.sent == 10 and queued(out) == [(2, 0)]
    assert out.push((second, 1, 0)) == 0  # already waiting: queued, no write tried
    assert sock.calls == ["send"]
    assert queued(out) == [(2, 0), (1, 0)]
    assert (out.messages_out, out.bytes_out) == (0, 10)


def test_outbound_push_on_a_socket_that_would_block_queues_the_chunk_whole() -> None:
    sock = FakeSocket(budget=0)
    out = outbound(sock)
    assert out.push((frames(1), 1, 0)) == relay.WAITING
    assert out.sent == 0 and queued(out) == [(1, 0)]


def test_outbound_write_completes_partly_written_chunks_in_order() -> None:
    sock = FakeSocket(budget=30)
    out = outbound(sock)
    chunks = [frames(1, 2), frames(3), frames(4, 3)]
    assert out.push((chunks[0], 2, 0)) == relay.WAITING
    for chunk, count in ((chunks[1], 1), (chunks[2], 3)):
        assert out.push((chunk, count, 0)) == 0
    sock.budget = len(chunks[0]) - 30 + 50  # the rest of the first, 50 bytes of the second
    assert out.write() == 2
    assert out.sent == 50 and queued(out) == [(1, 0), (3, 0)]
    sock.budget = 0
    assert out.write() == 0  # would block: nothing changes
    assert out.sent == 50
    sock.budget = None
    assert out.write() == 4
    assert not out.pending and out.sent == 0
    assert bytes(sock.received) == b"".join(chunks)
    assert (out.messages_out, out.bytes_out) == (6, len(b"".join(chunks)))


def test_outbound_over_the_message_limit_is_over_only_after_a_write_was_tried() -> None:
    sock = FakeSocket(budget=0)
    out = outbound(sock, high_water=2)
    assert out.push((frames(1), 1, 0)) == relay.WAITING
    assert out.push((frames(2), 1, 0)) == 0
    calls = len(sock.calls)
    assert out.push((frames(3), 1, 0)) == relay.OVER  # 3 > 2, and the write blocked
    assert len(sock.calls) == calls + 1 and sock.calls[-1] == "sendmsg"
    assert out.over_high_water() and not out.under_low_water()


def test_outbound_a_write_that_drains_the_socket_keeps_it_under_the_limit() -> None:
    sock = FakeSocket(budget=0)
    out = outbound(sock, high_water=2)
    out.push((frames(1), 1, 0))
    out.push((frames(2), 1, 0))
    sock.budget = None  # the consumer caught up since the last writable event
    assert out.push((frames(3), 1, 0)) == 0
    assert not out.pending and out.messages_out == 3
    assert out.under_low_water()


def test_outbound_over_the_byte_limit_is_over_too() -> None:
    sock = FakeSocket(budget=0)
    out = outbound(sock, high_water=1000, high_water_bytes=200)
    assert out.push((frames(1, 2), 2, 0)) == relay.WAITING  # 148 bytes
    assert out.push((frames(3), 1, 0)) == relay.OVER  # 222 bytes > 200
    assert out.bytes == 222


def test_outbound_first_push_over_the_limit_is_waiting_and_over() -> None:
    out = outbound(FakeSocket(budget=0), high_water=1)
    assert out.push((frames(1, 5), 5, 0)) == relay.WAITING | relay.OVER


@pytest.mark.parametrize("error", [BrokenPipeError(errno.EPIPE, "Broken pipe"),
                                   ConnectionResetError(errno.ECONNRESET, "reset")],
                         ids=["epipe", "econnreset"])
def test_outbound_push_and_write_raise_when_the_socket_fails(error: OSError) -> None:
    sock = FakeSocket()
    sock.error = error
    out = outbound(sock)
    with pytest.raises(OSError):
        out.push((frames(1), 1, 0))
    sock.error = None
    sock.budget = 5
    assert out.push((frames(2), 1, 0)) == relay.WAITING
    sock.error = error
    with pytest.raises(OSError):
        out.write()
    out.clear()
    assert not out.pending and out.messages == out.bytes == out.sent == 0


def test_outbound_drop_oldest_never_drops_the_chunk_being_written_the_newest_or_a_reply() -> None:
    sock = FakeSocket(budget=10)
    out = outbound(sock, high_water=4)
    assert out.push((frames(1, 2), 2, 0)) == relay.WAITING  # being written: 10 bytes out
    sock.budget = 0
    out.push((frames(3), 1, 0))
    reply = logic.report_message(b'{"ok":1}')
    assert out.push_notice(reply, relay.REPLY) == 0
    out.push((frames(4), 1, 0))
    assert out.push((frames(5), 1, 0)) == relay.OVER  # 5 messages > 4
    dropped = out.drop_oldest(True)
    assert dropped == 1  # frame 3: the first chunk is being written, the reply stays
    assert queued(out) == [(2, 0), (0, 1), (0, relay.REPLY), (1, 0), (1, 0)]
    assert out.dropped == 1
    assert out.pending[1] == (relay.GAP_PLACEHOLDER, 0, 1)  # where the drop happened

    for seq in range(6, 12):
        out.push((frames(seq), 1, 0))
    dropped = out.drop_oldest(True)
    assert not out.over_high_water()
    assert out.pending[0][0] == frames(1, 2) and out.sent == 10
    assert out.pending[1][0] == reply
    assert out.pending[-1][0] == frames(11), "the newest was dropped"
    sock.budget = None
    while out.pending:
        out.write()
    delivered = split_frames(bytes(sock.received))
    assert delivered[0] == frames(1) and delivered[1] == frames(2)
    assert delivered[2] == reply
    gaps = [gap_of(f) for f in delivered]
    data = [sequence_of(f) for f, g in zip(delivered, gaps, strict=True)
            if g is None and f != reply]
    lost = sum(g[0] for g in gaps if g is not None)
    assert lost == out.dropped == 11 - len(data)
    assert [g[1] for g in gaps if g is not None] == list(itertools.accumulate(
        g[0] for g in gaps if g is not None))  # running totals


def test_outbound_drop_oldest_may_drop_the_head_when_none_of_it_was_written() -> None:
    out = outbound(FakeSocket(budget=0), high_water=2)
    for seq in range(1, 5):
        out.push((frames(seq), 1, 0))
    assert out.drop_oldest(True) == 2
    assert queued(out) == [(0, 2), (1, 0), (1, 0)]
    assert [sequence_of(e[0]) for e in list(out.pending)[1:]] == [3, 4]
    assert out.pending[0] == (relay.GAP_PLACEHOLDER, 0, 2)  # built when it is written


def test_outbound_drop_oldest_keeps_the_newest_even_when_it_alone_is_over_the_limit() -> None:
    out = outbound(FakeSocket(budget=0), high_water=100, high_water_bytes=200)
    out.push((frames(1), 1, 0))
    out.push((frames(2), 1, 0))
    big = frames(3, 5)  # 370 bytes: over the byte limit on its own
    assert out.push((big, 5, 0)) == relay.OVER
    assert out.drop_oldest(True) == 2
    assert queued(out) == [(0, 2), (5, 0)]
    assert out.pending[-1][0] == big
    assert out.over_high_water()  # what is left cannot be dropped
    assert out.drop_oldest(True) == 0
    assert queued(out) == [(0, 2), (5, 0)]


def test_outbound_a_dropped_gap_notice_is_carried_into_the_next_so_notices_add_up() -> None:
    sock = FakeSocket(budget=0)
    out = outbound(sock, high_water=2)
    for seq in range(1, 5):
        out.push((frames(seq), 1, 0))
    assert out.drop_oldest(True) == 2  # [gap 2, 3, 4]
    for seq in range(5, 8):
        out.push((frames(seq), 1, 0))  # [gap 2, 3, 4, 5, 6, 7]
    assert out.drop_oldest(True) == 3  # the first notice goes too: carried
    assert queued(out) == [(0, 5), (1, 0), (1, 0)]
    assert out.pending[0] == (relay.GAP_PLACEHOLDER, 0, 5)
    assert out.dropped == 5
    sock.budget = None
    while out.pending:
        out.write()
    delivered = split_frames(bytes(sock.received))
    assert [gap_of(f) for f in delivered] == [(5, 5), None, None]
    assert [sequence_of(f) for f in delivered[1:]] == [6, 7]


def test_outbound_without_gap_notices_drop_oldest_drops_and_counts_silently() -> None:
    out = outbound(FakeSocket(budget=0), high_water=2)
    for seq in range(1, 6):
        out.push((frames(seq), 1, 0))
    assert out.drop_oldest(False) == 3
    assert queued(out) == [(1, 0), (1, 0)]
    assert out.dropped == 3
    assert out.drop_oldest(False) == 0  # under the limit: nothing to do


def test_outbound_tell_lost_merges_into_a_gap_notice_waiting_at_the_tail() -> None:
    sock = FakeSocket(budget=0)
    out = outbound(sock)
    out.push((frames(1), 1, 0))
    assert out.tell_lost(3) == 0
    assert out.tell_lost(4) == 0  # merged into the waiting notice
    assert queued(out) == [(1, 0), (0, 7)]
    out.push((frames(2), 1, 0))
    assert out.tell_lost(1) == 0  # data behind it: a new notice
    assert queued(out) == [(1, 0), (0, 7), (1, 0), (0, 1)]
    assert out.dropped == 0
    sock.budget = None
    while out.pending:
        out.write()
    assert [gap_of(f) for f in split_frames(bytes(sock.received))] == [
        None, (7, 7), None, (1, 8)]


def test_outbound_tell_lost_never_merges_into_a_notice_being_written() -> None:
    sock = FakeSocket(budget=5)
    out = outbound(sock)
    assert out.tell_lost(2) == relay.WAITING  # 5 bytes of it written
    assert out.tell_lost(3) == 0
    assert queued(out) == [(0, 2), (0, 3)]
    sock.budget = None
    while out.pending:  # a notice is built when it reaches the head: one write each
        out.write()
    assert [gap_of(f) for f in split_frames(bytes(sock.received))] == [(2, 2), (3, 5)]


def test_outbound_tell_lost_on_an_empty_queue_writes_the_notice_at_once() -> None:
    sock = FakeSocket()
    out = outbound(sock)
    assert out.tell_lost(6) == 0
    assert not out.pending
    assert [gap_of(f) for f in split_frames(bytes(sock.received))] == [(6, 6)]


def test_outbound_gap_notice_totals_never_run_ahead_of_the_notices_before_them() -> None:
    """A client's gap notices carry ``total_dropped``, its running total: each one's
    total should be what the notices up to it announced, so totals never go down."""
    sock = FakeSocket(budget=0)
    out = outbound(sock, high_water=3)
    for seq in range(1, 4):
        out.push((frames(seq), 1, 0))
    out.tell_lost(5)  # a bridge reports 5 lost upstream: a notice at the tail
    out.push((frames(4), 1, 0))  # 4 > 3: the oldest message goes
    assert out.drop_oldest(True) == 1
    sock.budget = None
    while out.pending:
        out.write()
    gaps = [g for g in map(gap_of, split_frames(bytes(sock.received))) if g is not None]
    assert sum(d for d, _ in gaps) == 6
    running_total = 0
    for dropped, total in gaps:
        running_total += dropped
        assert total == running_total, f"notices {gaps}: total {total} after {running_total}"


def test_outbound_random_operations_deliver_whole_frames_in_order_and_gaps_add_up() -> None:
    """Random pushes, partial writes, replies, upstream losses and drops: the consumer
    gets whole frames only, data in order, and between two data frames exactly as many
    messages missing as the gap notices between them announce."""
    rng = random.Random(20261203)
    reply = logic.report_message(b"{}")
    for case in range(150):
        sock = FakeSocket(budget=0)
        out = outbound(sock, high_water=rng.choice((1, 3, 10)),
                       high_water_bytes=rng.choice((300, 2000, 1 << 30)))
        sequence = upstream = 0
        for _ in range(rng.randrange(5, 80)):
            roll = rng.random()
            if roll < 0.55:
                count = rng.choice((1, 1, 2, 5))
                status = out.push((frames(sequence + 1, count), count, 0))
                sequence += count
                if status & relay.OVER:
                    out.drop_oldest(True)
            elif roll < 0.8:
                sock.budget = rng.choice((0, 1, 33, 74, 200, 1000))
                out.write()
            elif roll < 0.88:
                out.push_notice(reply, relay.REPLY)
            elif roll < 0.95:
                lost = rng.randrange(1, 4)
                out.tell_lost(lost)  # lost upstream: sequences never sent here
                sequence += lost
                upstream += lost
            else:
                out.drop_oldest(True)
            queued(out)
            assert out.sent < len(out.pending[0][0]) if out.pending else out.sent == 0
        sock.budget = None
        while out.pending:
            out.write()
        announced = last = 0
        for frame in split_frames(bytes(sock.received)):
            gap = gap_of(frame)
            if gap is not None:
                announced += gap[0]
            elif frame != reply:
                seq = sequence_of(frame)
                assert seq - last - 1 == announced, f"case {case}: before {seq}"
                last, announced = seq, 0
        assert sequence - last == announced, f"case {case}: at the end"
        assert out.messages_out + out.dropped + upstream == sequence


# -- Backpressure: pause, hold, release, stalls ---------------------------------------------


class StandInQueue:
    def __init__(self, progress_at: float) -> None:
        self.progress_at = progress_at


class _StandIn:
    """What Backpressure reads of a client: ``blocked_at`` and ``out.progress_at``."""

    def __init__(self, progress_at: float) -> None:
        self.blocked_at = 0.0
        self.out = StandInQueue(progress_at)


def stand_in(progress_at: float = 0.0) -> Any:
    """A stand-in client (typed Any: Backpressure is typed for real clients)."""
    return _StandIn(progress_at)


def test_backpressure_pause_starts_every_holders_stall_clock_and_counts_the_pause() -> None:
    bp = relay.Backpressure(5.0)
    a, b = stand_in(), stand_in()
    bp.pause({a, b}, 100.0)
    assert bp.paused and bp.paused_at == 100.0 and bp.pauses == 1
    assert bp.holders == {a, b}
    assert a.blocked_at == b.blocked_at == 100.0


def test_backpressure_hold_adds_a_client_once_without_restarting_its_clock() -> None:
    bp = relay.Backpressure(5.0)
    a, b = stand_in(), stand_in()
    bp.pause({a}, 100.0)
    bp.hold(b, 101.0)
    bp.hold(b, 103.0)
    bp.hold(a, 104.0)
    assert bp.holders == {a, b}
    assert (a.blocked_at, b.blocked_at) == (100.0, 101.0)


def test_backpressure_release_ends_the_pause_only_when_the_last_holder_lets_go() -> None:
    bp = relay.Backpressure(5.0)
    a, b, c = stand_in(), stand_in(), stand_in()
    assert bp.release(a) is False  # not paused, not a holder
    bp.pause({a, b}, 100.0)
    assert bp.release(c) is False  # not a holder
    assert bp.release(a) is False  # b still holds
    assert bp.release(a) is False  # twice is nothing
    assert bp.release(b) is True
    assert bp.paused  # the relay resumes reading and calls end()
    bp.end()
    assert not bp.paused and not bp.holders
    assert bp.pauses == 1


def test_backpressure_stalled_uses_the_later_of_holding_and_last_progress() -> None:
    bp = relay.Backpressure(5.0)
    early = stand_in(progress_at=50.0)  # last progress before the pause: clock from 100
    late = stand_in(progress_at=103.0)  # progress during the pause: clock from 103
    bp.pause({early, late}, 100.0)
    assert bp.stalled(104.9) == []
    assert bp.stalled(105.0) == [early]
    assert set(bp.stalled(108.0)) == {early, late}
    late.out.progress_at = 107.0
    assert bp.stalled(108.0) == [early]


def test_backpressure_deadline_is_the_earliest_stall_and_inf_when_none_can_stall() -> None:
    bp = relay.Backpressure(5.0)
    assert bp.deadline() == math.inf  # not paused
    a, b = stand_in(progress_at=102.0), stand_in()
    bp.pause({a, b}, 100.0)
    assert bp.deadline() == 105.0
    bp.release(b)
    assert bp.deadline() == 107.0
    bp.release(a)
    assert bp.deadline() == math.inf  # nobody holds
    forever = relay.Backpressure(math.inf)
    forever.pause({stand_in()}, 100.0)
    assert forever.deadline() == math.inf
    assert forever.stalled(1e18) == []


# -- What a hostile review found: control frames that must never hurt the relay ---------


def _read_frames(sock: socket.socket, until: Callable[[list[bytes]], bool]) -> list[bytes]:
    data = b""
    deadline = time.monotonic() + TIMEOUT_S
    while not until(split_frames(data)):
        assert time.monotonic() < deadline, f"timed out with {split_frames(data)}"
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data += sock.recv(1 << 20)
    return split_frames(data)


def test_a_bridges_relay_gap_of_any_size_never_stops_the_relay_and_totals_stay_u64(
        start_relay: StartRelay) -> None:
    """A (self-declared) bridge reports the largest loss the wire can carry, twice: the
    relay keeps serving, and the consumer's notices say so with totals held to u64."""
    running = start_relay()
    largest = (1 << 64) - 1
    with connect_raw(running.path) as consumer, connect_raw(running.path) as bridge:
        consumer.sendall(subscribe_message(SUBSCRIBE_ALL, gap_notices=True))
        bridge.sendall(subscribe_message(SUBSCRIBE_ALL, bridge=True))
        running.wait_for(lambda: running.stats().messages_in >= 2)
        for _ in range(2):
            bridge.sendall(logic.gap_message(largest, largest))
        frames = _read_frames(consumer, lambda f: len(f) >= 1)
        bridge.sendall(market_frame(1))
        frames += _read_frames(consumer, lambda f: any(gap_of(x) is None for x in f))
    gaps = [gap_of(f) for f in frames if gap_of(f) is not None]
    # one notice each (or merged, had the first still waited), totals held to u64
    assert gaps in ([(largest, largest)] * 2, [(largest, largest)])
    assert running.relay.stats().protocol_errors == 0
    assert "you" in relay.query(running.path, logic.QUERY_STATS)  # still serving


def test_queued_gap_notices_are_built_when_they_reach_the_head_not_rebuilt_per_drop() -> None:
    """Notices wait as their count alone (GAP_PLACEHOLDER) and are built when written,
    so a drop in front of thousands of queued notices costs no more than one."""
    sock = FakeSocket(budget=0)
    out = outbound(sock, high_water=5000)
    for seq in range(1, 2001):  # data, notice, data, notice, ...: a bridge's small losses
        out.push((frames(seq), 1, 0))
        out.tell_lost(1)
    assert all(chunk is relay.GAP_PLACEHOLDER for chunk, _, kind in out.pending if kind > 0)
    out.push((frames(2001, 4000), 4000, 0))  # over the limit: the oldest go
    assert out.drop_oldest(True) > 0
    assert sum(chunk is not relay.GAP_PLACEHOLDER
               for chunk, _, kind in out.pending if kind > 0) == 0
    sock.budget = None
    while out.pending:
        out.write()
    gaps = [g for g in map(gap_of, split_frames(bytes(sock.received))) if g is not None]
    assert [g.total_dropped for g in gaps] == list(itertools.accumulate(
        g.dropped for g in gaps))


def test_a_flood_of_queries_from_one_client_is_answered_only_up_to_its_rate(
        start_relay: StartRelay) -> None:
    """Each query costs a pass over every client: one client's burst of them is
    answered up to relay.QUERY_BURST, the rest are counted invalid, and a query after a
    pause is answered again."""
    running = start_relay()
    flood = relay.QUERY_BURST + 50
    with connect_raw(running.path) as asker:
        asker.sendall(subscribe_message(SUBSCRIBE_NONE)
                      + logic.query_message(logic.QUERY_STATS) * flood)
        running.wait_for(lambda: running.stats().messages_in >= flood + 1)
        answers = _read_frames(asker, lambda f: len(f) >= relay.QUERY_BURST)
        time.sleep(0.3)
        asker.sendall(logic.query_message(logic.QUERY_STATS))
        answers += _read_frames(asker, lambda f: len(f) >= 1)
    assert len(answers) <= relay.QUERY_BURST + 1 + int(0.5 * relay.QUERY_RATE_S)
    assert running.stats().messages_invalid >= flood - len(answers)
