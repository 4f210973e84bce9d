"""Tests for issue 10, "See inside a running relay": the ``stats`` and ``clients``
queries over the socket, their command lines (tables, JSON, Prometheus), process names
in reports and logs, ``--version``, ``--log-format json``, who may connect
(``--allow-uid`` / ``--allow-gid``, a shared group directory), systemd's
``NOTIFY_SOCKET``, packaging, and the errors a newcomer meets.

Queries are judged over a real Unix socket against a relay in a thread
(``start_relay``); where the command line is the subject it runs as a real ``python
relay.py`` process. Other users are real processes too: the tests run as root, so a
child Python starts as root, imports what it needs, then drops to another uid/gid
(``as_user``) before it connects; those tests are skipped when not root. Every socket
and wait is bounded by ``TIMEOUT_S``; nothing here measures speed.

Client ids: the relay numbers clients 1, 2, 3, ... in the order it accepts them, so a
test that connects clients one at a time (waiting for each) knows their ids.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import logic
import relay
from conftest import (
    HERE,
    TIMEOUT_S,
    TS,
    Cli,
    RunningRelay,
    StartRelay,
    connect_raw,
    gas_message,
    read_text,
    run_cli,
    stop,
    trade_message,
    wait_for_socket,
    wait_until,
)
from logic import (
    TLV_TRADE,
    Domain,
    ExecutionLogic,
    MarketDataLogic,
    SignalLogic,
    build_message,
    parse_message,
    trade,
)
from relay import RelayClient

NOBODY = 65534  # a uid and gid outside root's
OTHER_UID = 65533  # a second service account
SHARED_GID = 4242  # the group two service accounts share (a number needs no /etc/group)
PATH_LIMIT = relay.SOCKET_PATH_MAX_BYTES  # 107

STAT_FIELDS = [field.name for field in dataclasses.fields(relay.Stats)]
needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="acting as other users needs root (setuid)")


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def own_process_name() -> str:
    """What the relay reports as this process's name (``/proc/self/comm``)."""
    with open("/proc/self/comm", encoding="utf-8") as comm:
        return comm.read().strip()


def ask(client: RelayClient, what: int) -> dict[str, Any]:
    """Send a RELAY_QUERY on ``client``'s own connection; its report."""
    client.send(logic.query_message(what))
    return relay.await_report(client, TIMEOUT_S)


def next_frame_or_none(client: RelayClient, wait_s: float = 0.2) -> bytes | None:
    """Whatever frame follows (None if nothing comes within ``wait_s``)."""
    try:
        return client.recv(timeout=wait_s)
    except TimeoutError:
        return None


def entry(report: dict[str, Any], client_id: int) -> dict[str, Any]:
    """The clients report's entry for ``client_id``."""
    found: list[dict[str, Any]] = [c for c in report["clients"] if c["id"] == client_id]
    assert len(found) == 1, (client_id, [c["id"] for c in report["clients"]])
    return found[0]


def connect_in_order(running: RunningRelay, **kwargs: Any) -> tuple[RelayClient, int]:
    """A client, connected only after every earlier one was accepted: (client, its id)."""
    expected = running.stats().connections_total + 1
    client = running.client(**kwargs)
    running.wait_clients(expected)
    return client, expected


class Flooder:
    """Sends ``frames`` again and again on a non-blocking socket; remembers where it
    stopped, so the next ``until`` carries on the same byte stream."""

    def __init__(self, sock: socket.socket, frames: bytes) -> None:
        self.sock = sock
        self.view = memoryview(frames)
        self.pos = 0
        sock.setblocking(False)

    def until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S * 2
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out flooding the relay until {what}")
            try:
                self.pos += self.sock.send(self.view[self.pos:])
            except BlockingIOError:
                time.sleep(0.001)
            if self.pos == len(self.view):
                self.pos = 0


def one_line_error(stderr: str) -> str:
    """The one line a runtime error prints: no traceback, nothing else (notes aside)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines()
             if line.strip() and not line.startswith("relay.py: note:")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("relay.py: error: "), stderr
    return lines[0]


def usage_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error line of a usage error (exit 2): usage text, then one error line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "usage:" in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(r"relay\.py( \w+)?: error: ", last), result.stderr
    return last


def serve(cli: Cli, socket_path: str, *args: str, log: str,
          env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``python relay.py --socket P ARGS`` logging to the file ``log``; return once
    it answers on ``socket_path``."""
    with open(log, "w", encoding="utf-8") as log_file:
        process = cli("--socket", socket_path, "--stats-interval", "0", *args,
                      stderr=log_file, env=env)
    try:
        wait_for_socket(socket_path)
    except ConnectionError:
        process.kill()
        process.communicate(timeout=TIMEOUT_S)
        raise AssertionError(f"relay did not start: {read_text(log)}") from None
    return process


# A child Python that starts as root, imports what it will need (the interpreter's own
# files may be out of an unprivileged user's reach), then becomes UID:GID with the
# supplementary GROUPS (argv 1-3) and runs the code that follows.
AS_USER = f"""
import gettext, grp, json, linecache, locale, os, pwd, sys, tokenize, traceback
sys.path.insert(0, {HERE!r})
import logic, relay
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([int(g) for g in sys.argv[3].split(",") if g])
os.setgid(gid)
os.setuid(uid)
args = sys.argv[4:]
"""

# args: PATH. Ask the relay for the clients report; print what happened as JSON.
QUERY_AS_USER = AS_USER + """
try:
    with relay.RelayClient(args[0], publish_only=True, timeout=5) as client:
        client.send(logic.query_message(logic.QUERY_CLIENTS))
        report = relay.await_report(client, 5)
    print(json.dumps({"you": report["you"]}))
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
"""

# args: PATH. Subscribe, say "ready", print the hex of the first frame received.
CONSUME_AS_USER = AS_USER + """
with relay.RelayClient(args[0], timeout=5) as client:
    client.send(logic.query_message(logic.QUERY_STATS))
    relay.await_report(client, 5)  # the relay has accepted and read us
    print("ready", flush=True)
    print(client.recv().hex(), flush=True)
"""

# args: PATH HEX. Publish the frame, then wait for a report (the relay has read it).
PUBLISH_AS_USER = AS_USER + """
with relay.RelayClient(args[0], publish_only=True, timeout=5) as client:
    client.send(bytes.fromhex(args[1]))
    client.send(logic.query_message(logic.QUERY_STATS))
    relay.await_report(client, 5)
print("published", flush=True)
"""

# args: ARGV... The command line of relay.py as that user.
MAIN_AS_USER = AS_USER + "sys.exit(relay.main(args))\n"


def as_user(code: str, uid: int, gid: int, groups: tuple[int, ...], *args: str,
            timeout: float = TIMEOUT_S * 2) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, str(uid), str(gid),
                           ",".join(map(str, groups)), *args],
                          capture_output=True, text=True, timeout=timeout, cwd="/")


def refused(answer: dict[str, Any]) -> bool:
    """Whether a ``query_as`` answer is the relay closing the connection at once (it
    comes as EOF, or as a broken pipe while the client still sends its subscription)."""
    return answer.get("error") == "EOFError" or (
        answer.get("error") == "ConnectionError" and "may not connect" not in answer["message"])


def query_as(path: str, uid: int, gid: int, groups: tuple[int, ...] = ()) -> dict[str, Any]:
    result = as_user(QUERY_AS_USER, uid, gid, groups, path)
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


# A process named argv[1] (its /proc/<pid>/comm) that connects to argv[2], sends the
# hex bytes argv[3] (may be empty), says "ready", and leaves when its stdin closes.
NAMED_PEER = """
import socket, sys
with open("/proc/self/comm", "w") as comm:
    comm.write(sys.argv[1])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(5)
sock.connect(sys.argv[2])
sock.sendall(bytes.fromhex(sys.argv[3]))
print("ready", flush=True)
sys.stdin.readline()
"""


