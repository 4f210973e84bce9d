"""Tests for history (issue 12): retention (``--retain``), replay on subscribe
(``RELAY_REPLAY`` then the ``RELAY_LIVE`` marker), and recordings (``record`` /
``replay``), as a user relies on them.

The heart of it is the seam: a joiner that asks for a replay gets every message once, in
order, across the marker, while publishers keep publishing. The seam tests join a fast
numbered stream (a publisher thread sending sequence numbers 1, 2, 3, ... in batches)
again and again, three ways: a new connection, a publish-only client switching to
receive, and a client that already received live traffic. They judge by sequence
numbers only: nothing twice, nothing missed, and the marker exactly where the replay
ends.

Relays run in this process (``start_relay``) so tests can wait on their counters
(``messages_in`` counts every frame read, control frames included) and read the ring's
size (``relay.history``); the command line is a real process (``cli``) where it is the
subject. Publishing "one chunk at a time" means sending and then waiting until the relay
has read it, so the ring holds exactly the chunks the test made. Every wait is bounded;
nothing measures speed (``bench.py`` does).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

import logic
import relay
from conftest import (
    PRICE,
    TIMEOUT_S,
    TS,
    Cli,
    RunningRelay,
    StartRelay,
    assert_nothing_more,
    connect_raw,
    domain_of,
    finish,
    gap_of,
    gas_message,
    publish_past_a_stopped_consumer,
    sequence_of,
    source_of,
    split_frames,
    trade_message,
    wait_for_socket,
    wait_subscribed,
    wait_until,
)
from logic import (
    HEADER_SIZE,
    RELAY_LIVE,
    RELAY_REPORT,
    SUBSCRIBE_ALL,
    SUBSCRIBE_NONE,
    SUBSCRIBE_TYPES,
    TLV_GAS_PRICE,
    TLV_TRADE,
    Domain,
    ExecutionLogic,
    Live,
    Replay,
    Source,
    build_message,
    order_request,
    parse_message,
    subscribe_message,
)
from relay import AsyncRelayClient, Relay, RelayClient, query

STEP_NS = 1_000_000  # numbered frames are 1 ms apart in their header timestamps

# The seam tests.
JOINS = 30
REPLAY_LAST = 5_000
LIVE_AFTER = 1_000  # live messages each joiner checks after its marker
SEAM_RETAIN = 4 * REPLAY_LAST
NO_DROPS = 1_000_000  # a queue limit no joiner reaches while it reads


# ---------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------


def ts_of(seq: int) -> int:
    """The header timestamp of numbered frame ``seq``."""
    return TS + seq * STEP_NS


def trade_frame(seq: int, *, source: int = Source.BINANCE, ts: int | None = None) -> bytes:
    """A market data Trade numbered ``seq`` (74 bytes; its price and side follow ``seq``),
    stamped ``ts_of(seq)`` unless ``ts`` is given."""
    return trade_message(seq, source=source, price=PRICE + seq, side=seq % 2,
                         timestamp_ns=ts_of(seq) if ts is None else ts)


def gas_frame(seq: int, *, source: int = Source.POLYGON) -> bytes:
    """A market data GasPrice numbered ``seq`` (66 bytes) stamped ``ts_of(seq)``."""
    return gas_message(seq, source=source, block=19_000_000 + seq, timestamp_ns=ts_of(seq))


def mixed_frame(seq: int) -> bytes:
    """Odd numbers are Trades, even numbers GasPrices."""
    return trade_frame(seq) if seq % 2 else gas_frame(seq)


def order_frame(seq: int) -> bytes:
    """An execution OrderRequest numbered ``seq``, with the checksum the domain needs."""
    return build_message(Domain.EXECUTION, Source.PORTFOLIO_MANAGER, [
        order_request(seq, 0x1234, 4_500_000_000_000, 10)], sequence=seq,
        timestamp_ns=ts_of(seq), checksum=True)


def book_frame(seq: int, size: int) -> bytes:
    """A market data frame of ``size`` bytes (an OrderBook-typed TLV of filler; market
    data does not parse TLVs), for recordings of mixed frame sizes."""
    room = size - HEADER_SIZE
    value = bytes((seq + i) % 256 for i in range(room - 2 if room - 2 <= 255 else room - 5))
    frame = build_message(Domain.MARKET_DATA, Source.COINBASE, [(3, value)], sequence=seq,
                          timestamp_ns=ts_of(seq), flags=seq % 4)
    assert len(frame) == size
    return frame


def system_tlv(frame: bytes) -> tuple[int, bytes] | None:
    """The first TLV of a domain-4 frame (the relay's own), None for a data frame."""
    if domain_of(frame) != Domain.SYSTEM:
        return None
    tlvs = parse_message(frame)[1]
    return (tlvs[0][0], bytes(tlvs[0][1])) if tlvs else (0, b"")


def live_of(frame: bytes) -> Live | None:
    """The ``RELAY_LIVE`` value of a marker frame, None for any other frame."""
    tlv = system_tlv(frame)
    return logic.decode_live(tlv[1]) if tlv is not None and tlv[0] == RELAY_LIVE else None


def is_gap(frame: bytes) -> bool:
    return gap_of(frame) is not None


def seqs(frames: Iterable[bytes]) -> list[int]:
    return [sequence_of(frame) for frame in frames]


# ---------------------------------------------------------------------------------------
# Publishing and reading
# ---------------------------------------------------------------------------------------


def publish_chunks(running: RunningRelay, client: RelayClient,
                   chunks: Iterable[Sequence[bytes]]) -> None:
    """Send each chunk in one write and wait until the relay has read it, so each is one
    chunk of the fan-out (and of the ring)."""
    for chunk in chunks:
        expected = running.stats().messages_in + len(chunk)
        client.send_many(chunk)
        running.wait_for(lambda expected=expected: running.stats().messages_in >= expected)


def publish_each(running: RunningRelay, client: RelayClient, frames: Iterable[bytes]) -> None:
    """Send frames one chunk each."""
    publish_chunks(running, client, ([frame] for frame in frames))


def wait_read(running: RunningRelay, frames: int, before: int) -> None:
    """Wait until the relay has read ``frames`` more frames than ``before``."""
    running.wait_for(lambda: running.stats().messages_in >= before + frames)


def read_until_live(client: RelayClient, timeout: float = TIMEOUT_S) -> tuple[list[bytes], Live]:
    """The frames before the ``RELAY_LIVE`` marker (gap notices are a failure), and the
    marker's value."""
    deadline = time.monotonic() + timeout
    frames: list[bytes] = []
    while True:
        try:
            frame = client.recv(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise AssertionError(f"no RELAY_LIVE marker within {timeout} s; "
                                 f"{len(frames)} frames before it") from None
        live = live_of(frame)
        if live is not None:
            return frames, live
        assert not is_gap(frame), f"a gap notice after {len(frames)} frames of a replay"
        frames.append(frame)


def read_data(client: RelayClient, count: int, timeout: float = TIMEOUT_S) -> list[bytes]:
    """Exactly ``count`` data frames (a frame of the relay's own is a failure)."""
    deadline = time.monotonic() + timeout
    frames: list[bytes] = []
    while len(frames) < count:
        try:
            frame = client.recv(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise AssertionError(f"only {len(frames)} of {count} frames within "
                                 f"{timeout} s") from None
        assert domain_of(frame) != Domain.SYSTEM, (
            f"a frame of the relay's own ({system_tlv(frame)}) after {len(frames)} frames")
        frames.append(frame)
    return frames


def confirm_subscribed(client: RelayClient) -> dict[str, Any]:
    """Ask the relay about its clients on ``client``'s own connection: frames are read
    in order, so once the answer comes its RELAY_SUBSCRIBE is in force. Returns the
    report entry of ``client``; no data may come before the answer."""
    client.send(logic.query_message(logic.QUERY_CLIENTS))
    frame = client.recv()
    header, tlvs = parse_message(frame)
    assert header.relay_domain == Domain.SYSTEM and tlvs[0][0] == RELAY_REPORT, (
        f"a frame before the relay's answer: seq {header.sequence}")
    report: dict[str, Any] = logic.decode_report(tlvs)
    return next(c for c in report["clients"] if c["id"] == report["you"])


def client_info(running: RunningRelay, predicate: Callable[[dict[str, Any]], bool]) -> bool:
    """True if one of the relay's clients (as ``clients`` reports them) matches; asked
    over the socket, so the relay's own thread answers."""
    return any(predicate(c) for c in query(running.path, logic.QUERY_CLIENTS)["clients"])


def wait_replaying(running: RunningRelay) -> None:
    """Wait until some client's replay is still being fed (it does not read)."""
    running.wait_for(lambda: client_info(running, lambda c: bool(c["replaying"])))


class NumberedStream:
    """A publisher thread: frames numbered 1, 2, 3, ... in batches, continuously, until
    ``stop()`` (or ``limit``). ``published`` is the highest number sent so far."""

    def __init__(self, path: str, *, make: Callable[[int], bytes] = trade_frame,
                 batch: int = 100, pause_s: float = 0.0005, limit: int = 10_000_000) -> None:
        self.client = RelayClient(path, publish_only=True, timeout=TIMEOUT_S)
        self.make = make
        self.batch = batch
        self.pause_s = pause_s
        self.limit = limit
        self.published = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        make, seq = self.make, 0
        try:
            while not self.stopping.is_set() and seq < self.limit:
                count = min(self.batch, self.limit - seq)
                self.client.send_many([make(s) for s in range(seq + 1, seq + count + 1)])
                seq += count
                self.published = seq
                self.stopping.wait(self.pause_s)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def wait_published(self, count: int, timeout: float = TIMEOUT_S) -> None:
        wait_until(lambda: self.published >= count or self.error is not None,
                   f"the stream to publish {count}", timeout=timeout)
        assert self.error is None, f"the publisher failed: {self.error!r}"

    def stop(self) -> int:
        """Stop publishing; the highest number sent."""
        self.stopping.set()
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive(), "the publisher did not stop"
        self.client.close()
        assert self.error is None, f"the publisher failed: {self.error!r}"
        return self.published

    def __enter__(self) -> NumberedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(TIMEOUT_S)
        self.client.close()


# ---------------------------------------------------------------------------------------
# The seam: what a joiner received, and what exact means
# ---------------------------------------------------------------------------------------


@dataclass
class Seam:
    """What a joiner received around its replay, as sequence numbers."""

    prefix: list[int]  # live, before its replay (received before the request took effect)
    replayed: list[int]  # the replay: the last ``live.replayed`` data frames before the marker
    live: Live
    after: list[int] = field(default_factory=list)  # live, after the marker


def begin_seam(client: RelayClient, received: Sequence[int] = ()) -> Seam:
    """Read a joiner's replay and marker. ``received``: the numbers it had already read
    before it asked."""
    before, live = read_until_live(client)
    numbers = [*received, *seqs(before)]
    assert live.replayed <= len(numbers), f"marker says {live.replayed} replayed, got {numbers}"
    cut = len(numbers) - live.replayed
    return Seam(numbers[:cut], numbers[cut:], live)


def continue_seam(client: RelayClient, seam: Seam, *, live_after: int = 0,
                  until: int | None = None) -> Seam:
    """Read live traffic after the marker: ``live_after`` frames, or through ``until``."""
    deadline = time.monotonic() + TIMEOUT_S * 2

    def more() -> bool:
        if until is not None:
            return not seam.after or seam.after[-1] < until
        return len(seam.after) < live_after

    while more():
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"live traffic stalled after the marker: {describe_seam(seam)}"
        frames = client.recv_many(timeout=remaining)
        for frame in frames:
            assert domain_of(frame) != Domain.SYSTEM, (
                f"a frame of the relay's own after the marker: {system_tlv(frame)}")
        seam.after.extend(seqs(frames))
    return seam


def read_seam(client: RelayClient, *, live_after: int, received: Sequence[int] = ()) -> Seam:
    """A joiner's replay, marker, then ``live_after`` live frames."""
    return continue_seam(client, begin_seam(client, received), live_after=live_after)


def describe_seam(seam: Seam) -> str:
    def span(numbers: list[int]) -> str:
        return f"{numbers[0]}..{numbers[-1]} ({len(numbers)})" if numbers else "none"
    return (f"live first {span(seam.prefix)}, replayed {span(seam.replayed)}, "
            f"marker {tuple(seam.live)}, live after {span(seam.after)}")


def assert_exact_seam(seam: Seam, what: str = "the joiner") -> None:
    """Nothing twice, nothing missed: the replay, then what it had received live before
    its request took effect (if anything), then what came after the marker, are one run
    of consecutive numbers."""
    ordered = seam.replayed + seam.prefix + seam.after
    assert ordered, f"{what} received nothing"
    first = ordered[0]
    for index, number in enumerate(ordered):
        if number != first + index:
            duplicate = number in ordered[:index]
            raise AssertionError(
                f"{what}: {'a duplicate' if duplicate else 'a break'} at position {index}: "
                f"{ordered[max(0, index - 3):index + 3]}, expected {first + index}; "
                f"{describe_seam(seam)}")


# ---------------------------------------------------------------------------------------
# The seam: joining a fast numbered stream, three ways
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flavour:
    """A domain to run a seam test on. market_data with a queue no joiner fills: the
    whole replay is queued at once. execution with a queue of 1,000: the replay is fed
    500 at a time as the joiner drains, live traffic waits behind it, and backpressure
    (never loss) bounds what waits."""

    make_logic: Callable[[], logic.RelayLogic]
    queue_limit: int
    make: Callable[[int], bytes]


FLAVOURS = [
    pytest.param(Flavour(logic.MarketDataLogic, NO_DROPS, trade_frame), id="market_data"),
    pytest.param(Flavour(ExecutionLogic, 1_000, order_frame), id="execution-fed"),
]


def start_flavour(start_relay: StartRelay, flavour: Flavour) -> RunningRelay:
    return start_relay(flavour.make_logic(), retain=SEAM_RETAIN,
                       queue_limit=flavour.queue_limit)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_seam_new_connections_joining_a_fast_stream_get_every_number_once_across_the_marker(
        start_relay: StartRelay, flavour: Flavour) -> None:
    """30 new connections ask for the last 5,000 as their first frame while a publisher
    keeps publishing: each receives consecutive numbers through the replay, the marker
    and the live traffic after it, nothing twice, nothing missed. The last one stays
    until the publisher stops and ends exactly at its last number.

    A request sent with the connect can still race a few live messages when the relay
    accepts the connection before the request has arrived (SPEC); then the joiner gets
    those first and the replay leaves them out (still nothing twice, nothing missed). The
    relay reads a new client before it fans out to it, which makes that rare: at most a
    few of 30 here (without that read, about 1 in 5)."""
    running = start_flavour(start_relay, flavour)
    raced: list[str] = []
    with NumberedStream(running.path, make=flavour.make) as stream:
        stream.wait_published(REPLAY_LAST)
        for join in range(JOINS):
            with running.client(replay_last=REPLAY_LAST, gap_notices=True) as joiner:
                seam = read_seam(joiner, live_after=LIVE_AFTER)
            assert_exact_seam(seam, f"join {join}")
            assert seam.live == (REPLAY_LAST, 0), describe_seam(seam)
            if seam.prefix:
                raced.append(describe_seam(seam))
        with running.client(replay_last=REPLAY_LAST, gap_notices=True) as joiner:
            seam = continue_seam(joiner, begin_seam(joiner), live_after=LIVE_AFTER)
            end = stream.stop()
            continue_seam(joiner, seam, until=end)
            assert_nothing_more(joiner)
    assert_exact_seam(seam, "the joiner that stayed")
    assert seam.after[-1] == end
    assert len(raced) <= 3, f"{len(raced)} of {JOINS} joins raced live traffic: {raced}"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_seam_publish_only_clients_switching_to_receive_with_a_replay_get_every_number_once(
        start_relay: StartRelay, flavour: Flavour) -> None:
    """30 publish-only clients (confirmed publish-only before the stream starts) switch,
    one after another, to receive everything with a replay of the last 5,000: the
    replay, the marker and the live traffic are one consecutive run, with nothing live
    before the replay."""
    running = start_flavour(start_relay, flavour)
    clients = [running.client(publish_only=True) for _ in range(JOINS)]
    try:
        for client in clients:
            assert confirm_subscribed(client)["mode"] == logic.SUBSCRIBE_NONE
        with NumberedStream(running.path, make=flavour.make) as stream:
            stream.wait_published(REPLAY_LAST)
            for join, client in enumerate(clients):
                stream.wait_published(stream.published + 500)
                client.send(subscribe_message(SUBSCRIBE_ALL, gap_notices=True,
                                              replay=Replay(REPLAY_LAST, 0)))
                seam = read_seam(client, live_after=LIVE_AFTER)
                client.close()
                assert not seam.prefix, describe_seam(seam)
                assert_exact_seam(seam, f"switch {join}")
                assert seam.live == (REPLAY_LAST, 0), describe_seam(seam)
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_seam_a_client_that_received_live_then_asks_for_a_replay_gets_nothing_twice(
        start_relay: StartRelay, flavour: Flavour) -> None:
    """A mode-0 client reads live traffic for a while, then subscribes again (mode 0)
    with a replay: the replay leaves out everything it already received and brings what
    came before, ending right where its live traffic began; after the marker the live
    traffic continues where it left off."""
    rng = random.Random(12)
    running = start_flavour(start_relay, flavour)
    with NumberedStream(running.path, make=flavour.make) as stream:
        stream.wait_published(2 * REPLAY_LAST)
        for join in range(10):
            last = rng.choice([0, 100, REPLAY_LAST])
            with running.client() as client:
                early = seqs(read_data(client, rng.randint(1, 3_000)))
                client.send(subscribe_message(SUBSCRIBE_ALL, gap_notices=True,
                                              replay=Replay(last, 0)))
                seam = read_seam(client, live_after=LIVE_AFTER, received=early)
            what = f"join {join} (last {last})"
            assert seam.prefix[:len(early)] == early, describe_seam(seam)
            assert_exact_seam(seam, what)
            assert seam.live.replayed == (last or len(seam.replayed)), what
            assert seam.live.unavailable == 0, what
            assert seam.replayed, f"{what}: nothing replayed: {describe_seam(seam)}"


@pytest.mark.parametrize("first, then", [
    pytest.param([TLV_TRADE], None, id="trades-then-everything"),
    pytest.param(None, [TLV_GAS_PRICE], id="everything-then-gas-prices"),
])
def test_seam_a_client_changing_its_subscription_with_a_replay_gets_each_message_once(
        start_relay: StartRelay, first: list[int] | None, then: list[int] | None) -> None:
    """On a stream of Trades (odd numbers) and GasPrices (even), a client subscribed one
    way reads live, then subscribes another way with a replay of everything retained:
    what it received live is left out (for a Trades-only client, that is the Trades
    only: the GasPrices it did not receive then are replayed), so over both
    subscriptions it gets each message it asked for exactly once."""
    running = start_relay(retain=1_000_000, queue_limit=NO_DROPS)
    with NumberedStream(running.path, make=mixed_frame, batch=20, pause_s=0.001) as stream:
        for join in range(5):
            stream.wait_published(stream.published + 2_000)
            with running.client(subscribe=first) as client:
                early = seqs(read_data(client, 500))
                mode = SUBSCRIBE_ALL if then is None else SUBSCRIBE_TYPES
                client.send(subscribe_message(mode, then or (), gap_notices=True,
                                              replay=Replay(0, 0)))
                before, live = read_until_live(client)
                after = seqs(read_data(client, 500))
            what = f"join {join}"
            numbers = early + seqs(before)
            replayed = numbers[len(numbers) - live.replayed:]
            everything = numbers + after
            assert len(set(everything)) == len(everything), f"{what}: a message twice"
            assert replayed == sorted(replayed), f"{what}: the replay is out of order"
            if first is not None:  # Trades, then everything
                assert set(everything) == set(range(1, max(everything) + 1)), what
                assert after == list(range(max(numbers) + 1, max(numbers) + 1 + len(after)))
            else:  # everything, then GasPrices
                gas = [n for n in everything if n % 2 == 0]
                assert all(n % 2 == 0 for n in replayed + after), what
                assert set(gas) == set(range(2, max(everything) + 1, 2)), what
                assert max(replayed, default=0) < min(early), (
                    f"{what}: replayed what it had received live")


def test_a_replay_request_sent_with_the_connect_is_read_before_any_live_traffic_reaches_it(
        socket_path: str) -> None:
    """Connections waiting when the relay starts: a publisher that sent 1..10, then a
    joiner that asked for a replay, then a publisher that sent 11..20. The relay reads
    each new client before it fans out to it, so the joiner gets 1..10, the marker,
    then 11..20 (not 11..20 first as a mode-0 client it would be until its request is
    read)."""
    relay = Relay(logic.MarketDataLogic(), socket_path=socket_path, stats_interval=0,
                  retain=100)
    first = RelayClient(socket_path, publish_only=True, timeout=TIMEOUT_S)
    joiner = RelayClient(socket_path, replay_last=0, timeout=TIMEOUT_S)
    second = RelayClient(socket_path, publish_only=True, timeout=TIMEOUT_S)
    first.send_many([trade_frame(n) for n in range(1, 11)])
    second.send_many([trade_frame(n) for n in range(11, 21)])
    running = RunningRelay(relay)
    try:
        before, live = read_until_live(joiner)
        assert seqs(before) == list(range(1, 11))
        assert live == (10, 0)
        assert seqs(read_data(joiner, 10)) == list(range(11, 21))
    finally:
        for client in (first, joiner, second):
            client.close()
        running.stop()


def test_a_replay_request_arriving_just_after_accept_still_comes_before_live_traffic(
        start_relay: StartRelay) -> None:
    running = start_relay(retain=100)
    with running.client(publish_only=True) as publisher:
        publish_each(running, publisher, [trade_frame(n) for n in range(1, 11)])
        with running.client() as joiner:  # sends nothing on connect
            running.wait_clients(2)
            publish_each(running, publisher, [trade_frame(11)])
            joiner.send(subscribe_message(SUBSCRIBE_ALL, replay=Replay(0, 0)))
            before, live = read_until_live(joiner)
            publish_each(running, publisher, [trade_frame(12)])
            # 11 arrived while the relay held the joiner's live data for its request:
            # it is either in the replay or the first live message after the marker.
            after = read_data(joiner, 12 - len(before))
    numbers = seqs(before + after)
    assert numbers == list(range(1, 13)), f"received {numbers}, marker {tuple(live)}"


# ---------------------------------------------------------------------------------------
# Retention: what the ring keeps
# ---------------------------------------------------------------------------------------


def test_with_retention_off_a_replay_request_gets_an_empty_replay_and_all_of_last_unavailable(
        start_relay: StartRelay) -> None:
    running = start_relay()
    assert running.relay.history is None
    with running.client(publish_only=True) as publisher:
        publish_each(running, publisher, [trade_frame(n) for n in range(1, 6)])
        with running.client(replay_last=7) as joiner, \
                running.client(replay_since_ns=ts_of(1)) as unbounded:
            assert read_until_live(joiner) == ([], (0, 7))
            assert read_until_live(unbounded) == ([], (0, 0))  # no count: none missing
            publisher.send(trade_frame(6))
            assert joiner.recv() == trade_frame(6)
            assert unbounded.recv() == trade_frame(6)


def test_retain_n_keeps_at_least_the_last_n_messages_and_at_most_one_chunk_more(
        start_relay: StartRelay) -> None:
    rng = random.Random(7)
    running = start_relay(retain=100)
    history = running.relay.history
    assert history is not None
    sent = 0
    with running.client(publish_only=True) as publisher:
        while sent < 1_000:
            size = rng.randint(1, 20)
            publish_chunks(running, publisher, [[trade_frame(sent + i + 1) for i in range(size)]])
            sent += size
            if sent >= 100:
                assert 100 <= history.messages <= 100 + 19, (sent, history.messages)
            else:
                assert history.messages == sent
        retained = history.messages
        with running.client(replay_last=0) as everything, \
                running.client(replay_last=100) as hundred, \
                running.client(replay_last=150) as more:
            frames, live = read_until_live(everything)
            assert seqs(frames) == list(range(sent - retained + 1, sent + 1))
            assert live == (retained, 0)
            frames, live = read_until_live(hundred)
            assert seqs(frames) == list(range(sent - 99, sent + 1))
            assert live == (100, 0)
            frames, live = read_until_live(more)
            assert seqs(frames) == list(range(sent - retained + 1, sent + 1))
            assert live == (retained, 150 - retained)


def test_retain_bytes_is_a_hard_bound_on_the_ring(start_relay: StartRelay) -> None:
    """Frames of mixed sizes in chunks of 1..10: the ring never holds more than
    ``retain_bytes`` (nor does the relay's report say so), and a replay of everything
    is the most recent frames, up to that many bytes."""
    rng = random.Random(8)
    bound = 65_536  # the smallest bound: one read
    running = start_relay(retain=1_000_000, retain_bytes=bound)
    history = running.relay.history
    assert history is not None
    sent: list[bytes] = []
    with running.client(publish_only=True) as publisher:
        for _ in range(1200):
            chunk = [mixed_frame(len(sent) + i + 1) for i in range(rng.randint(1, 10))]
            publish_chunks(running, publisher, [chunk])
            sent.extend(chunk)
            assert history.bytes <= bound
            assert sum(map(len, sent)) <= bound or history.bytes > bound - 10 * 74
        report = query(running.path, logic.QUERY_STATS)["relay"]
        assert report["retain_bytes"] == bound
        assert report["retained_bytes"] == history.bytes <= bound
        with running.client(replay_last=0) as joiner:
            frames, live = read_until_live(joiner)
    assert frames == sent[len(sent) - len(frames):]
    assert sum(map(len, frames)) == history.bytes
    assert live == (len(frames), 0)
    assert report["retained_messages"] == len(frames)


def test_a_replay_honours_the_joiners_subscription_to_tlv_types(
        start_relay: StartRelay) -> None:
    running = start_relay(retain=100)
    with running.client(publish_only=True) as publisher:
        publish_chunks(running, publisher, [[mixed_frame(n) for n in range(1, 11)],
                                            [mixed_frame(n) for n in range(11, 21)]])
        with running.client(subscribe=[TLV_GAS_PRICE], replay_last=3) as gas, \
                running.client(subscribe=[TLV_TRADE], replay_last=0) as trades:
            frames, live = read_until_live(gas)
            assert seqs(frames) == [16, 18, 20]
            assert live == (3, 0)
            frames, live = read_until_live(trades)
            assert seqs(frames) == list(range(1, 21, 2))
            assert live == (10, 0)
            publish_each(running, publisher, [mixed_frame(21), mixed_frame(22)])
            assert seqs(read_data(gas, 1)) == [22]
            assert seqs(read_data(trades, 1)) == [21]
            assert_nothing_more(gas)
            assert_nothing_more(trades)


def test_a_replay_leaves_out_the_joiners_own_messages(start_relay: StartRelay) -> None:
    """A publish-only client that published the odd numbers switches to receive with a
    replay: it gets the even numbers another client published, never its own back, and
    its own are not counted as unavailable (nothing left the ring)."""
    running = start_relay(retain=100)
    with running.client(publish_only=True) as me, running.client(publish_only=True) as other:
        for n in range(1, 21):
            publish_each(running, me if n % 2 else other,
                         [trade_frame(n, source=Source.KRAKEN if n % 2 else Source.BINANCE)])
        me.send(subscribe_message(SUBSCRIBE_ALL, replay=Replay(15, 0)))
        frames, live = read_until_live(me)
        assert seqs(frames) == list(range(2, 21, 2))
        assert {source_of(frame) for frame in frames} == {Source.BINANCE}
        assert live == (10, 0)
        publish_each(running, me, [trade_frame(21)])
        publish_each(running, other, [trade_frame(22)])
        assert seqs(read_data(me, 1)) == [22]


@pytest.mark.parametrize("last, since, expected", [
    pytest.param(10, 0, range(41, 51), id="last-10"),
    pytest.param(0, 30, range(30, 51), id="since-30"),
    pytest.param(10, 45, range(45, 51), id="last-10-since-45"),
    pytest.param(10, 30, range(41, 51), id="last-10-since-30"),
    pytest.param(0, 0, range(1, 51), id="everything"),
    pytest.param(0, 51, range(0), id="since-the-future"),
    pytest.param(1_000, 0, range(1, 51), id="more-than-retained"),
])
def test_replay_last_and_since_ns_bound_what_is_replayed(
        start_relay: StartRelay, last: int, since: int, expected: range) -> None:
    """50 numbered frames (timestamps 1 ms apart) in chunks of 10: the replay holds those
    among the ``last`` most recent whose timestamp is at least ``since_ns``; nothing
    left the ring, so nothing is unavailable."""
    running = start_relay(retain=1_000)
    with running.client(publish_only=True) as publisher:
        publish_chunks(running, publisher,
                       [[trade_frame(n) for n in range(c, c + 10)] for c in range(1, 51, 10)])
        options: dict[str, int] = {"replay_last": last}
        if since:
            options["replay_since_ns"] = ts_of(since)
        with running.client(**options) as joiner:
            frames, live = read_until_live(joiner)
    assert seqs(frames) == list(expected)
    assert frames == [trade_frame(n) for n in expected]  # byte for byte
    assert live == (len(expected), 0)


@pytest.mark.parametrize("last, replayed, unavailable", [
    (15, 10, 5), (100, 10, 20), (10, 10, 0), (5, 5, 0), (0, 10, 0),
])
def test_unavailable_counts_what_was_asked_for_but_had_left_the_ring(
        start_relay: StartRelay, last: int, replayed: int, unavailable: int) -> None:
    """A ring of 10 after 30 single messages: 20 have left it."""
    running = start_relay(retain=10)
    with running.client(publish_only=True) as publisher:
        publish_each(running, publisher, [trade_frame(n) for n in range(1, 31)])
        assert running.relay.history is not None
        assert running.relay.history.messages == 10
        with running.client(replay_last=last) as joiner:
            frames, live = read_until_live(joiner)
    assert seqs(frames) == list(range(31 - replayed, 31))
    assert live == (replayed, unavailable)


def test_a_time_bound_inside_the_ring_reports_nothing_unavailable(
        start_relay: StartRelay) -> None:
    running = start_relay(retain=5)
    with running.client(publish_only=True) as publisher:
        publish_each(running, publisher, [trade_frame(n) for n in range(1, 11)])
        with running.client(replay_last=5, replay_since_ns=ts_of(9)) as joiner:
            frames, live = read_until_live(joiner)
    assert seqs(frames) == [9, 10]  # 6, 7, 8 are retained, only older than asked
    assert live == (2, 0)


def test_control_frames_gap_notices_and_refused_frames_are_never_retained(
        start_relay: StartRelay) -> None:
    """Between data messages the ring sees a RELAY_QUERY, RELAY_SUBSCRIBEs, a frame of
    another domain (filtered), a bridge's RELAY_GAP (which makes gap notices for a
    gap-notice client): a replay holds the data messages alone, a bridge's included."""
    running = start_relay(retain=1_000)
    history = running.relay.history
    assert history is not None
    with running.client(publish_only=True) as publisher, \
            running.client(bridge=True, publish_only=True) as bridge, \
            running.client(gap_notices=True) as watcher:
        confirm_subscribed(watcher)
        publish_each(running, publisher, [trade_frame(n) for n in range(1, 6)])
        before = running.stats()
        publisher.send_many([
            logic.query_message(logic.QUERY_STATS),
            subscribe_message(logic.SUBSCRIBE_NONE),
            subscribe_message(logic.SUBSCRIBE_NONE, gap_notices=True),
            build_message(Domain.SIGNAL, Source.ARBITRAGE_STRATEGY,
                          [logic.signal_identity(1, 2)], sequence=99),
        ])
        wait_read(running, 4, before.messages_in)
        assert running.stats().messages_filtered == before.messages_filtered + 1
        bridge.send(logic.gap_message(3, 3, source=Source.KRAKEN))
        publish_each(running, bridge, [trade_frame(n, source=Source.KRAKEN)
                                       for n in range(6, 9)])
        publish_each(running, publisher, [trade_frame(n) for n in range(9, 11)])
        watched = [watcher.recv() for _ in range(11)]  # 10 data frames, 1 notice
        gaps = [frame for frame in watched if is_gap(frame)]
        assert len(gaps) == 1, "the bridge's upstream loss made no gap notice"
        assert history.messages == 10
        with running.client(replay_last=0, gap_notices=True) as joiner:
            frames, live = read_until_live(joiner)
    assert seqs(frames) == list(range(1, 11))
    assert all(domain_of(frame) == Domain.MARKET_DATA for frame in frames)
    assert live == (10, 0)


# ---------------------------------------------------------------------------------------
# Large replays: fed as the joiner drains
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overflow", ["drop_oldest", "disconnect"])
@pytest.mark.parametrize("queue_limit, queue_bytes", [
    pytest.param(50, 64 * 1024 * 1024, id="50-messages"),
    pytest.param(10_000, 4_096, id="4-KiB"),
])
def test_a_replay_larger_than_the_queue_limit_loses_nothing_and_keeps_the_seam(
        start_relay: StartRelay, overflow: str, queue_limit: int, queue_bytes: int) -> None:
    """20,000 retained messages (in chunks of 500, each far over the limit) to a joiner
    whose queue holds 50 (or 4 KiB), that has not read yet while 10 live messages
    arrive: it gets all 20,000, the marker, the 10 live ones; no gap, no drop, no
    disconnect."""
    running = start_relay(retain=20_000, queue_limit=queue_limit, queue_bytes=queue_bytes,
                          overflow=overflow)
    with running.client(publish_only=True) as publisher:
        publish_chunks(running, publisher, [[trade_frame(n) for n in range(c, c + 500)]
                                            for c in range(1, 20_001, 500)])
        with running.client(replay_last=0, gap_notices=True) as joiner:
            wait_replaying(running)
            publish_each(running, publisher, [trade_frame(n) for n in range(20_001, 20_011)])
            seam = read_seam(joiner, live_after=10)
            assert_nothing_more(joiner)
    assert_exact_seam(seam)
    assert seam.replayed[0] == 1 and seam.after[-1] == 20_010
    assert seam.live == (20_000, 0)
    stats = running.stats()
    assert stats.messages_dropped == 0
    assert stats.slow_disconnects == 0


def test_a_second_replay_request_while_the_first_is_still_fed_is_refused_and_counted_invalid(
        start_relay: StartRelay) -> None:
    running = start_relay(retain=20_000, queue_limit=50)
    with running.client(publish_only=True) as publisher:
        publish_chunks(running, publisher, [[trade_frame(n) for n in range(c, c + 1_000)]
                                            for c in range(1, 20_001, 1_000)])
        with running.client(replay_last=0) as joiner:
            wait_replaying(running)
            invalid = running.stats().messages_invalid
            joiner.send(subscribe_message(SUBSCRIBE_ALL, replay=Replay(0, 0)))
            running.wait_for(lambda: running.stats().messages_invalid == invalid + 1)
            frames, live = read_until_live(joiner)
            assert seqs(frames) == list(range(1, 20_001))
            assert live == (20_000, 0)
            publish_each(running, publisher, [trade_frame(20_001)])
            assert seqs(read_data(joiner, 1)) == [20_001]  # no second replay, no marker
            assert_nothing_more(joiner)


def test_a_refused_replay_request_leaves_the_subscription_as_it_was(
        start_relay: StartRelay) -> None:
    running = start_relay(retain=20_000, queue_limit=50)
    with running.client(publish_only=True) as publisher:
        publish_chunks(running, publisher, [[trade_frame(n) for n in range(c, c + 1_000)]
                                            for c in range(1, 20_001, 1_000)])
        with running.client(replay_last=0) as joiner:
            wait_replaying(running)
            invalid = running.stats().messages_invalid
            joiner.send(subscribe_message(SUBSCRIBE_TYPES, [TLV_GAS_PRICE],
                                          replay=Replay(0, 0)))
            running.wait_for(lambda: running.stats().messages_invalid == invalid + 1)
            publish_each(running, publisher, [trade_frame(20_001)])
            frames, live = read_until_live(joiner)
            assert live == (20_000, 0)
            assert seqs(read_data(joiner, 1, timeout=1.0)) == [20_001]


def test_a_client_asking_for_a_replay_again_later_gets_nothing_twice(
        start_relay: StartRelay) -> None:
    running = start_relay(retain=100)
    with running.client(publish_only=True) as publisher:
        publish_each(running, publisher, [trade_frame(n) for n in range(1, 11)])
        with running.client(replay_last=0) as joiner:
            frames, live = read_until_live(joiner)
            assert (seqs(frames), live) == (list(range(1, 11)), (10, 0))
            publish_each(running, publisher, [trade_frame(11)])
            assert seqs(read_data(joiner, 1)) == [11]
            joiner.send(subscribe_message(SUBSCRIBE_ALL, replay=Replay(0, 0)))
            frames, live = read_until_live(joiner)
    assert seqs(frames) == [], f"received again: {seqs(frames)}"
    assert live == (0, 0)


class Collector:
    """A consumer thread: reads data frames until it has ``count`` (or times out)."""

    def __init__(self, client: RelayClient, count: int, timeout: float) -> None:
        self.client = client
        self.count = count
        self.timeout = timeout
        self.numbers: list[int] = []
        self.done_at = 0.0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            while len(self.numbers) < self.count:
                frames = self.client.recv_many(timeout=max(0.0, deadline - time.monotonic()))
                self.numbers.extend(sequence_of(f) for f in frames
                                    if domain_of(f) != Domain.SYSTEM)
            self.done_at = time.monotonic()
        except BaseException as exc:
            self.error = exc

    def join(self) -> list[int]:
        self.thread.join(self.timeout + TIMEOUT_S)
        assert not self.thread.is_alive(), "the consumer did not finish"
        assert self.error is None, f"the consumer got {len(self.numbers)}: {self.error!r}"
        return self.numbers


def test_on_a_backpressure_domain_a_joiner_that_never_reads_its_replay_holds_others_back_at_most_stall_timeout(  # noqa: E501
        start_relay: StartRelay) -> None:
    """Execution (backpressure): a joiner asks for 20,000 retained orders and never
    reads. Live orders held behind its replay pause the relay; after ``stall_timeout``
    without progress it is disconnected and the consumer that does read gets every
    order, in order, none lost."""
    stall = 0.5
    running = start_relay(ExecutionLogic(), retain=20_000, queue_limit=100,
                          stall_timeout=stall)
    with running.client(publish_only=True) as publisher, running.client() as consumer:
        collector = Collector(consumer, 21_000, timeout=TIMEOUT_S * 3)
        publish_chunks(running, publisher, [[order_frame(n) for n in range(c, c + 500)]
                                            for c in range(1, 20_001, 500)])
        with running.client(replay_last=0) as joiner:
            wait_replaying(running)
            started = time.monotonic()
            for c in range(20_001, 21_001, 100):
                publisher.send_many([order_frame(n) for n in range(c, c + 100)])
            numbers = collector.join()
            held_back = collector.done_at - started
            stats = running.stats()
            assert stats.backpressure_pauses >= 1, "the joiner never held the relay back"
            assert stats.slow_disconnects == 1
            with pytest.raises((EOFError, ConnectionError)):
                for _ in range(30_000):
                    joiner.recv()
    assert numbers == list(range(1, 21_001))
    assert stall <= held_back < stall + TIMEOUT_S, held_back


def test_a_replay_to_a_bridge_leaves_out_what_other_bridges_published(
        start_relay: StartRelay) -> None:
    running = start_relay(retain=100)
    with running.client(bridge=True, publish_only=True) as bridge, \
            running.client(publish_only=True) as local:
        for n in range(1, 21):
            publish_each(running, bridge if n % 2 else local,
                         [trade_frame(n, source=Source.KRAKEN if n % 2 else Source.BINANCE)])
        with running.client(bridge=True, replay_last=0) as other_bridge, \
                running.client(replay_last=0) as consumer:
            frames, live = read_until_live(other_bridge)
            assert seqs(frames) == list(range(2, 21, 2))
            assert live == (10, 0)
            frames, live = read_until_live(consumer)
            assert seqs(frames) == list(range(1, 21))
            assert live == (20, 0)
            publish_each(running, bridge, [trade_frame(21, source=Source.KRAKEN)])
            publish_each(running, local, [trade_frame(22)])
            assert seqs(read_data(other_bridge, 1)) == [22]
            assert seqs(read_data(consumer, 2)) == [21, 22]


def test_a_client_that_stops_being_a_bridge_is_replayed_what_other_bridges_published(
        start_relay: StartRelay) -> None:
    """A bridge-role client received the local messages (even numbers) live, never what
    another bridge published (odd). Subscribing again as an ordinary client with a
    replay, it gets the odd numbers, and the even ones not again."""
    running = start_relay(retain=100)
    with running.client(bridge=True, publish_only=True) as other_bridge, \
            running.client(publish_only=True) as local, \
            running.client(bridge=True) as switching:
        confirm_subscribed(switching)
        for n in range(1, 21):
            publish_each(running, other_bridge if n % 2 else local,
                         [trade_frame(n, source=Source.KRAKEN if n % 2 else Source.BINANCE)])
        assert seqs(read_data(switching, 10)) == list(range(2, 21, 2))
        switching.send(subscribe_message(SUBSCRIBE_ALL, replay=Replay(0, 0)))
        frames, live = read_until_live(switching)
        assert seqs(frames) == list(range(1, 20, 2))
        assert live == (10, 0)


def test_a_relay_stopping_during_a_replay_drains_the_replay_the_marker_and_what_was_held(
        start_relay: StartRelay) -> None:
    running = start_relay(retain=20_000, queue_limit=50)
    with running.client(publish_only=True) as publisher:
        publish_chunks(running, publisher, [[trade_frame(n) for n in range(c, c + 1_000)]
                                            for c in range(1, 20_001, 1_000)])
        with running.client(replay_last=0, gap_notices=True) as joiner:
            wait_replaying(running)
            publish_each(running, publisher, [trade_frame(n) for n in range(20_001, 20_006)])
            running.relay.shutdown()
            seam = read_seam(joiner, live_after=5)
            with pytest.raises(EOFError):
                joiner.recv()
    running.thread.join(TIMEOUT_S)
    assert_exact_seam(seam)
    assert (seam.replayed[0], seam.after[-1], seam.live) == (1, 20_005, (20_000, 0))


def test_the_asyncio_client_takes_the_same_replay_options(start_relay: StartRelay) -> None:
    running = start_relay(retain=100)
    with running.client(publish_only=True) as publisher:
        publish_chunks(running, publisher, [[trade_frame(n) for n in range(1, 11)]])

        async def join() -> tuple[list[bytes], Live, bytes]:
            client = await AsyncRelayClient.connect(running.path, replay_last=5,
                                                    replay_since_ns=ts_of(8),
                                                    timeout=TIMEOUT_S)
            async with client:
                frames: list[bytes] = []
                while True:
                    frame = await client.recv(timeout=TIMEOUT_S)
                    live = live_of(frame)
                    if live is not None:
                        break
                    frames.append(frame)
                await asyncio.to_thread(publish_each, running, publisher, [trade_frame(11)])
                return frames, live, await client.recv(timeout=TIMEOUT_S)

        frames, live, after = asyncio.run(join())
    assert seqs(frames) == [8, 9, 10]
    assert live == (3, 0)
    assert after == trade_frame(11)


# ---------------------------------------------------------------------------------------
# The command line: tail --last, record, replay
# ---------------------------------------------------------------------------------------

LIVE_LINE = re.compile(r"LIVE: the replay held (\d+) messages \((\d+) asked for were no "
                       r"longer retained(?: \(does the relay run with --retain\?\))?\); "
                       r"live traffic follows")
RECORDED = re.compile(r"recorded (\d+) frames \((\d+) bytes\) to (\S+) in [\d.]+ s; "
                      r"stopped: (.+)")
REPLAYED = re.compile(r"replayed (\d+) messages of (\S+) to (\S+) in [\d.]+ s \((\d+) of "
                      r"the relay's own frames skipped\)")


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def read_lines(path: str) -> list[str]:
    return read_bytes(path).decode("utf-8", "replace").splitlines()


def write_file(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_tail_last_n_prints_the_last_n_retained_then_a_live_line_then_live_traffic(
        cli: Cli, start_relay: StartRelay, socket_path: str, socket_dir: str) -> None:
    running = start_relay(retain=100)
    out_path = os.path.join(socket_dir, "tail.out")
    with running.client(publish_only=True) as publisher:
        publish_chunks(running, publisher, [[trade_frame(n) for n in range(1, 11)]])
        with open(out_path, "w") as out_file:
            tail = cli("tail", "--socket", socket_path, "--last", "3", stdout=out_file)
        wait_until(lambda: len(read_lines(out_path)) >= 4, "tail to print the replay")
        publish_each(running, publisher, [trade_frame(11)])
        wait_until(lambda: len(read_lines(out_path)) >= 5, "tail to print live traffic")
        tail.send_signal(signal.SIGINT)
        code, _, err = finish(tail)
    assert code == 0, err
    lines = read_lines(out_path)
    assert len(lines) == 5, lines
    for line, seq in zip(lines[:3], (8, 9, 10), strict=True):
        assert f"seq={seq} " in line and "Trade(" in line, line
    match = LIVE_LINE.search(lines[3])
    assert match and match.groups() == ("3", "0"), lines[3]
    assert "seq=11 " in lines[4], lines[4]


def test_tail_last_on_a_relay_without_retention_says_all_it_asked_for_is_unavailable(
        cli: Cli, start_relay: StartRelay, socket_path: str) -> None:
    start_relay()
    code, out, err = finish(cli("tail", "--socket", socket_path, "--last", "5",
                                "--count", "1"))
    assert code == 0, err
    match = LIVE_LINE.search(out)
    assert match and match.groups() == ("0", "5"), out


def test_a_relay_started_with_retain_on_the_command_line_serves_tail_last(
        cli: Cli, socket_path: str) -> None:
    relay = cli("--socket", socket_path, "--stats-interval", "0", "--retain", "1000",
                "--retain-bytes", "1000000")
    wait_for_socket(socket_path)
    code, out, err = finish(cli("send", "--socket", socket_path, "--count", "20"))
    assert code == 0, err
    code, out, err = finish(cli("tail", "--socket", socket_path, "--last", "5", "--count", "6"))
    assert code == 0, err
    lines = out.splitlines()
    assert [re.findall(r"seq=(\d+) ", line) for line in lines[:5]] == [
        [str(n)] for n in range(16, 21)], out
    match = LIVE_LINE.search(lines[5])
    assert match and match.groups() == ("5", "0"), lines[5]
    relay_info = query(socket_path, logic.QUERY_STATS)["relay"]
    assert (relay_info["retain"], relay_info["retain_bytes"]) == (1000, 1_000_000)
    assert relay_info["retained_messages"] == 20
    relay.send_signal(signal.SIGTERM)
    assert finish(relay)[0] == 0


def varied_frames() -> list[bytes]:
    """Frames a recording must keep byte for byte: Trades and GasPrices of several
    sources, frames of several sizes (up to an extended TLV), flags, odd timestamps."""
    rng = random.Random(31)
    frames: list[bytes] = []
    for seq in range(1, 121):
        kind = rng.randrange(4)
        if kind == 0:
            frames.append(trade_frame(seq, source=rng.choice(list(Source)[:5]),
                                      ts=TS + rng.randrange(10**12)))
        elif kind == 1:
            frames.append(gas_frame(seq))
        else:
            frames.append(book_frame(seq, rng.choice([40, 100, 300, 1_000, 5_000])))
    return frames


def test_record_then_replay_into_a_fresh_relay_and_record_again_is_byte_identical(
        cli: Cli, start_relay: StartRelay, socket_dir: str) -> None:
    """``record`` writes the frames as received; ``replay --speed 0`` (reading the file
    from stdin) publishes them again into a fresh relay, where a second ``record``
    (to stdout) writes the very same bytes."""
    frames = varied_frames()
    first_path, second_path = (os.path.join(socket_dir, name) for name in ("1.sock", "2.sock"))
    first_file, second_file = (os.path.join(socket_dir, name) for name in ("1.torq", "2.torq"))
    first = start_relay(socket_path=first_path)
    recorder = cli("--socket", first_path, "record", first_file, "--count", str(len(frames)))
    wait_subscribed(first)
    with first.client(publish_only=True) as publisher:
        publish_chunks(first, publisher, [frames[:1], frames[1:50], frames[50:]])
    code, _, err = finish(recorder)
    assert code == 0, err
    assert read_bytes(first_file) == b"".join(frames)
    match = RECORDED.search(err)
    assert match, err
    assert match.groups() == (str(len(frames)), str(len(b"".join(frames))), first_file,
                              f"--count {len(frames)}")

    second = start_relay(socket_path=second_path)
    with open(second_file, "wb") as out:
        recorder = cli("--socket", second_path, "record", "-", "--count", str(len(frames)),
                       stdout=out)
    wait_subscribed(second)
    with open(first_file, "rb") as source:
        player = cli("--socket", second_path, "replay", "-", "--speed", "0", stdin=source)
    code, out_text, err = finish(player)
    assert code == 0, err
    match = REPLAYED.search(out_text)
    assert match and match.group(1) == str(len(frames)) and match.group(4) == "0", out_text
    code, _, err = finish(recorder)
    assert code == 0, err
    assert read_bytes(second_file) == read_bytes(first_file)


def arrival_spread(cli: Cli, running: RunningRelay, recording: str, count: int,
                   *options: str) -> float:
    """Replay ``recording`` with ``options``; seconds from the first frame's arrival at
    a consumer to the last's."""
    accepted = running.stats().connections_total
    with running.client() as consumer:
        running.wait_clients(accepted + 1)
        player = cli("--socket", running.path, "replay", recording, *options)
        first = consumer.recv(timeout=TIMEOUT_S)
        first_at = time.monotonic()
        rest = read_data(consumer, count - 1)
        last_at = time.monotonic()
        code, _, err = finish(player)
    assert code == 0, err
    assert [first, *rest] == split_frames(read_bytes(recording))[:count]
    return last_at - first_at


def test_replay_paces_frames_by_their_header_timestamps_or_a_fixed_rate(
        cli: Cli, start_relay: StartRelay, socket_dir: str) -> None:
    """Three frames 0.3 s apart in their timestamps take about 0.6 s to arrive at
    ``--speed 1``, about 0.3 s at ``--speed 2``, next to nothing at ``--speed 0``;
    ``--rate 10`` spaces five frames 0.1 s apart whatever their timestamps."""
    running = start_relay()
    paced = write_file(os.path.join(socket_dir, "paced.torq"), b"".join(
        trade_frame(n, ts=TS + n * 300_000_000) for n in range(3)))
    assert arrival_spread(cli, running, paced, 3, "--speed", "1") >= 0.5
    assert arrival_spread(cli, running, paced, 3) >= 0.5  # --speed 1 is the default
    assert arrival_spread(cli, running, paced, 3, "--speed", "2") >= 0.25
    assert arrival_spread(cli, running, paced, 3, "--speed", "0") < 0.3
    same_time = write_file(os.path.join(socket_dir, "same.torq"), b"".join(
        trade_frame(n, ts=TS) for n in range(5)))
    assert arrival_spread(cli, running, same_time, 5, "--rate", "10") >= 0.35


def test_record_max_bytes_stops_before_the_limit_with_whole_frames_only(
        cli: Cli, start_relay: StartRelay, socket_dir: str) -> None:
    rng = random.Random(5)
    frames = [book_frame(n, rng.choice([40, 74, 100, 300])) for n in range(1, 41)]
    limit = 2_000
    fits = max(k for k in range(len(frames) + 1) if sum(map(len, frames[:k])) <= limit)
    assert sum(map(len, frames[:fits])) < limit
    running = start_relay()
    recording = os.path.join(socket_dir, "capped.torq")
    recorder = cli("--socket", running.path, "record", recording, "--max-bytes", str(limit))
    wait_subscribed(running)
    with running.client(publish_only=True) as publisher:
        publish_chunks(running, publisher, [frames[i:i + 4] for i in range(0, 40, 4)])
    code, _, err = finish(recorder)
    assert code == 0, err
    assert read_bytes(recording) == b"".join(frames[:fits])
    match = RECORDED.search(err)
    assert match, err
    assert match.groups() == (str(fits), str(sum(map(len, frames[:fits]))), recording,
                              f"--max-bytes {limit}")


def test_record_max_bytes_smaller_than_the_first_frame_writes_nothing(
        cli: Cli, start_relay: StartRelay, socket_dir: str) -> None:
    running = start_relay()
    recording = os.path.join(socket_dir, "tiny.torq")
    recorder = cli("--socket", running.path, "record", recording, "--max-bytes", "73")
    wait_subscribed(running)
    with running.client(publish_only=True) as publisher:
        publisher.send(trade_frame(1))
        code, _, err = finish(recorder)
    assert code == 0, err
    assert read_bytes(recording) == b""
    assert "recorded 0 frames (0 bytes)" in err and "stopped: --max-bytes 73" in err


def test_record_count_n_writes_exactly_n_frames(
        cli: Cli, start_relay: StartRelay, socket_dir: str) -> None:
    running = start_relay()
    recording = os.path.join(socket_dir, "four.torq")
    recorder = cli("--socket", running.path, "record", recording, "--count", "4")
    wait_subscribed(running)
    frames = [trade_frame(n) for n in range(1, 11)]
    with running.client(publish_only=True) as publisher:
        publisher.send_many(frames)
        code, _, err = finish(recorder)
    assert code == 0, err
    assert read_bytes(recording) == b"".join(frames[:4])
    assert "recorded 4 frames (296 bytes)" in err and "stopped: --count 4" in err


def test_record_duration_stops_after_that_long_with_what_arrived(
        cli: Cli, start_relay: StartRelay, socket_dir: str) -> None:
    running = start_relay()
    recording = os.path.join(socket_dir, "timed.torq")
    started = time.monotonic()
    recorder = cli("--socket", running.path, "record", recording, "--duration", "1")
    wait_subscribed(running)
    frames = [trade_frame(n) for n in range(1, 4)]
    with running.client(publish_only=True) as publisher:
        publisher.send_many(frames)
        code, _, err = finish(recorder)
    assert code == 0, err
    assert time.monotonic() - started >= 1.0
    assert read_bytes(recording) == b"".join(frames)
    assert "recorded 3 frames" in err and "stopped: --duration 1 s" in err


def test_record_type_keeps_only_messages_of_that_type(
        cli: Cli, start_relay: StartRelay, socket_dir: str) -> None:
    running = start_relay()
    recording = os.path.join(socket_dir, "gas.torq")
    recorder = cli("--socket", running.path, "record", recording, "--type", "GasPrice",
                   "--count", "3")
    wait_subscribed(running)
    with running.client(publish_only=True) as publisher:
        publisher.send_many([mixed_frame(n) for n in range(1, 11)])
        code, _, err = finish(recorder)
    assert code == 0, err
    assert read_bytes(recording) == b"".join(gas_frame(n) for n in (2, 4, 6))


def test_record_last_n_begins_with_the_retained_messages_and_the_marker(
        cli: Cli, start_relay: StartRelay, socket_dir: str) -> None:
    running = start_relay(retain=100)
    recording = os.path.join(socket_dir, "joined.torq")
    with running.client(publish_only=True) as publisher:
        publish_chunks(running, publisher, [[trade_frame(n) for n in range(1, 11)]])
        read = running.stats().messages_in
        recorder = cli("--socket", running.path, "record", recording, "--last", "3",
                       "--count", "5")
        running.wait_for(lambda: running.stats().connections_active >= 2
                         and running.stats().messages_in >= read + 1)  # its subscribe
        publish_each(running, publisher, [trade_frame(11)])
        code, _, err = finish(recorder)
    assert code == 0, err
    recorded = split_frames(read_bytes(recording))
    assert [live_of(frame) for frame in recorded] == [None, None, None, (3, 0), None]
    assert [recorded[i] for i in (0, 1, 2, 4)] == [trade_frame(n) for n in (8, 9, 10, 11)]


def test_a_recording_shows_its_holes_and_replaying_it_skips_the_relays_own_frames(
        cli: Cli, start_relay: StartRelay, socket_dir: str) -> None:
    """A recorder stopped (SIGSTOP) behind a drop_oldest relay with a tiny queue loses
    messages: its recording holds the gap notices where they were, and its frames plus
    the notices' counts are everything sent. Replayed into a fresh relay, only the data
    frames are published, byte for byte."""
    first_path, second_path = (os.path.join(socket_dir, name) for name in ("1.sock", "2.sock"))
    first = start_relay(socket_path=first_path, queue_limit=4)
    recording = os.path.join(socket_dir, "holes.torq")
    recorder = cli("--socket", first_path, "record", recording)
    sent = publish_past_a_stopped_consumer(first, recorder, trade_frame)
    first.wait_for(lambda: query(first_path, logic.QUERY_STATS)["relay"][
        "pending_messages"] == 0)
    first.stop()
    code, _, err = finish(recorder)
    assert code == 0, err
    assert "stopped: the relay stopped" in err
    recorded = split_frames(read_bytes(recording))
    gaps = [gap for gap in map(gap_of, recorded) if gap is not None]
    data = [f for f in recorded if domain_of(f) != Domain.SYSTEM]
    assert gaps, "no gap notice in the recording"
    assert len(data) + sum(g.dropped for g in gaps) == sent
    assert seqs(data) == sorted(seqs(data))

    second = start_relay(socket_path=second_path)
    replayed_file = os.path.join(socket_dir, "again.torq")
    again = cli("--socket", second_path, "record", replayed_file, "--count", str(len(data)))
    wait_subscribed(second)
    code, out, err = finish(cli("--socket", second_path, "replay", recording, "--speed", "0"))
    assert code == 0, err
    match = REPLAYED.search(out)
    assert match and match.group(1) == str(len(data)), out
    assert match.group(4) == str(len(gaps)), out
    code, _, err = finish(again)
    assert code == 0, err
    assert read_bytes(replayed_file) == b"".join(data)


def test_replay_skips_gap_notices_and_markers_in_a_recording(
        cli: Cli, start_relay: StartRelay, socket_dir: str) -> None:
    recording = write_file(os.path.join(socket_dir, "marked.torq"), b"".join([
        trade_frame(1), logic.gap_message(5, 5, sequence=1), trade_frame(2),
        logic.live_message(2, 0, sequence=2), gas_frame(3)]))
    running = start_relay()
    with running.client() as consumer:
        code, out, err = finish(cli("--socket", running.path, "replay", recording,
                                    "--speed", "0"))
        assert code == 0, err
        assert read_data(consumer, 3) == [trade_frame(1), trade_frame(2), gas_frame(3)]
        assert_nothing_more(consumer)
    match = REPLAYED.search(out)
    assert match and (match.group(1), match.group(4)) == ("3", "2"), out


@pytest.mark.parametrize("ending, offset_frames, expected", [
    pytest.param(trade_frame(99)[:40], 5,
                 r"ends in the middle of a frame at offset 370 \(40 bytes of it\): truncated",
                 id="truncated"),
    pytest.param(b"\x01\x02\x03", 5,
                 r"ends in the middle of a frame at offset 370 \(3 bytes of it\): truncated",
                 id="a-few-stray-bytes"),
    pytest.param(random.Random(3).randbytes(200), 5,
                 r"is not a recording of whole frames: bad magic 0x[0-9a-f]{8} at offset 370",
                 id="garbage"),
    pytest.param(trade_frame(99)[:24] + b"\xff\xff\xff\x7f" + bytes(100), 5,
                 r"a \d+-byte frame at offset 370 is over \d+ bytes: not a recording",
                 id="a-huge-frame-header"),
])
def test_replay_of_a_broken_recording_sends_the_whole_frames_before_it_then_exits_1_naming_the_offset(  # noqa: E501
        cli: Cli, start_relay: StartRelay, socket_dir: str, ending: bytes,
        offset_frames: int, expected: str) -> None:
    frames = [trade_frame(n) for n in range(1, offset_frames + 1)]
    recording = write_file(os.path.join(socket_dir, "broken.torq"), b"".join(frames) + ending)
    running = start_relay()
    with running.client() as consumer:
        code, out, err = finish(cli("--socket", running.path, "replay", recording,
                                    "--speed", "0"))
        assert code == 1, (out, err)
        assert read_data(consumer, len(frames)) == frames
        assert_nothing_more(consumer)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("relay.py: error: ") and recording in lines[0], err
    assert re.search(expected, lines[0]), err
    assert f"the {len(frames)} messages before it were sent" in lines[0], err
    assert "Traceback" not in err


def test_replay_of_garbage_from_its_first_byte_sends_nothing_and_exits_1_at_offset_0(
        cli: Cli, start_relay: StartRelay, socket_dir: str) -> None:
    recording = write_file(os.path.join(socket_dir, "garbage.torq"),
                           b"this is not a recording of frames, just some text\n" * 4)
    running = start_relay()
    with running.client() as consumer:
        code, _, err = finish(cli("--socket", running.path, "replay", recording))
        assert code == 1, err
        assert_nothing_more(consumer)
    assert len(err.strip().splitlines()) == 1, err
    assert "bad magic" in err and "at offset 0" in err and "the 0 messages" in err, err


def test_replay_into_a_relay_that_refuses_the_frames_exits_1_saying_so(
        cli: Cli, start_relay: StartRelay, socket_dir: str) -> None:
    """A recording of signal frames replayed into a market data relay: the relay filters
    every frame, and replay asks it afterwards and says so."""
    recording = write_file(os.path.join(socket_dir, "signals.torq"), b"".join(
        build_message(Domain.SIGNAL, Source.ARBITRAGE_STRATEGY, [logic.signal_identity(n, 7)],
                      sequence=n, timestamp_ns=ts_of(n)) for n in range(1, 4)))
    running = start_relay()
    with running.client() as consumer:
        code, _, err = finish(cli("--socket", running.path, "replay", recording,
                                  "--speed", "0"))
        assert_nothing_more(consumer)
    assert code == 1, err
    assert "refused 3 of 3 messages" in err and "3 filtered" in err, err
    assert running.stats().messages_filtered == 3


def test_replay_refused_by_the_domain_filter_names_the_domain_of_the_recorded_frames(
        cli: Cli, start_relay: StartRelay, socket_dir: str) -> None:
    recording = write_file(os.path.join(socket_dir, "signals.torq"), b"".join(
        build_message(Domain.SIGNAL, Source.ARBITRAGE_STRATEGY, [logic.signal_identity(n, 7)],
                      sequence=n, timestamp_ns=ts_of(n)) for n in range(1, 4)))
    running = start_relay()
    code, _, err = finish(cli("--socket", running.path, "replay", recording, "--speed", "0"))
    assert code == 1, err
    assert "these were market_data" not in err and "domain 2" in err, err


@pytest.mark.parametrize("command", [
    pytest.param(("record", "{dir}/missing/out.torq"), id="record-to-a-missing-directory"),
    pytest.param(("replay", "{dir}/missing.torq"), id="replay-of-a-missing-file"),
])
def test_record_and_replay_name_a_file_they_cannot_use_in_one_line_and_exit_1(
        cli: Cli, start_relay: StartRelay, socket_dir: str, command: tuple[str, str]) -> None:
    start_relay()
    name, path = command[0], command[1].format(dir=socket_dir)
    code, _, err = finish(cli("--socket", os.path.join(socket_dir, "relay.sock"), name, path))
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and path in lines[0], err
    assert re.search(r"cannot (write|read)", lines[0]), err


@pytest.mark.parametrize("name", ["record", "replay"])
def test_record_and_replay_with_no_relay_exit_1_saying_no_relay_is_listening(
        cli: Cli, socket_dir: str, name: str) -> None:
    recording = write_file(os.path.join(socket_dir, "one.torq"), trade_frame(1))
    target = recording if name == "replay" else os.path.join(socket_dir, "out.torq")
    code, _, err = finish(cli("--socket", os.path.join(socket_dir, "none.sock"), name, target))
    assert code == 1, err
    assert "no relay is listening" in err and len(err.strip().splitlines()) == 1, err


def test_replay_paces_a_recording_whose_first_timestamp_is_zero(
        cli: Cli, start_relay: StartRelay, socket_dir: str) -> None:
    running = start_relay()
    # Stamped 0, 0.8 and 0.9 s: paced, 0.9 s from first to last; as the bug has it, 0.1 s.
    paced = write_file(os.path.join(socket_dir, "zero.torq"), b"".join(
        trade_frame(n, ts=ts) for n, ts in enumerate((0, 800_000_000, 900_000_000))))
    assert arrival_spread(cli, running, paced, 3, "--speed", "1") >= 0.75


# ---------------------------------------------------------------------------------------
# What a hostile review found: replays and the join grace under pressure
# ---------------------------------------------------------------------------------------


def test_live_data_over_the_limit_during_a_replay_loses_only_the_overflow(
        start_relay: StartRelay) -> None:
    """A joiner still being fed a replay gets 101 live messages with room for 100: it
    loses one (told by a gap notice), not the whole queue held behind the replay."""
    running = start_relay(retain=100_000, queue_limit=100)
    with running.client(publish_only=True) as publisher:
        publish_chunks(running, publisher, [[trade_frame(n) for n in range(1, 3001)]])
        joiner = connect_raw(running.path)  # asks and does not read yet
        joiner.sendall(subscribe_message(SUBSCRIBE_ALL, gap_notices=True,
                                         replay=Replay(0, 0)))
        running.wait_for(lambda: client_info(running, lambda c: c["replaying"]))
        publish_each(running, publisher, [trade_frame(n) for n in range(3001, 3102)])
        running.wait_for(lambda: running.stats().messages_dropped >= 1)
    frames: list[bytes] = []
    data = b""
    joiner.settimeout(TIMEOUT_S)
    while len(frames) < 3000 + 1 + 100 + 1:  # replay, marker, live, one gap notice
        data += joiner.recv(1 << 20)
        frames = split_frames(data)
    joiner.close()
    gaps = [gap_of(f) for f in frames if gap_of(f) is not None]
    assert running.stats().messages_dropped == 1 and [g.dropped for g in gaps] == [1]
    assert len([f for f in frames if domain_of(f) != Domain.SYSTEM]) == 3000 + 100


@pytest.mark.parametrize("make_logic", [logic.MarketDataLogic, logic.SignalLogic],
                         ids=["drop_oldest", "disconnect"])
def test_the_join_grace_never_makes_a_new_consumer_slow(
        start_relay: StartRelay, make_logic: Callable[[], logic.RelayLogic]) -> None:
    """A new client that sends nothing has its live data held for a moment (a replay
    request may be on its way): a burst over its queue limit in that moment ends the
    hold early instead of dropping or disconnecting it."""
    running = start_relay(make_logic(), retain=1000, queue_limit=100)
    frame = trade_frame if make_logic is logic.MarketDataLogic else (
        lambda n: build_message(Domain.SIGNAL, 20, [logic.signal_identity(n, 20)],
                                sequence=n, timestamp_ns=ts_of(n), checksum=True))
    with running.client(publish_only=True) as publisher:
        consumer = running.client()
        running.wait_clients(2)
        publisher.send_many(frame(n) for n in range(1, 151))  # within the 20 ms grace
        got = read_data(consumer, 150)
        consumer.close()
    assert seqs(got) == list(range(1, 151))
    assert running.stats().messages_dropped == 0 and running.stats().slow_disconnects == 0


def test_a_replay_is_chosen_a_turn_at_a_time_and_the_relay_keeps_serving_meanwhile(
        start_relay: StartRelay) -> None:
    """Choosing a replay from a large ring is spread over loop turns: while a joiner's
    filtered replay of 200,000 retained messages is still being chosen, other clients'
    messages keep flowing; then the joiner gets exactly what it asked for."""
    running = start_relay(retain=1_000_000, queue_limit=1_000_000)
    with running.client(publish_only=True) as publisher, running.client() as other:
        publish_chunks(running, publisher, [[mixed_frame(n) for n in range(a, a + 1000)]
                                            for a in range(1, 200_001, 1000)])
        read_data_any(other, 200_000)
        joiner = running.client(subscribe=[logic.TLV_GAS_PRICE], replay_since_ns=ts_of(1))
        running.wait_for(lambda: running.relay.selections or client_info(
            running, lambda c: c["replaying"] or c["pending_messages"]))
        publish_each(running, publisher, [trade_frame(200_001)])
        assert seqs(read_data(other, 1)) == [200_001]
        before, live = read_until_live(joiner)
        joiner.close()
    assert seqs(before) == list(range(2, 200_001, 2)) and live == (100_000, 0)


def read_data_any(client: RelayClient, count: int) -> None:
    """Read ``count`` data frames in batches (checks nothing)."""
    got = 0
    while got < count:
        got += len(client.recv_many(timeout=TIMEOUT_S))


def test_a_replay_takes_the_rings_own_chunks_and_copies_frames_only_as_it_feeds_them(
        start_relay: StartRelay) -> None:
    """What a replay picks is the ring's own chunk objects, whole or as spans of frames:
    a joiner that never reads pins the ring, not copies of it."""
    running = start_relay(retain=100_000)
    history = running.relay.history
    assert history is not None
    with running.client(publish_only=True) as publisher:
        publish_chunks(running, publisher, [[mixed_frame(n) for n in range(a, a + 100)]
                                            for a in range(1, 1001, 100)])
        with running.client(subscribe=[logic.TLV_TRADE], replay_last=0) as joiner:
            wait_subscribed(running, 2)
            selection = relay.ReplaySelection(history, next(
                c for c in running.relay.clients.values() if c.mode == logic.SUBSCRIBE_TYPES),
                Replay(0, 0), [], [], 0)
            assert selection.step(10**9)
            ring = {id(chunk) for chunk, *_ in history.chunks}
            assert all(id(chunk) in ring and spans is not None
                       for chunk, _, spans in selection.pieces())
            before, live = read_until_live(joiner)
    assert seqs(before) == list(range(1, 1001, 2)) and live == (500, 0)


def test_a_client_whose_history_is_forgotten_gets_nothing_twice_from_a_later_replay(
        start_relay: StartRelay) -> None:
    """A client that changes its subscription more often than the relay remembers
    (256 stretches) still never gets a message twice from a replay: what the relay
    forgot it received is not offered again, and is counted unavailable."""
    running = start_relay(retain=1_000_000, queue_limit=1_000_000)
    received: list[int] = []
    with running.client(publish_only=True) as publisher, running.client() as client:
        running.wait_clients(2)
        sequence = 0
        for change in range(300):
            sequence += 1
            publish_each(running, publisher, [trade_frame(sequence)])
            if change % 2 == 0:
                received += seqs(read_data(client, 1))
            mode = SUBSCRIBE_NONE if change % 2 == 0 else SUBSCRIBE_ALL
            before = running.stats().messages_in
            client.send(subscribe_message(mode))
            wait_read(running, 1, before)  # read: in force before the next message
        client.send(subscribe_message(SUBSCRIBE_ALL, replay=Replay(0, 0)))
        before, live = read_until_live(client)
    replayed = seqs(before)
    assert not set(replayed) & set(received), "a message twice"
    assert len(replayed) + len(received) <= sequence


def test_unavailable_never_counts_the_joiners_own_messages(start_relay: StartRelay) -> None:
    running = start_relay(retain=10)
    with running.client() as publisher:
        publish_each(running, publisher, [trade_frame(n) for n in range(1, 61)])
        publisher.send(subscribe_message(SUBSCRIBE_ALL, replay=Replay(10, 0)))
        before, live = read_until_live(publisher)
    assert before == [] and live == (0, 0)