def named_peer(name: str, path: str, send: bytes = b"") -> subprocess.Popen[str]:
    """A running process called ``name`` connected to ``path`` (it has sent ``send``)."""
    process = subprocess.Popen([sys.executable, "-c", NAMED_PEER, name, path, send.hex()],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


@pytest.fixture
def peers() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts (named peers); each is told to leave, then reaped."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            try:
                process.communicate("\n", timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate(timeout=TIMEOUT_S)


@pytest.fixture
def shared_dir(socket_dir: str) -> str:
    """The recipe for two service accounts: a directory of the shared group, mode 2770
    (setgid: what is made in it belongs to the group), reachable from the temp dir."""
    os.chmod(socket_dir, 0o711)
    directory = os.path.join(socket_dir, "shared")
    os.mkdir(directory)
    os.chown(directory, 0, SHARED_GID)
    os.chmod(directory, 0o2770)
    return directory


# A domain of our own, registered as README's "my_relay.py" does.
MY_RELAY = f"""
import sys
sys.path.insert(0, {HERE!r})
import logic, relay

class HeartbeatLogic(logic.BaseLogic):
    name = "heartbeats"
    domain = 10
    socket_path = "/tmp/torq/heartbeats.sock"
    overflow = "disconnect"
    checksum = "verify"
    tlv_types = range(100, 101)
    max_message_size = 1024

logic.register_logic(HeartbeatLogic)
sys.exit(relay.main())
"""


def my_relay_command(*args: str) -> list[str]:
    return [sys.executable, "-c", MY_RELAY, *args]


# ---------------------------------------------------------------------------------------
# Queries over the socket: who gets the answer, what it holds
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("logic_class", "relay_source"), [
    (MarketDataLogic, logic.Source.MARKET_DATA_RELAY),
    (SignalLogic, logic.Source.SIGNAL_RELAY),
    (ExecutionLogic, logic.Source.EXECUTION_RELAY),
])
def test_a_query_is_answered_to_the_asking_client_alone_in_one_frame_from_the_relay(
        start_relay: StartRelay, logic_class: type[logic.BaseLogic],
        relay_source: int) -> None:
    running = start_relay(logic_class())
    asker, asker_id = connect_in_order(running)
    other, _ = connect_in_order(running)
    producer, _ = connect_in_order(running, publish_only=True)
    with asker, other, producer:
        for what in (logic.QUERY_STATS, logic.QUERY_CLIENTS):
            asker.send(logic.query_message(what))
            frame = asker.recv()  # the very next frame it gets
            header, tlvs = parse_message(frame)
            assert header.relay_domain == Domain.SYSTEM
            assert header.source == relay_source
            assert tlvs and all(t == logic.RELAY_REPORT for t, _ in tlvs)
            report = logic.decode_report(tlvs)
            assert report["you"] == asker_id
            assert ("counters" in report) == (what == logic.QUERY_STATS)
            assert ("clients" in report) == (what == logic.QUERY_CLIENTS)
        # Had a report gone to the other client, it would arrive before this message.
        message = relay.synthetic_messages(running.relay.logic, 1, 1, 1)[0]
        producer.send(message)
        assert other.recv() == message
        assert asker.recv() == message


def test_stats_report_describes_the_relay_and_holds_every_stats_counter(
        start_relay: StartRelay) -> None:
    started = time.time()
    running = start_relay(queue_limit=123, queue_bytes=456_789, max_connections=77,
                          socket_mode=0o640, retain=10)
    with running.client() as consumer, running.client(publish_only=True) as producer:
        running.wait_clients(2)
        for sequence in (1, 2, 3):
            producer.send(trade_message(sequence))
        for _ in range(3):
            consumer.recv()
        report = relay.query(running.path, logic.QUERY_STATS)
    info = report["relay"]
    assert {key: info[key] for key in (
        "name", "domain", "socket", "pid", "version", "overflow", "checksum",
        "max_message_size", "queue_limit", "queue_bytes", "max_connections", "paused",
        "socket_mode", "retain", "retained_messages", "pending_messages",
        "pending_bytes")} == {
        "name": "market_data", "domain": Domain.MARKET_DATA, "socket": running.path,
        "pid": os.getpid(), "version": relay.__version__, "overflow": "drop_oldest",
        "checksum": "off", "max_message_size": 65536, "queue_limit": 123,
        "queue_bytes": 456_789, "max_connections": 77, "paused": False,
        "socket_mode": "0640", "retain": 10, "retained_messages": 3,
        "pending_messages": 0, "pending_bytes": 0}
    assert info["retained_bytes"] == 3 * len(trade_message(1))
    assert started - 1 <= info["started_at"] <= time.time()
    assert 0 <= info["uptime_s"] <= time.time() - info["started_at"] + 1
    counters = report["counters"]
    assert list(counters) == list(STAT_FIELDS)
    assert counters["connections_active"] == 3  # the asker is connected
    assert counters["connections_total"] == 3
    assert counters["messages_out"] == 3
    assert counters["messages_filtered"] == counters["messages_invalid"] == 0
    assert isinstance(report["you"], int)


def test_clients_report_names_each_client_with_its_pid_uid_subscription_and_counters(
        start_relay: StartRelay) -> None:
    running = start_relay()
    t0 = time.time()
    consumer, consumer_id = connect_in_order(running, subscribe=[TLV_TRADE],
                                             gap_notices=True)
    producer, producer_id = connect_in_order(running, publish_only=True)
    bridge, bridge_id = connect_in_order(running, bridge=True)
    asker, asker_id = connect_in_order(running, publish_only=True)
    with consumer, producer, bridge, asker:
        trades = [trade_message(1), trade_message(2)]
        producer.send_many([trades[0], gas_message(3), trades[1]])
        assert [consumer.recv(), consumer.recv()] == trades
        for _ in range(3):
            bridge.recv()
        report = ask(asker, logic.QUERY_CLIENTS)
    assert report["you"] == asker_id
    assert [c["id"] for c in report["clients"]] == [consumer_id, producer_id, bridge_id,
                                                    asker_id]
    subscribe_size = len(logic.subscribe_message(logic.SUBSCRIBE_TYPES, [TLV_TRADE], True))
    c = entry(report, consumer_id)
    assert c["pid"] == os.getpid()
    assert (c["uid"], c["gid"]) == (os.getuid(), os.getgid())
    assert c["process"] == own_process_name()
    assert t0 - 1 <= c["connected_at"] <= time.time()
    assert {key: c[key] for key in (
        "mode", "types", "gap_notices", "bridge", "messages_in", "bytes_in", "filtered",
        "invalid", "messages_out", "bytes_out", "pending_messages", "pending_bytes",
        "dropped", "replaying")} == {
        "mode": logic.SUBSCRIBE_TYPES, "types": [TLV_TRADE], "gap_notices": True,
        "bridge": False, "messages_in": 1, "bytes_in": subscribe_size, "filtered": 0,
        "invalid": 0, "messages_out": 2, "bytes_out": sum(map(len, trades)),
        "pending_messages": 0, "pending_bytes": 0, "dropped": 0, "replaying": False}
    p = entry(report, producer_id)
    assert (p["mode"], p["messages_in"], p["messages_out"]) == (logic.SUBSCRIBE_NONE, 4, 0)
    assert p["bytes_in"] == len(logic.subscribe_message(logic.SUBSCRIBE_NONE)) + sum(
        map(len, trades)) + len(gas_message(3))
    b = entry(report, bridge_id)
    assert (b["mode"], b["bridge"], b["messages_out"]) == (logic.SUBSCRIBE_ALL, True, 3)
    assert entry(report, asker_id)["mode"] == logic.SUBSCRIBE_NONE  # publish-only: answered


def test_clients_report_names_the_process_behind_each_connection(
        start_relay: StartRelay, peers: list[subprocess.Popen[str]]) -> None:
    running = start_relay()
    peers.append(named_peer("strategy-x", running.path))
    peers.append(named_peer("risk-monitor", running.path))
    running.wait_for(lambda: running.stats().connections_active == 2)
    report = relay.query(running.path, logic.QUERY_CLIENTS)
    names = {c["pid"]: c["process"] for c in report["clients"]}
    assert names[peers[0].pid] == "strategy-x"
    assert names[peers[1].pid] == "risk-monitor"
    assert names[os.getpid()] == own_process_name()  # the asker


def test_clients_report_keeps_the_last_64_closed_clients_newest_first(
        start_relay: StartRelay) -> None:
    running = start_relay()
    for n in range(1, 71):
        sock = connect_raw(running.path)
        running.wait_clients(n)
        sock.close()
        running.wait_for(lambda: running.stats().connections_active == 0)
    report = relay.query(running.path, logic.QUERY_CLIENTS)
    closed = report["closed"]
    assert [c["id"] for c in closed] == list(range(70, 6, -1))
    assert [c["closed_at"] for c in closed] == sorted((c["closed_at"] for c in closed),
                                                      reverse=True)
    for c in closed:
        assert set(c) >= {"id", "pid", "process", "connected_at", "closed_at", "reason",
                          "messages_in", "messages_out", "dropped"}
        assert c["reason"] == "peer closed the connection"
        assert (c["pid"], c["process"]) == (os.getpid(), own_process_name())
        assert c["connected_at"] <= c["closed_at"]
        assert (c["messages_in"], c["messages_out"], c["dropped"]) == (0, 0, 0)
    assert [c["id"] for c in report["clients"]] == [71]


def _leave_politely(running: RunningRelay) -> None:
    sock = connect_raw(running.path)
    sock.sendall(trade_message(1))
    running.wait_for(lambda: running.stats().messages_in >= 1)
    sock.close()


def _leave_mid_frame(running: RunningRelay) -> None:
    sock = connect_raw(running.path)
    sock.sendall(trade_message(1)[:40])
    running.wait_for(lambda: running.stats().bytes_in >= 40)
    sock.close()


def _send_garbage(running: RunningRelay) -> None:
    sock = connect_raw(running.path)
    sock.sendall(trade_message(1) + b"\x00" * 40)
    running.wait_for(lambda: running.stats().protocol_errors >= 1)
    sock.close()


def _fall_behind(running: RunningRelay) -> None:
    """A consumer that never reads, on a domain whose policy cuts slow consumers."""
    consumer = connect_raw(running.path)
    consumer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    producer = connect_raw(running.path)
    running.wait_clients(2)
    frames = b"".join(relay.synthetic_messages(running.relay.logic, 1, 1000, 1))
    Flooder(producer, frames).until(lambda: running.stats().slow_disconnects >= 1,
                                    "the slow consumer is cut")
    consumer.close()
    producer.close()


@pytest.mark.parametrize(("logic_class", "kwargs", "leave", "reason"), [
    (MarketDataLogic, {}, _leave_politely, r"peer closed the connection"),
    (MarketDataLogic, {}, _leave_mid_frame,
     r"peer closed the connection with 40 bytes of an incomplete frame"),
    (MarketDataLogic, {}, _send_garbage,
     rf"bad magic 0x00000000 at offset {len(trade_message(1))}"),
    (SignalLogic, {"queue_limit": 4}, _fall_behind,
     r"slow consumer: \d+ messages / \d+ bytes pending, over the limit of 4 / \d+"),
    (ExecutionLogic, {"queue_limit": 4, "stall_timeout": 0.2}, _fall_behind,
     r"no write progress for 0\.\d s .*"),
], ids=["closed", "mid-frame", "bad-magic", "slow-consumer", "stalled"])
def test_a_closed_clients_reason_is_in_the_same_words_as_the_relays_log_line(
        start_relay: StartRelay, caplog: pytest.LogCaptureFixture,
        logic_class: type[logic.BaseLogic], kwargs: dict[str, Any],
        leave: Callable[[RunningRelay], None], reason: str) -> None:
    caplog.set_level(logging.DEBUG, logger="relay")
    running = start_relay(logic_class(), **kwargs)
    leave(running)
    running.wait_for(lambda: len(running.relay.closed_clients) >= 1)
    closed = relay.query(running.path, logic.QUERY_CLIENTS)["closed"]
    leaver = closed[-1]  # the first to leave: the consumer, or the only one
    assert re.fullmatch(reason, leaver["reason"]), leaver
    label = f"client {leaver['id']} (pid {os.getpid()} {own_process_name()})"
    logged = [r.getMessage() for r in caplog.records if r.name == "relay"]
    assert f"{label}: {leaver['reason']}, closing" in "\n".join(logged), logged


def test_a_reply_is_never_dropped_even_from_a_full_drop_oldest_queue(
        start_relay: StartRelay) -> None:
    running = start_relay(queue_limit=2)  # market_data: drop_oldest
    consumer, consumer_id = connect_in_order(running, gap_notices=True)  # never reads
    producer = connect_raw(running.path)
    running.wait_clients(2)
    flooder = Flooder(producer, b"".join(trade_message(n) for n in range(1, 201)))
    with consumer, producer:
        flooder.until(lambda: running.stats().messages_dropped > 0,
                      "the consumer's queue drops")
        consumer.send(logic.query_message(logic.QUERY_CLIENTS))
        wait_until(lambda: entry(relay.query(running.path, logic.QUERY_CLIENTS),
                                 consumer_id)["messages_in"] == 2, "the relay to read the query")
        dropped = running.stats().messages_dropped
        flooder.until(lambda: running.stats().messages_dropped > dropped + 1000,
                      "a thousand more drops behind the reply")
        report = relay.await_report(consumer, TIMEOUT_S)  # read past the data to it
    assert report["you"] == consumer_id
    assert entry(report, consumer_id)["dropped"] > 0


def test_a_query_during_a_replay_is_answered_and_the_replay_stays_whole(
        start_relay: StartRelay) -> None:
    count = 20_000  # about 1.5 MB: more than the socket holds, so the replay is fed
    running = start_relay(retain=count, queue_limit=10)
    with running.client(publish_only=True) as producer:
        for first in range(1, count + 1, 1000):
            producer.send_many([trade_message(n) for n in range(first, first + 1000)])
        running.wait_for(lambda: relay.query(running.path, logic.QUERY_STATS)["relay"][
            "retained_messages"] == count)
    with running.client() as joiner:  # asks for the replay and the report in one write
        joiner.send(logic.subscribe_message(replay=logic.Replay(count, 0))
                    + logic.query_message(logic.QUERY_CLIENTS))
        sequences: list[int] = []
        reports: list[dict[str, Any]] = []
        live = None
        for _ in range(count + 10):
            frame = joiner.recv()
            header, tlvs = parse_message(frame)
            if header.relay_domain != Domain.SYSTEM:
                sequences.append(header.sequence)
            elif tlvs[0][0] == logic.RELAY_REPORT:
                reports.append(logic.decode_report(tlvs))
            elif tlvs[0][0] == logic.RELAY_LIVE:
                live = logic.decode_live(tlvs[0][1])
            if live is not None and reports:
                break
    assert len(reports) == 1
    assert entry(reports[0], reports[0]["you"])["replaying"] is True
    assert live is not None and live.replayed == count
    assert sequences == list(range(1, count + 1))


@pytest.mark.parametrize("value", [b"\x09", b"", b"\x00", b"\x01\x02", b"\x03"],
                         ids=["unknown-9", "empty", "zero", "too-long", "unknown-3"])
def test_a_malformed_or_unknown_query_is_counted_invalid_and_answered_with_nothing(
        start_relay: StartRelay, value: bytes) -> None:
    running = start_relay()
    asker, asker_id = connect_in_order(running, publish_only=True)
    with asker:
        asker.send(build_message(Domain.SYSTEM, 0, [(logic.RELAY_QUERY, value)]))
        report = ask(asker, logic.QUERY_CLIENTS)
        frame = next_frame_or_none(asker)
    # The first frame it got answered the good query: the bad one got nothing.
    assert frame is None
    assert entry(report, asker_id)["invalid"] == 1
    assert running.stats().messages_invalid == 1


def test_a_bad_query_between_two_good_ones_leaves_exactly_their_two_answers(
        start_relay: StartRelay) -> None:
    running = start_relay()
    with running.client(publish_only=True) as asker:
        running.wait_clients(1)
        asker.send_many([logic.query_message(logic.QUERY_STATS),
                         build_message(Domain.SYSTEM, 0, [(logic.RELAY_QUERY, b"\x09")]),
                         logic.query_message(logic.QUERY_CLIENTS)])
        first = logic.decode_report(parse_message(asker.recv()).tlvs)
        second = logic.decode_report(parse_message(asker.recv()).tlvs)
        assert next_frame_or_none(asker) is None
    assert "counters" in first
    assert "clients" in second


@pytest.mark.slow
def test_clients_report_lists_a_thousand_connected_clients(
        start_relay: StartRelay, nofile_limit: Callable[[int], None]) -> None:
    nofile_limit(2300)  # both ends of each connection live in this process
    running = start_relay(max_connections=1100)
    socks = []
    try:
        for _ in range(1000):
            socks.append(connect_raw(running.path))
        running.wait_for(lambda: running.stats().connections_active == 1000)
        report = relay.query(running.path, logic.QUERY_CLIENTS)
        ids = [c["id"] for c in report["clients"]]
        assert len(ids) == len(set(ids)) == 1001  # the thousand and the asker
        assert report["you"] in ids
        assert "clients_left_out" not in report
        table = run_cli("--socket", running.path, "clients")
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines()[0] == "1001 clients connected"
        assert len(table.stdout.splitlines()) >= 1 + 1 + 1001
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.slow
def test_the_asking_client_is_in_its_own_clients_report_however_many_are_connected(
        start_relay: StartRelay, nofile_limit: Callable[[int], None]) -> None:
    count = 3600  # about 300 bytes each: more than a 1 MiB frame holds
    nofile_limit(2 * count + 200)
    running = start_relay(max_connections=count + 100)
    socks = []
    try:
        for _ in range(count):
            socks.append(connect_raw(running.path))
        running.wait_for(lambda: running.stats().connections_active == count)
        report = relay.query(running.path, logic.QUERY_CLIENTS)
        assert report.get("clients_left_out", 0) > 0  # it did have to leave some out
        assert report["you"] in [c["id"] for c in report["clients"]]
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("overflow", ["drop_oldest", "disconnect"])
def test_a_client_that_floods_queries_and_never_reads_stays_within_queue_bytes(
        start_relay: StartRelay, overflow: str) -> None:
    running = start_relay(queue_bytes=64 * 1024, overflow=overflow)
    flooder = connect_raw(running.path)
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with flooder:
        flooder.sendall(logic.subscribe_message(logic.SUBSCRIBE_NONE))
        running.wait_clients(1)
        queries = logic.query_message(logic.QUERY_STATS) * 3000
        flooder.setblocking(False)
        sent = 0
        deadline = time.monotonic() + TIMEOUT_S
        while sent < len(queries) and time.monotonic() < deadline:
            try:
                sent += flooder.send(queries[sent:])
            except BlockingIOError:
                time.sleep(0.005)  # the relay stopped reading us: what we want
        time.sleep(0.2)  # let the relay work through what it read
        report = relay.query(running.path, logic.QUERY_CLIENTS)
    pending = sum(c["pending_bytes"] for c in report["clients"] if c["id"] == 1)
    assert pending <= 64 * 1024 + 4096, pending  # (or it was closed: 0)


def test_stats_answers_while_backpressure_has_paused_the_relay(
        start_relay: StartRelay) -> None:
    running = start_relay(ExecutionLogic(), queue_limit=10, stall_timeout=float("inf"))
    consumer = connect_raw(running.path)  # never reads
    consumer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    producer = connect_raw(running.path)
    running.wait_clients(2)
    frames = b"".join(relay.synthetic_messages(ExecutionLogic(), 1, 500, 1))
    with consumer, producer:
        Flooder(producer, frames).until(lambda: running.relay.paused, "backpressure pauses")
        report = relay.query(running.path, logic.QUERY_STATS, timeout=2.0)
    assert report["relay"]["paused"] is True


def test_uptime_never_goes_backwards_when_the_wall_clock_is_stepped_back(
        start_relay: StartRelay, monkeypatch: pytest.MonkeyPatch) -> None:
    running = start_relay()
    first = running.relay.report(logic.QUERY_STATS)["relay"]["uptime_s"]
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() - 3600.0)  # NTP steps the clock back
    later = running.relay.report(logic.QUERY_STATS)["relay"]["uptime_s"]
    monkeypatch.undo()
    assert later >= first >= 0


# ---------------------------------------------------------------------------------------
# stats and clients on the command line
# ---------------------------------------------------------------------------------------


def test_stats_prints_a_readable_table_of_the_relay_and_every_counter(
        start_relay: StartRelay) -> None:
    running = start_relay(queue_limit=321)
    with running.client() as consumer, running.client(publish_only=True) as producer:
        running.wait_clients(2)
        producer.send_many([trade_message(n) for n in (1, 2, 3)])
        for _ in range(3):
            consumer.recv()
        result = run_cli("--socket", running.path, "stats")
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(None, 1) for line in result.stdout.splitlines()
                if line.strip() and not line.startswith("#"))
    assert rows["name"] == "market_data"
    assert rows["socket"] == running.path
    assert rows["pid"] == str(os.getpid())
    assert rows["version"] == relay.__version__
    assert rows["queue_limit"] == "321"
    assert rows["socket_mode"] == "0600"
    assert re.fullmatch(r"\d\d:\d\d:\d\d", rows["uptime"])
    for field in STAT_FIELDS:
        assert re.fullmatch(r"\d+", rows[field].strip()), (field, rows)
    assert rows["messages_out"].strip() == "3"
    assert rows["connections_active"].strip() == "3"
    assert result.stdout.index("# relay") < result.stdout.index("# counters")


def test_stats_json_is_the_report_for_scripts(start_relay: StartRelay) -> None:
    running = start_relay()
    result = run_cli("--socket", running.path, "stats", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["relay"]["pid"] == os.getpid()
    assert report["relay"]["name"] == "market_data"
    assert list(report["counters"]) == list(STAT_FIELDS)
    assert report["counters"]["connections_active"] == 1


def prometheus_families(text: str) -> dict[str, Any]:
    parser = pytest.importorskip("prometheus_client.parser")
    return {family.name: family for family in parser.text_string_to_metric_families(text)}


def test_stats_prometheus_is_valid_exposition_text_with_counters_and_gauges(
        start_relay: StartRelay) -> None:
    running = start_relay(SignalLogic())
    with running.client() as consumer, running.client(publish_only=True) as producer:
        running.wait_clients(2)
        producer.send_many(relay.synthetic_messages(running.relay.logic, 1, 5, 1))
        for _ in range(5):
            consumer.recv()
        result = run_cli("--socket", running.path, "--domain", "signal", "stats",
                         "--prometheus")
    assert result.returncode == 0, result.stderr
    families = prometheus_families(result.stdout)
    for field in STAT_FIELDS:
        if field == "connections_active":
            continue
        name = f"torq_relay_{field.removesuffix('_total')}"  # the parser drops _total
        family = families[name]
        assert family.type == "counter", name
        [sample] = family.samples
        assert sample.name == f"{name}_total"
        assert sample.labels == {"domain": "signal"}
    for name in ("connections_active", "paused", "uptime_seconds", "start_time_seconds",
                 "pending_messages", "pending_bytes"):
        family = families[f"torq_relay_{name}"]
        assert family.type == "gauge", name
        assert family.samples[0].labels == {"domain": "signal"}
    value = {f: families[f].samples[0].value for f in families}
    assert value["torq_relay_messages_out"] == 5
    assert value["torq_relay_messages_in"] >= 5
    assert value["torq_relay_connections_active"] == 3
    assert value["torq_relay_paused"] == 0
    info = families["torq_relay_info"].samples[0].labels
    assert info["version"] == relay.__version__
    assert info["overflow"] == "disconnect"


def test_stats_prometheus_start_time_is_the_relays_start_time_to_the_second(
        start_relay: StartRelay) -> None:
    running = start_relay()
    result = run_cli("--socket", running.path, "stats", "--prometheus")
    families = prometheus_families(result.stdout)
    started = families["torq_relay_start_time_seconds"].samples[0].value
    assert abs(started - running.relay.started_at) < 1.0


def test_stats_watch_prints_again_with_rates_until_interrupted(
        start_relay: StartRelay, cli: Cli, socket_dir: str) -> None:
    running = start_relay()
    out = os.path.join(socket_dir, "watch.txt")
    with open(out, "w", encoding="utf-8") as stdout:
        process = cli("--socket", running.path, "stats", "--watch", "0.1", stdout=stdout)
    wait_until(lambda: read_text(out).count("# relay") >= 3, "three stats reports")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    reports = read_text(out).split("# relay")[1:]
    assert "per second" not in reports[0]
    assert "per second" in reports[1]
    assert re.search(r"^messages_in\s+\d+\s+[\d,]+$", reports[1], re.MULTILINE), reports[1]


def test_clients_prints_a_table_naming_each_process_and_the_recently_closed(
        start_relay: StartRelay, peers: list[subprocess.Popen[str]]) -> None:
    running = start_relay()
    peers.append(named_peer("strategy-x", running.path))
    leaver = named_peer("leaver", running.path)
    leaver.communicate("\n", timeout=TIMEOUT_S)
    running.wait_for(lambda: len(running.relay.closed_clients) == 1)
    result = run_cli("--socket", running.path, "clients")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "2 clients connected"
    assert lines[1].split()[:4] == ["ID", "PID", "PROCESS", "UID"]
    row = next(line.split() for line in lines if "strategy-x" in line)
    assert row[:4] == ["1", str(peers[0].pid), "strategy-x", "0"]
    assert "1 recently closed, newest first" in lines
    closed_row = next(line for line in lines if "leaver" in line)
    assert closed_row.split()[:3] == ["2", str(leaver.pid), "leaver"]
    assert closed_row.endswith("peer closed the connection")


def test_clients_json_is_the_report_for_scripts(start_relay: StartRelay,
                                                peers: list[subprocess.Popen[str]]) -> None:
    running = start_relay()
    peers.append(named_peer("strategy-x", running.path))
    running.wait_clients(1)
    result = run_cli("--socket", running.path, "clients", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    peer = entry(report, 1)
    assert (peer["pid"], peer["process"], peer["uid"]) == (peers[0].pid, "strategy-x", 0)
    assert report["you"] == 2
    assert report["closed"] == []
    assert report["relay"]["pid"] == os.getpid()


# ---------------------------------------------------------------------------------------
# --version, the listening line, logs naming processes, --log-format json
# ---------------------------------------------------------------------------------------


def test_version_is_the_same_everywhere_it_is_given() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"relay.py (torq-relay) {relay.__version__}"
    assert relay.__version__ == logic.__version__
    with open(os.path.join(HERE, "pyproject.toml"), encoding="utf-8") as f:
        assert f'version = "{relay.__version__}"' in f.read()
    module = subprocess.run([sys.executable, "-m", "relay", "--version"], cwd=HERE,
                            capture_output=True, text=True, timeout=TIMEOUT_S * 2)
    assert module.returncode == 0, module.stderr
    assert module.stdout == result.stdout


def test_the_listening_line_gives_the_pid_and_socket_mode_and_client_lines_name_the_process(
        cli: Cli, socket_path: str, socket_dir: str,
        peers: list[subprocess.Popen[str]]) -> None:
    log = os.path.join(socket_dir, "relay.log")
    process = serve(cli, socket_path, "--socket-mode", "0640", log=log)
    garbage = named_peer("strategy-x", socket_path, send=b"\x00" * 40)
    peers.append(garbage)
    wait_until(lambda: "bad magic" in read_text(log), "the bad-magic line")
    assert stop(process)[0] == 0
    text = read_text(log)
    assert re.search(rf"listening on {re.escape(socket_path)} \(pid {process.pid}, "
                     r"socket mode 0640,", text), text
    # Client 1 was wait_for_socket's probe; the peer is client 2.
    assert re.search(rf"WARNING relay: client 2 \(pid {garbage.pid} strategy-x\): bad "
                     r"magic 0x00000000 at offset 0, closing", text), text


def test_log_format_json_writes_one_json_object_per_log_line(
        cli: Cli, socket_path: str, socket_dir: str) -> None:
    log = os.path.join(socket_dir, "relay.log")
    process = serve(cli, socket_path, "--log-format", "json", "--socket-mode", "0777",
                    log=log)
    with connect_raw(socket_path) as sock:
        sock.sendall(b"\x00" * 40)
        wait_until(lambda: "bad magic" in read_text(log), "the bad-magic line")
    assert stop(process)[0] == 0
    lines = read_text(log).splitlines()
    assert len(lines) >= 4, lines
    records = [json.loads(line) for line in lines]
    for record in records:
        assert set(record) >= {"time", "level", "logger", "message", "pid"}, record
        assert record["pid"] == process.pid
        assert record["logger"] == "relay"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", record["time"])
    levels = {record["level"] for record in records}
    assert levels >= {"INFO", "WARNING"}
    assert any(r["message"].startswith("market_data relay listening on") for r in records)
    assert any("bad magic" in r["message"] and r["level"] == "WARNING" for r in records)


# ---------------------------------------------------------------------------------------
# Who may connect: --allow-uid, --allow-gid, file modes, a shared group
# ---------------------------------------------------------------------------------------


@needs_root
def test_allow_uid_refuses_other_users_counts_them_and_logs_their_pid_and_uid_once_a_second(
        start_relay: StartRelay, socket_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relay")
    os.chmod(socket_dir, 0o711)
    running = start_relay(socket_mode=0o666, allow_uids=[NOBODY])
    assert "you" in query_as(running.path, NOBODY, NOBODY)  # listed: admitted
    for n in range(1, 21):  # root is not listed: told why, and closed at once
        with connect_raw(running.path) as sock:
            said = b""
            while data := sock.recv(65536):
                said += data
            header, tlvs = logic.parse_message(said)
            assert (header.relay_domain, tlvs[0][0]) == (Domain.SYSTEM, logic.TLV_ERROR)
            assert logic.decode_error(tlvs[0][1]).startswith("refused: uid 0 / gid 0 is not "
                                                             "admitted by --allow-uid")
        running.wait_for(lambda: running.stats().connections_rejected == n)  # noqa: B023
    assert running.stats().connections_total == 1
    lines = [r.getMessage() for r in caplog.records
             if r.name == "relay" and "refused a connection" in r.getMessage()]
    assert 1 <= len(lines) <= 2, lines  # rate-limited: twenty in well under 2 s
    assert lines[0] == (f"refused a connection from pid {os.getpid()} (uid 0, gid 0, "
                        f"{own_process_name()}): not in --allow-uid {NOBODY} / --allow-gid - "
                        "(1 refused so far)")


@needs_root
def test_two_service_accounts_share_a_relay_through_a_group_directory_and_others_stay_out(
        start_relay: StartRelay, shared_dir: str) -> None:
    """The recipe: a group directory (mode 2770, setgid), ``--socket-mode 0660`` and
    ``--allow-gid GROUP``. A second account in the group connects and exchanges
    messages with the first; an account outside the group is kept out."""
    path = os.path.join(shared_dir, "market_data.sock")
    running = start_relay(socket_path=path, socket_mode=0o660, allow_gids=[SHARED_GID])
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == SHARED_GID  # the setgid directory gave the socket its group
    consumer = subprocess.Popen(
        [sys.executable, "-c", CONSUME_AS_USER, str(NOBODY), str(SHARED_GID), "", path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert consumer.stdout is not None
        assert consumer.stdout.readline().strip() == "ready"
        message = trade_message(7)
        published = as_user(PUBLISH_AS_USER, OTHER_UID, SHARED_GID, (), path, message.hex())
        assert published.returncode == 0, published.stderr
        out, err = consumer.communicate(timeout=TIMEOUT_S)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.communicate(timeout=TIMEOUT_S)
    assert consumer.returncode == 0, err
    assert bytes.fromhex(out.strip()) == message
    outsider = query_as(path, OTHER_UID, OTHER_UID)
    assert outsider["error"] == "ConnectionError", outsider
    assert "may not connect" in outsider["message"]
    assert running.stats().connections_rejected == 0  # the file mode kept it out


@needs_root
def test_allow_gid_refuses_a_peer_the_file_mode_lets_in(start_relay: StartRelay,
                                                        socket_dir: str) -> None:
    os.chmod(socket_dir, 0o711)
    running = start_relay(socket_mode=0o666, allow_gids=[SHARED_GID])
    assert "you" in query_as(running.path, NOBODY, SHARED_GID)
    outsider = query_as(running.path, NOBODY, NOBODY)
    assert refused(outsider), outsider
    assert running.stats().connections_rejected == 1


@needs_root
def test_allow_gid_admits_a_member_of_the_group_whose_primary_group_is_another(
        start_relay: StartRelay, shared_dir: str) -> None:
    path = os.path.join(shared_dir, "market_data.sock")
    running = start_relay(socket_path=path, socket_mode=0o660, allow_gids=[SHARED_GID])
    member = query_as(path, NOBODY, NOBODY, (SHARED_GID,))
    assert "you" in member, member
    assert running.stats().connections_rejected == 0


@pytest.mark.parametrize(("socket_mode", "directory_mode"), [
    (0o600, 0o700), (0o660, 0o710), (0o640, 0o710), (0o666, 0o711)])
def test_a_directory_the_relay_creates_lets_in_whom_the_socket_mode_admits(
        start_relay: StartRelay, socket_dir: str, socket_mode: int,
        directory_mode: int) -> None:
    path = os.path.join(socket_dir, "made", "by", "relay.sock")
    old_umask = os.umask(0o077)  # the relay's chmod, not the umask, decides
    try:
        start_relay(socket_path=path, socket_mode=socket_mode)
    finally:
        os.umask(old_umask)
    for directory in (os.path.dirname(os.path.dirname(path)), os.path.dirname(path)):
        assert stat.S_IMODE(os.stat(directory).st_mode) == directory_mode, directory
    assert stat.S_IMODE(os.stat(path).st_mode) == socket_mode


@needs_root
@pytest.mark.parametrize(("socket_mode", "admitted"), [(0o660, True), (0o600, False)])
def test_a_group_member_reaches_a_socket_in_a_directory_the_relay_created(
        start_relay: StartRelay, socket_dir: str, socket_mode: int, admitted: bool) -> None:
    os.chmod(socket_dir, 0o711)
    path = os.path.join(socket_dir, "torq", "relay.sock")
    start_relay(socket_path=path, socket_mode=socket_mode)
    group = os.getgid()  # the relay's group owns what it creates
    member = query_as(path, NOBODY, group)
    assert ("you" in member) == admitted, member
    if not admitted:
        assert member["error"] == "ConnectionError" and "may not connect" in member["message"]
    outsider = query_as(path, NOBODY, NOBODY)
    assert outsider.get("error") == "ConnectionError", outsider


@needs_root
def test_allow_uid_and_gid_take_names_on_the_command_line(
        cli: Cli, socket_path: str, socket_dir: str) -> None:
    os.chmod(socket_dir, 0o711)
    log = os.path.join(socket_dir, "relay.log")
    process = serve(cli, socket_path, "--socket-mode", "0666", "--allow-uid", "root,nobody",
                    "--allow-gid", "root", log=log)
    assert "you" in query_as(socket_path, NOBODY, NOBODY)
    assert refused(query_as(socket_path, OTHER_UID, OTHER_UID))
    assert stop(process)[0] == 0
    assert re.search(rf"refused a connection from pid \d+ \(uid {OTHER_UID}, gid "
                     rf"{OTHER_UID}, python[\d.]*\): not in --allow-uid 0,{NOBODY} / "
                     "--allow-gid 0", read_text(log)), read_text(log)


@needs_root
@pytest.mark.parametrize("command", [
    ("stats",), ("clients",), ("tail", "--count", "1"), ("send", "--count", "3"),
    ("send", "--count", "100000"), ("record", "-", "--count", "1")],
    ids=["stats", "clients", "tail", "send", "send-many", "record"])
def test_a_command_from_a_refused_user_exits_1_saying_the_relay_refused_it(
        start_relay: StartRelay, socket_dir: str, command: tuple[str, ...]) -> None:
    os.chmod(socket_dir, 0o711)
    running = start_relay(socket_mode=0o666, allow_uids=[0])
    result = as_user(MAIN_AS_USER, NOBODY, NOBODY, (), "--socket", running.path, *command)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    line = one_line_error(result.stderr)
    assert running.path in line
    assert "--allow-uid" in line  # what to ask the relay's operator about


# ---------------------------------------------------------------------------------------
# systemd: NOTIFY_SOCKET
# ---------------------------------------------------------------------------------------


def notify_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT_S)
    sock.bind(address)
    return sock


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_socket_gets_ready_once_listening_and_stopping_when_draining(
        cli: Cli, socket_path: str, socket_dir: str, abstract: bool) -> None:
    if abstract:
        name = f"torq-test-notify-{os.getpid()}-{time.monotonic_ns()}"
        address, variable = "\0" + name, "@" + name
    else:
        address = variable = os.path.join(socket_dir, "notify")
    with notify_socket(address) as notify:
        log = os.path.join(socket_dir, "relay.log")
        with open(log, "w", encoding="utf-8") as log_file:
            process = cli("--socket", socket_path, "--stats-interval", "0", stderr=log_file,
                          env={**os.environ, "NOTIFY_SOCKET": variable})
        assert notify.recv(4096) == b"READY=1"
        with RelayClient(socket_path, timeout=TIMEOUT_S):  # listening when it said so
            pass
        process.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, read_text(log)
    assert "cannot notify" not in read_text(log)


def test_a_relay_that_fails_to_start_never_says_ready(
        start_relay: StartRelay, socket_path: str, socket_dir: str) -> None:
    start_relay()  # the socket is taken
    with notify_socket(os.path.join(socket_dir, "notify")) as notify:
        result = run_cli("--socket", socket_path,
                         env={**os.environ, "NOTIFY_SOCKET": os.path.join(socket_dir, "notify")})
        assert result.returncode == 1, result.stderr
        assert "another relay is already listening" in one_line_error(result.stderr)
        notify.setblocking(False)
        with pytest.raises(BlockingIOError):  # the process has exited: nothing was sent
            notify.recv(4096)


def test_a_notify_socket_nobody_listens_on_is_a_warning_and_the_relay_serves(
        cli: Cli, socket_path: str, socket_dir: str) -> None:
    log = os.path.join(socket_dir, "relay.log")
    env = {**os.environ, "NOTIFY_SOCKET": os.path.join(socket_dir, "nobody-here")}
    process = serve(cli, socket_path, log=log, env=env)
    assert relay.query(socket_path, logic.QUERY_STATS)["relay"]["pid"] == process.pid
    assert stop(process)[0] == 0
    assert "WARNING relay: cannot notify systemd at" in read_text(log)


def test_without_notify_socket_the_relay_sends_nothing_and_says_nothing(
        cli: Cli, socket_path: str, socket_dir: str) -> None:
    log = os.path.join(socket_dir, "relay.log")
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    process = serve(cli, socket_path, log=log, env=env)
    assert stop(process)[0] == 0
    assert "notify" not in read_text(log).lower()


# ---------------------------------------------------------------------------------------
# Packaging: pip install ., torq-relay, python -m relay
# ---------------------------------------------------------------------------------------


@pytest.fixture
def source_copy(socket_dir: str) -> str:
    """The project's files in a scratch directory (building writes build/ and egg-info
    next to pyproject.toml: never in the working tree others use)."""
    copy = os.path.join(socket_dir, "src")
    os.mkdir(copy)
    for name in os.listdir(HERE):
        if name.endswith((".py", ".toml", ".md")) or name in ("LICENSE", "Makefile"):
            shutil.copy2(os.path.join(HERE, name), copy)
    return copy


def build_wheel(source: str, out: str) -> str:
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
               "-q", "-w", out, source]
    if importlib.util.find_spec("wheel") is not None:  # setuptools < 70.1 needs it
        command.insert(4, "--no-build-isolation")  # faster: no backend to fetch
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    if result.returncode and "No matching distribution" in result.stderr + result.stdout:
        pytest.skip(f"cannot fetch the build backend: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stdout + result.stderr
    [name] = [n for n in os.listdir(out) if n.endswith(".whl")]
    return os.path.join(out, name)


@pytest.mark.slow
def test_pip_builds_a_wheel_of_the_drop_in_modules_with_a_torq_relay_command(
        source_copy: str, socket_dir: str) -> None:
    wheel_path = build_wheel(source_copy, os.path.join(socket_dir, "dist"))
    with zipfile.ZipFile(wheel_path) as wheel_file:
        names = wheel_file.namelist()
        entry_points = next(wheel_file.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
    modules = {n for n in names if "/" not in n}
    assert modules >= {"relay.py", "logic.py"}
    assert modules <= {"relay.py", "logic.py", "bridge.py"}, modules
    assert not [n for n in names if "test_" in n or "conftest" in n or "bench" in n
                or "soak" in n], names
    assert re.search(r"^torq-relay = relay:console_main$", entry_points, re.MULTILINE)

    # Installed (into a directory of its own), the command and the module both work.
    target = os.path.join(socket_dir, "site")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", "-q", "--target", target, wheel_path],
        capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env = {**os.environ, "PYTHONPATH": target}
    command = subprocess.run([os.path.join(target, "bin", "torq-relay"), "--version"],
                             capture_output=True, text=True, env=env, cwd=socket_dir,
                             timeout=TIMEOUT_S * 2)
    assert command.returncode == 0, command.stderr
    assert command.stdout.strip() == f"relay.py (torq-relay) {relay.__version__}"
    module = subprocess.run([sys.executable, "-m", "relay", "--version"], env=env,
                            cwd=socket_dir, capture_output=True, text=True,
                            timeout=TIMEOUT_S * 2)
    assert module.returncode == 0, module.stderr
    assert module.stdout == command.stdout
    where = subprocess.run([sys.executable, "-c", "import relay; print(relay.__file__)"],
                           env=env, cwd=socket_dir, capture_output=True, text=True,
                           timeout=TIMEOUT_S * 2)
    assert where.stdout.strip().startswith(target), where.stdout


# ---------------------------------------------------------------------------------------
# Errors a newcomer can act on: one line, exit 2 for usage, 1 for runtime
# ---------------------------------------------------------------------------------------


def long_path(socket_dir: str) -> str:
    path = os.path.join(socket_dir, "deeper", "x" * 120 + ".sock")
    assert len(os.fsencode(path)) > PATH_LIMIT
    return path


@pytest.mark.parametrize("command", [("tail",), ("send", "--count", "1"), ("stats",),
                                     ("clients",), ("record", "-")])
def test_a_client_command_on_a_socket_path_over_107_bytes_says_the_limit(
        socket_dir: str, command: tuple[str, ...]) -> None:
    path = long_path(socket_dir)
    result = run_cli("--socket", path, *command)
    assert result.returncode == 1, result.stderr
    line = one_line_error(result.stderr)
    assert f"at most {PATH_LIMIT}" in line
    assert str(len(os.fsencode(path))) in line


def test_the_relay_refuses_a_socket_path_over_107_bytes_and_creates_nothing(
        socket_dir: str) -> None:
    path = long_path(socket_dir)
    result = run_cli("--socket", path)
    assert result.returncode == 1, result.stderr
    line = one_line_error(result.stderr)
    assert f"at most {PATH_LIMIT}" in line
    assert "shorter --socket" in line
    assert os.listdir(socket_dir) == []


def test_a_directory_the_relay_created_is_removed_when_it_then_fails_to_start(
        socket_dir: str) -> None:
    blocker = os.path.join(socket_dir, "made", "sub")
    path = os.path.join(blocker, "relay.sock")
    os.makedirs(os.path.dirname(blocker))
    with open(blocker + ".x", "w"):
        pass
    # a socket path too long to bind, under directories the relay has to create
    long_path = os.path.join(socket_dir, "made", "new", "x" * 120 + ".sock")
    result = run_cli("--socket", long_path, "--stats-interval", "0")
    assert result.returncode == 1, result.stderr
    assert "at most 107" in one_line_error(result.stderr)
    assert sorted(os.listdir(os.path.join(socket_dir, "made"))) == ["sub.x"]
    assert not os.path.exists(path)


def test_a_socket_path_ending_in_a_slash_is_a_usage_error_that_creates_nothing(
        socket_dir: str) -> None:
    path = os.path.join(socket_dir, "made", "sub") + "/"  # a directory, not a socket
    result = run_cli("--socket", path, "--stats-interval", "0")
    assert result.returncode == 2, result.stderr
    assert "name the socket file" in result.stderr
    assert os.listdir(socket_dir) == []


@needs_root
@pytest.mark.parametrize("command", [("tail",), ("send", "--count", "1"), ("stats",),
                                     ("clients",)])
def test_a_client_command_on_a_socket_the_user_may_not_open_says_so(
        start_relay: StartRelay, command: tuple[str, ...]) -> None:
    running = start_relay()  # mode 0600 in a 0700 directory: root's alone
    result = as_user(MAIN_AS_USER, NOBODY, NOBODY, (), "--socket", running.path, *command)
    assert result.returncode == 1, (result.stdout, result.stderr)
    line = one_line_error(result.stderr)
    assert f"may not connect to {running.path}" in line
    assert "--socket-mode" in line


def test_sending_another_domains_messages_exits_1_saying_the_relay_refused_them_all(
        cli: Cli, socket_path: str, socket_dir: str) -> None:
    log = os.path.join(socket_dir, "relay.log")
    process = serve(cli, socket_path, log=log)  # market_data
    result = run_cli("--socket", socket_path, "--domain", "signal", "send", "--count", "5")
    assert stop(process)[0] == 0
    assert result.returncode == 1, (result.stdout, result.stderr)
    line = one_line_error(result.stderr)
    assert f"the relay on {socket_path} refused 5 of 5 messages" in line
    assert "5 filtered: it serves market_data" in line
    warnings = [w for w in read_text(log).splitlines() if "WARNING" in w and "filtered" in w]
    assert len(warnings) == 1, read_text(log)  # rate-limited: one line for the five
    assert re.search(r"client 2 \(pid \d+ python[\d.]*\): filtered a frame", warnings[0])


def test_a_registered_domains_send_that_the_relay_rejects_exits_1(
        socket_path: str, socket_dir: str) -> None:
    log = os.path.join(socket_dir, "relay.log")
    with open(log, "w", encoding="utf-8") as log_file:
        my_relay = subprocess.Popen(
            my_relay_command("--domain", "heartbeats", "--socket", socket_path,
                             "--stats-interval", "0"), stderr=log_file, text=True)
    try:
        wait_for_socket(socket_path)
        # `send` makes Trades for a domain it does not know: a heartbeats relay takes
        # TLV 100 only.
        result = subprocess.run(my_relay_command("--domain", "heartbeats", "--socket",
                                                 socket_path, "send", "--count", "3"),
                                capture_output=True, text=True, timeout=TIMEOUT_S * 2)
    finally:
        my_relay.terminate()
        my_relay.communicate(timeout=TIMEOUT_S)
    assert result.returncode == 1, (result.stdout, result.stderr)
    line = one_line_error(result.stderr)
    assert "refused 3 of 3 messages" in line
    assert "3 invalid" in line
    assert "dropped an invalid frame" in read_text(log)


def test_tail_json_of_a_registered_domain_gives_its_name(socket_path: str) -> None:
    my_relay = subprocess.Popen(my_relay_command("--domain", "heartbeats", "--socket",
                                                 socket_path, "--stats-interval", "0"),
                                stderr=subprocess.DEVNULL, text=True)
    try:
        wait_for_socket(socket_path)
        tail = subprocess.Popen(my_relay_command("--domain", "heartbeats", "--socket",
                                                 socket_path, "tail", "--json", "--count",
                                                 "1"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: relay.query(socket_path, logic.QUERY_STATS)["counters"][
                "connections_active"] >= 2, "tail to connect")
            with RelayClient(socket_path, publish_only=True, timeout=TIMEOUT_S) as producer:
                producer.send(build_message(10, logic.Source.DASHBOARD, [
                    logic.heartbeat(TS, 1)], sequence=1, checksum=True))
            out, err = tail.communicate(timeout=TIMEOUT_S)
        finally:
            if tail.poll() is None:
                tail.kill()
                tail.communicate(timeout=TIMEOUT_S)
    finally:
        my_relay.terminate()
        my_relay.communicate(timeout=TIMEOUT_S)
    assert tail.returncode == 0, err
    line = json.loads(out)
    assert (line["domain"], line["domain_name"]) == (10, "heartbeats")
    assert line["tlvs"][0]["name"] == "Heartbeat"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "term"])
def test_interrupting_a_long_send_says_how_many_of_how_many_were_sent_and_exits_130(
        start_relay: StartRelay, cli: Cli, socket_path: str, signum: int) -> None:
    running = start_relay()
    process = cli("--socket", socket_path, "send", "--count", "10000000", "--rate", "1000")
    running.wait_for(lambda: running.stats().messages_in >= 50)
    process.send_signal(signum)
    out, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 130, (out, err)
    assert "Traceback" not in err
    match = re.fullmatch(rf"interrupted: sent (\d+) of 10000000 market_data messages to "
                         rf"{re.escape(socket_path)}\n", err)
    assert match, err
    sent = int(match.group(1))
    running.wait_for(lambda: len(running.relay.closed_clients) == 1)
    received = running.relay.closed_clients[0]["messages_in"] - 1  # its subscription
    assert 50 <= sent <= received <= sent + 10  # a batch under way may still have gone
    assert "sent" not in out


@pytest.mark.parametrize("args", [
    ("send", "--count", "-3"),
    ("send", "--count", "0"),
    ("send", "--rate", "-5"),
    ("send", "--rate", "inf"),
    ("send", "--source", "256"),
    ("--socket-mode", "17777"),
    ("--socket-mode", "4755"),
    ("--socket-mode", "rw-------"),
    ("stats", "--watch", "-1"),
    ("stats", "--watch", "nan"),
    ("stats", "--json", "--prometheus"),
    ("clients", "--watch", "1"),
    ("--retain", "-1"),
    ("--retain-bytes", "0"),
    ("tail", "--type", "NoSuchType"),
    ("tail", "--type", "255"),
    ("tail", "--count", "-1"),
    ("tail", "--last", "-1"),
    ("record",),
    ("record", "x.torq", "--duration", "-1"),
    ("replay", "x.torq", "--speed", "-1"),
    ("--allow-uid", "no-such-user-here"),
    ("--allow-gid", "no-such-group-here"),
    ("--allow-uid", ","),
    ("--log-format", "xml"),
    ("--max-connections", "0"),
    ("--stall-timeout", "nan"),
])
def test_a_careless_option_value_is_a_usage_error_on_one_line(
        args: tuple[str, ...], socket_path: str) -> None:
    result = run_cli("--socket", socket_path, *args)
    line = usage_error(result)
    option = next((a for a in args if a.startswith("--")), None)
    if option and "required" not in line:
        assert option in line, line
    assert not os.path.exists(socket_path)


@pytest.mark.parametrize(("args", "wrong"), [
    (("send", "--rate", "-5"), "seconds (inf: never)"),
    (("replay", "x", "--speed", "-1"), "seconds (inf: never)"),
    (("--retain", "-1"), "no limit"),
], ids=["rate", "speed", "retain"])
def test_a_usage_error_speaks_of_the_options_own_unit(args: tuple[str, ...],
                                                     wrong: str) -> None:
    assert wrong not in usage_error(run_cli(*args))


def test_an_empty_socket_path_is_a_usage_error(socket_dir: str) -> None:
    usage_error(run_cli("--socket", "", "stats"))


@pytest.mark.parametrize("mode", ["777", "0666", "0602"])
def test_a_socket_mode_that_lets_every_user_in_is_accepted_with_a_warning(
        cli: Cli, socket_path: str, socket_dir: str, mode: str) -> None:
    log = os.path.join(socket_dir, "relay.log")
    process = serve(cli, socket_path, "--socket-mode", mode, log=log)
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == int(mode, 8)
    assert stop(process)[0] == 0
    text = read_text(log)
    assert f"socket mode {int(mode, 8):04o}," in text
    warning = [line for line in text.splitlines() if "WARNING" in line]
    assert len(warning) == 1, text
    assert "every local user" in warning[0] and "--allow-gid" in warning[0]


def test_a_group_socket_mode_gives_no_warning(cli: Cli, socket_path: str,
                                              socket_dir: str) -> None:
    log = os.path.join(socket_dir, "relay.log")
    process = serve(cli, socket_path, "--socket-mode", "0660", log=log)
    assert stop(process)[0] == 0
    assert "WARNING" not in read_text(log)


@pytest.mark.parametrize("name", ["Trade", "trade", "TRADE", "1"])
def test_tail_type_takes_a_tlv_name_in_any_case_or_its_number(
        start_relay: StartRelay, cli: Cli, socket_path: str, name: str) -> None:
    running = start_relay()
    tail = cli("--socket", socket_path, "tail", "--type", name, "--count", "1")
    running.wait_for(lambda: running.stats().messages_in >= 1)  # its subscription
    with running.client(publish_only=True) as producer:
        producer.send_many([gas_message(1), trade_message(2)])
    out, err = tail.communicate(timeout=TIMEOUT_S)
    assert tail.returncode == 0, err
    [line] = out.splitlines()
    assert "seq=2" in line and "Trade(" in line


def test_tail_help_lists_the_tlv_types_by_name_and_number() -> None:
    result = run_cli("tail", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for number, name in ((1, "Trade"), (18, "GasPrice"), (20, "SignalIdentity"),
                         (40, "OrderRequest"), (42, "Fill")):
        assert f"{name} ({number})" in text, name


@pytest.mark.parametrize("command", ["tail", "send", "stats", "clients", "record", "replay"])
def test_a_client_commands_help_leaves_out_the_round_2_relay_options(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--queue-limit", "--retain", "--retain-bytes", "--allow-uid",
                   "--allow-gid", "--busy-poll-us", "--socket-mode"):
        assert f"  {option}" not in result.stdout, option
    assert "--log-format" in result.stdout


@pytest.mark.parametrize("options", [("--retain", "5"), ("--allow-uid", "0"),
                                     ("--socket-mode", "0660", "--queue-limit", "3")])
def test_relay_options_after_a_client_command_are_accepted_with_a_note(
        start_relay: StartRelay, socket_path: str, options: tuple[str, ...]) -> None:
    start_relay()
    result = run_cli("--socket", socket_path, "stats", "--json", *options)
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)
    [note] = [line for line in result.stderr.splitlines() if line.startswith("relay.py: note:")]
    assert note.endswith("only matter to run; stats ignores them"), note
    for option in (o for o in options if o.startswith("--")):
        assert option in note, note


@pytest.mark.parametrize("command", [("stats",), ("stats", "--prometheus"), ("clients",),
                                     ("tail",), ("send",), ("replay", "/dev/null")])
def test_a_client_command_with_no_relay_exits_1_saying_how_to_start_one(
        socket_path: str, command: tuple[str, ...]) -> None:
    result = run_cli("--socket", socket_path, *command)
    assert result.returncode == 1, result.stderr
    line = one_line_error(result.stderr)
    assert f"no relay is listening on {socket_path}" in line
    assert f"--socket {socket_path}" in line
    assert result.stdout == ""


@pytest.mark.slow
def test_stats_on_a_socket_where_nothing_answers_exits_1_after_the_query_timeout(
        socket_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(socket_path)
        mute.listen(8)  # accepts (in the kernel's backlog), never answers
        result = run_cli("--socket", socket_path, "stats", timeout=TIMEOUT_S * 3)
    assert result.returncode == 1
    line = one_line_error(result.stderr)
    assert "did not answer a query" in line


@pytest.mark.parametrize(("target", "why"), [
    ("{dir}", "Is a directory"),
    ("{dir}/missing/rec.torq", "No such file or directory"),
])
def test_record_to_a_path_it_cannot_write_exits_1_on_one_line(
        start_relay: StartRelay, socket_path: str, socket_dir: str, target: str,
        why: str) -> None:
    start_relay()
    path = target.format(dir=socket_dir)
    result = run_cli("--socket", socket_path, "record", path, "--count", "1")
    assert result.returncode == 1, result.stderr
    assert one_line_error(result.stderr) == f"relay.py: error: cannot write {path}: {why}"


@pytest.mark.parametrize(("content", "why"), [
    (None, "cannot read"),
    (b"not a recording at all, just text\n" * 4, "is not a recording of whole frames"),
    (trade_message(1)[:50], "ends in the middle of a frame"),
])
def test_replay_of_a_missing_or_foreign_file_exits_1_on_one_line(
        start_relay: StartRelay, socket_path: str, socket_dir: str, content: bytes | None,
        why: str) -> None:
    start_relay()
    path = os.path.join(socket_dir, "session.torq")
    if content is not None:
        with open(path, "wb") as f:
            f.write(content)
    result = run_cli("--socket", socket_path, "replay", path)
    assert result.returncode == 1, result.stderr
    assert why in one_line_error(result.stderr)


@pytest.mark.parametrize("args", [
    ("stats", "--watch", "inf"),
    ("record", "-", "--duration", "inf"),
    ("send", "--count", "2", "--rate", "1e-320"),
    ("replay", "{recording}", "--speed", "1e-320"),
], ids=["watch-inf", "duration-inf", "rate-tiny", "speed-tiny"])
def test_an_endless_or_tiny_duration_never_ends_in_a_traceback(
        start_relay: StartRelay, cli: Cli, socket_path: str, socket_dir: str,
        args: tuple[str, ...]) -> None:
    start_relay()
    recording = os.path.join(socket_dir, "session.torq")
    with open(recording, "wb") as f:  # two trades a second apart
        f.write(trade_message(1) + build_message(
            Domain.MARKET_DATA, 1, [trade(1, 1, 1, 1, 1, 1, 0)], sequence=2,
            timestamp_ns=TS + 10**9))
    process = cli("--socket", socket_path, *(a.format(recording=recording) for a in args))
    try:
        _, err = process.communicate(timeout=3.0)
    except subprocess.TimeoutExpired:  # still running: fine, as long as it stops cleanly
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=TIMEOUT_S)
    assert "Traceback" not in err, err


def test_send_with_a_rate_does_not_wait_after_its_last_message(
        start_relay: StartRelay, socket_path: str) -> None:
    start_relay()
    result = run_cli("--socket", socket_path, "send", "--count", "1", "--rate", "0.5")
    assert result.returncode == 0, result.stderr
    match = re.search(r"in ([\d.]+) s", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) < 1.0, result.stdout


def test_record_with_no_relay_leaves_an_existing_file_alone(socket_path: str,
                                                          socket_dir: str) -> None:
    path = os.path.join(socket_dir, "yesterday.torq")
    with open(path, "wb") as f:
        f.write(trade_message(1))
    result = run_cli("--socket", socket_path, "record", path, "--count", "1")
    assert result.returncode == 1
    assert "no relay is listening" in one_line_error(result.stderr)
    with open(path, "rb") as f:
        assert f.read() == trade_message(1)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_the_readme_unit_file_passes_systemd_analyze_verify(tmp_path: Any) -> None:
    """The unit file the README gives is one systemd accepts (Type=notify: the relay
    sends READY=1 and STOPPING=1, tested above)."""
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    unit = re.search(r"```ini\n# (/etc/systemd/system/(\S+))\n(.*?)```", readme, re.S)
    assert unit, "no unit file in the README"
    path = tmp_path / unit.group(2)
    path.write_text(unit.group(3))
    assert "Type=notify" in unit.group(3)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                            text=True, timeout=30)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if unit.group(2) in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
