"""Soak: mixed traffic on all three domains for a while; the accounting must balance.

    python soak.py                # 60 s (make soak)
    python soak.py --seconds 20   # shorter

Three relay processes (``python relay.py``) on temp sockets: market_data
(drop_oldest), signal (disconnect) and execution (backpressure). Each gets

- two numbering publishers (publish-only): a fast one and a steady one;
- a fast consumer and a slow one that stay connected (execution: a bursty one);
- a churning consumer that connects, reads a little and leaves, again and again;
- a churning publisher (publish-only) that connects, sends a few messages and leaves.

Every publisher numbers its messages 1, 2, 3, ... under its own source id. Consumers
check that each source's numbers only go up (and, where nothing may be dropped, go up
by exactly one), count what they receive, add up the RELAY_GAP notices (market data)
and notice their own disconnect (signal). At the end the publishers stop, every
consumer still connected reads until it has accounted for everything sent, and the
relays are stopped with SIGTERM. The table must balance: received + dropped = sent for
every consumer that stayed connected, and nothing lost in the execution domain.
Exit code 0 if it balances, 1 if not.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import logic
from logic import HEADER, RELAY_GAP, Domain, build_message, decode_gap, parse_message
from relay import RelayClient

HERE = os.path.dirname(os.path.abspath(__file__))
TIMESTAMP_NS = 1_700_000_000_000_000_000
CONNECT_TIMEOUT_S = 5.0
DRAIN_DEADLINE_S = 60.0  # at the end, how long consumers may take to read what is left
DRAIN_IDLE_S = 10.0  # ... and how long they may wait for a message that never comes
REPORT_INTERVAL_S = 10.0

@dataclass(frozen=True)
class DomainPlan:
    """Per domain: relay options, the publishers' rates (msg/s, 0 = as fast as the relay
    takes them), and how the slow consumer reads (a pause after every N messages)."""

    options: tuple[str, ...]
    fast_rate: float
    steady_rate: float
    slow_every: int
    slow_pause_s: float
    slow_name: str


DOMAINS = {
    "market_data": DomainPlan(("--queue-limit", "2000"), 0, 5000, 20, 0.01, "consumer-slow"),
    "signal": DomainPlan(("--queue-limit", "1000"), 3000, 1000, 10, 0.1, "consumer-slow"),
    "execution": DomainPlan(("--queue-limit", "2000"), 0, 5000, 2000, 0.1, "consumer-bursty"),
}
SOURCES = {"pub-fast": 101, "pub-steady": 102, "pub-churn": 103}


def message(domain: str, source: int, sequence: int, connection: int = 0) -> bytes:
    """A valid message of ``domain`` numbered ``sequence`` from ``source``; the
    timestamp carries the publisher's ``connection`` number (the relay keeps order
    within one connection, not across a publisher's successive connections)."""
    if domain == "signal":
        tlvs = [logic.signal_identity(sequence, source, 1, 90)]
        number, checksum = Domain.SIGNAL, True
    elif domain == "execution":
        tlvs = [logic.order_request(sequence, 0x1234, 4_500_000_000_000, 100, sequence % 2)]
        number, checksum = Domain.EXECUTION, True
    else:
        tlvs = [logic.trade(0x1234, 4_500_000_000_000 + sequence, 100_000_000, TIMESTAMP_NS,
                            100, 50, sequence % 2)]
        number, checksum = Domain.MARKET_DATA, False
    return build_message(number, source, tlvs, sequence=sequence,
                         timestamp_ns=TIMESTAMP_NS + connection, checksum=checksum)


# ---------------------------------------------------------------------------------------
# Relay processes
# ---------------------------------------------------------------------------------------

STATS_LINE = re.compile(r"final stats: clients \d+ active, (\d+) total, (\d+) rejected \| "
                        r"in (\d+) msg .*? \| out (\d+) deliveries .*? \| filtered (\d+), "
                        r"invalid (\d+), protocol errors (\d+) \| dropped (\d+), "
                        r"slow disconnects (\d+), backpressure pauses (\d+)")
STATS_FIELDS = ("connections", "rejected", "in", "out", "filtered", "invalid",
                "protocol_errors", "dropped", "slow_disconnects", "backpressure_pauses")


class RelayProcess:
    def __init__(self, domain: str, directory: str, options: tuple[str, ...]) -> None:
        self.domain = domain
        self.path = os.path.join(directory, f"{domain}.sock")
        self.log_path = os.path.join(directory, f"{domain}.log")
        with open(self.log_path, "w") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "relay.py"), "--domain", domain,
                 "--socket", self.path, "--stats-interval", "0", *options],
                stdout=subprocess.DEVNULL, stderr=log_file, cwd=HERE)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not os.path.exists(self.path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {domain} relay did not start:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> tuple[int | None, dict[str, int]]:
        """SIGTERM; the exit code and the final stats."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(CONNECT_TIMEOUT_S * 2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        match = STATS_LINE.search(self.log())
        stats = dict(zip(STATS_FIELDS, map(int, match.groups()), strict=True)) if match else {}
        return code, stats


# ---------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the accounting table."""

    domain: str
    client: str
    role: str
    sent: int | None = None
    received: int = 0
    dropped: int = 0
    disconnected: bool = False
    errors: list[str] = field(default_factory=list)
    must_balance: bool = False


class Publisher(threading.Thread):
    """Publish-only; numbers its messages. ``rate`` 0 = as fast as the relay takes them."""

    def __init__(self, row: Row, path: str, source: int, rate: float,
                 stop: threading.Event) -> None:
        super().__init__(daemon=True, name=f"{row.domain}/{row.client}")
        self.row = row
        self.source = source
        self.rate = rate
        self.stop = stop
        self.client = RelayClient(path, publish_only=True, timeout=None)
        self.row.sent = 0

    def run(self) -> None:
        batch = 100 if self.rate == 0 else max(1, int(self.rate // 100))
        started = time.monotonic()
        sequence = 0
        try:
            while not self.stop.is_set():
                self.client.send_many(message(self.row.domain, self.source, s)
                                      for s in range(sequence + 1, sequence + batch + 1))
                sequence += batch
                self.row.sent = sequence
                if self.rate:
                    delay = started + sequence / self.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                else:
                    time.sleep(0.001)  # leave the GIL to the consumers now and then
        except OSError as exc:
            self.row.errors.append(f"publisher: {exc!r}")
            self.row.disconnected = True
        finally:
            self.client.close()


class ChurningPublisher(threading.Thread):
    """Connects (publish-only), sends 1-50 numbered messages, leaves; again and again.
    Its numbers continue across connections."""

    def __init__(self, row: Row, path: str, source: int, stop: threading.Event,
                 rng: random.Random) -> None:
        super().__init__(daemon=True, name=f"{row.domain}/{row.client}")
        self.row = row
        self.path = path
        self.source = source
        self.stop = stop
        self.rng = rng
        self.sessions = 0
        self.row.sent = 0

    def run(self) -> None:
        sequence = 0
        try:
            while not self.stop.is_set():
                n = self.rng.randint(1, 50)
                with RelayClient(self.path, publish_only=True,
                                 timeout=CONNECT_TIMEOUT_S * 4) as client:
                    client.send_many(message(self.row.domain, self.source, s, self.sessions)
                                     for s in range(sequence + 1, sequence + n + 1))
                sequence += n
                self.row.sent = sequence
                self.sessions += 1
                time.sleep(self.rng.uniform(0.0, 0.05))
        except OSError as exc:
            self.row.errors.append(f"churning publisher: {exc!r}")


class Tally:
    """What one connection received: order checks per publisher connection (source and
    connection number), duplicate checks per source, and gap notices."""

    def __init__(self, row: Row, strict: bool) -> None:
        self.row = row
        self.strict = strict  # nothing may be dropped: numbers go up by exactly one
        self.last: dict[tuple[int, int], int] = {}
        self.churned: set[int] = set()  # numbers seen from the churning publisher

    def count(self, frame: bytes) -> None:
        header = HEADER.unpack_from(frame)
        domain, source, sequence = header[1], header[3], header[5]
        key = (source, header[6] - TIMESTAMP_NS)
        if domain == Domain.SYSTEM:
            tlvs = parse_message(frame).tlvs
            if tlvs and tlvs[0][0] == RELAY_GAP:
                self.row.dropped += decode_gap(tlvs[0][1]).dropped
                return
            self.row.errors.append(f"unexpected system frame {tlvs[:1]}")
            return
        if sequence == 0:
            return  # a hello
        churned = source == SOURCES["pub-churn"]
        if churned:
            if sequence in self.churned:
                self.row.errors.append(f"source {source}: {sequence} twice")
            self.churned.add(sequence)
        last = self.last.get(key)
        if last is not None and sequence <= last:
            self.row.errors.append(f"source {source}: {sequence} after {last} "
                                   "(duplicate or reordered)")
        elif self.strict and last is not None and sequence != last + 1:
            self.row.errors.append(f"source {source}: {sequence} after {last} (lost)")
        elif (self.strict and last is None and self.row.must_balance and not churned
              and sequence != 1):
            self.row.errors.append(f"source {source}: first message {sequence}, not 1")
        self.last[key] = sequence
        self.row.received += 1


class Consumer(threading.Thread):
    """Stays connected; reads (with pauses if slow) until told how much was sent and it
    has accounted for all of it, or until the relay disconnects it."""

    def __init__(self, row: Row, path: str, strict: bool, pause: tuple[int, float]) -> None:
        super().__init__(daemon=True, name=f"{row.domain}/{row.client}")
        self.row = row
        self.tally = Tally(row, strict)
        self.every, self.pause_s = pause
        self.client = RelayClient(path, gap_notices=True, timeout=CONNECT_TIMEOUT_S)
        self.target: int | None = None
        self.deadline = float("inf")

    def run(self) -> None:
        row = self.row
        last_progress = time.monotonic()
        try:
            while self.target is None or row.received + row.dropped < self.target:
                now = time.monotonic()
                if now > self.deadline or (self.target is not None
                                           and now - last_progress > DRAIN_IDLE_S):
                    row.errors.append(f"accounted for {row.received + row.dropped} of "
                                      f"{self.target}: the rest never came")
                    return
                try:
                    frame = self.client.recv(timeout=0.2)
                except TimeoutError:
                    continue
                except (EOFError, ConnectionError):
                    row.disconnected = True
                    return
                last_progress = time.monotonic()
                before = row.received
                self.tally.count(frame)
                if self.every and row.received != before and row.received % self.every == 0:
                    time.sleep(self.pause_s)
        except Exception as exc:
            row.errors.append(f"consumer: {exc!r}")
        finally:
            self.client.close()


class ChurningConsumer(threading.Thread):
    """Connects, reads for 0.05-0.5 s, leaves; again and again (joins mid-stream)."""

    def __init__(self, row: Row, path: str, strict: bool, stop: threading.Event,
                 rng: random.Random) -> None:
        super().__init__(daemon=True, name=f"{row.domain}/{row.client}")
        self.row = row
        self.path = path
        self.strict = strict
        self.stop = stop
        self.rng = rng
        self.sessions = 0

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                tally = Tally(self.row, self.strict)  # order checks per connection
                until = time.monotonic() + self.rng.uniform(0.05, 0.5)
                with RelayClient(self.path, gap_notices=True,
                                 timeout=CONNECT_TIMEOUT_S) as client:
                    self.sessions += 1
                    while time.monotonic() < until:
                        try:
                            tally.count(client.recv(timeout=0.05))
                        except TimeoutError:
                            continue
                        except (EOFError, ConnectionError):
                            self.row.disconnected = True
                            break
                time.sleep(self.rng.uniform(0.0, 0.05))
        except Exception as exc:
            self.row.errors.append(f"churning consumer: {exc!r}")


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def handshake(publisher: Publisher, consumers: list[Consumer]) -> None:
    """A hello (sequence 0) until every consumer has one: from then on all are served."""
    waiting = list(consumers)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while waiting:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{[c.name for c in waiting]} never got a hello")
        publisher.client.send(message(publisher.row.domain, publisher.source, 0))
        for consumer in list(waiting):
            try:
                consumer.client.recv(timeout=0.1)
                waiting.remove(consumer)
            except TimeoutError:
                pass


def format_table(rows: list[Row], verdicts: dict[int, str]) -> str:
    def cell(value: int | None) -> str:
        return "-" if value is None else f"{value:,}"

    header = ("domain", "client", "role", "sent", "received", "dropped", "disconnected",
              "balance")
    lines = [header]
    for index, row in enumerate(rows):
        consumer = row.role.startswith("consumer") or row.role.startswith("churning c")
        lines.append((row.domain, row.client, row.role, cell(row.sent),
                      cell(row.received) if consumer else "-",
                      cell(row.dropped) if consumer else "-",
                      "yes" if row.disconnected else "no", verdicts[index]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {3, 4, 5}
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(line, widths, strict=True))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def run(seconds: float, seed: int) -> int:
    rng = random.Random(seed)
    directory = tempfile.mkdtemp(prefix="torq-soak-")
    relays: dict[str, RelayProcess] = {}
    stop = threading.Event()
    rows: list[Row] = []
    publishers: list[Publisher] = []
    consumers: list[Consumer] = []
    churners: list[threading.Thread] = []
    sent_by_domain: dict[str, list[Row]] = {}
    try:
        for domain, plan in DOMAINS.items():
            relays[domain] = relay = RelayProcess(domain, directory, plan.options)
            strict = domain != "market_data"
            fast = Row(domain, "consumer-fast", "consumer", must_balance=True)
            slow = Row(domain, plan.slow_name, "consumer (slow)", must_balance=True)
            domain_consumers = [Consumer(fast, relay.path, strict, (0, 0.0)),
                                Consumer(slow, relay.path, strict,
                                         (plan.slow_every, plan.slow_pause_s))]
            pub_rows = [Row(domain, "pub-fast", "publisher (publish-only)"),
                        Row(domain, "pub-steady", "publisher (publish-only)")]
            domain_publishers = [
                Publisher(pub_rows[0], relay.path, SOURCES["pub-fast"], plan.fast_rate, stop),
                Publisher(pub_rows[1], relay.path, SOURCES["pub-steady"], plan.steady_rate,
                          stop)]
            handshake(domain_publishers[0], domain_consumers)
            churn_pub = Row(domain, "pub-churn", "churning publisher (publish-only)")
            churn_con = Row(domain, "consumer-churn", "churning consumer")
            churners += [ChurningPublisher(churn_pub, relay.path, SOURCES["pub-churn"], stop,
                                           random.Random(rng.random())),
                         ChurningConsumer(churn_con, relay.path, strict, stop,
                                          random.Random(rng.random()))]
            rows += [*pub_rows, churn_pub, fast, slow, churn_con]
            sent_by_domain[domain] = [*pub_rows, churn_pub]
            publishers += domain_publishers
            consumers += domain_consumers

        print(f"soak: {seconds:g} s on market_data, signal and execution "
              f"(sockets in {directory}, seed {seed})", flush=True)
        for thread in [*consumers, *publishers, *churners]:
            thread.start()
        started = time.monotonic()
        next_report = started + REPORT_INTERVAL_S
        while time.monotonic() - started < seconds:
            time.sleep(min(0.5, max(0.0, seconds - (time.monotonic() - started))))
            if time.monotonic() >= next_report:
                next_report += REPORT_INTERVAL_S
                parts = []
                for domain in DOMAINS:
                    sent = sum(r.sent or 0 for r in sent_by_domain[domain])
                    got = [r.received for r in rows
                           if r.domain == domain and r.must_balance]
                    parts.append(f"{domain} sent {sent:,} received {got}")
                print(f"  {time.monotonic() - started:4.0f} s: " + "; ".join(parts),
                      flush=True)
            dead = [d for d, r in relays.items() if r.process.poll() is not None]
            if dead:
                print(f"soak: relay {dead} exited early", flush=True)
                break

        print("soak: stopping publishers, draining consumers", flush=True)
        stop.set()
        for thread in [*publishers, *churners]:
            thread.join(CONNECT_TIMEOUT_S * 6)
        deadline = time.monotonic() + DRAIN_DEADLINE_S
        for consumer in consumers:
            consumer.every = 0  # slow consumers read at full speed from now on
            consumer.deadline = deadline
            consumer.target = sum(r.sent or 0 for r in sent_by_domain[consumer.row.domain])
            consumer.row.sent = consumer.target
        for consumer in consumers:
            consumer.join(DRAIN_DEADLINE_S + 5)
            if consumer.is_alive():
                consumer.row.errors.append("still reading after the drain deadline")
    finally:
        stop.set()
        results = {domain: relay.stop() for domain, relay in relays.items()}

    # -- the verdicts ----------------------------------------------------------------------
    verdicts: dict[int, str] = {}
    problems: list[str] = []
    for index, row in enumerate(rows):
        if row.errors:
            verdicts[index] = "FAIL"
            problems += [f"{row.domain}/{row.client}: {e}" for e in row.errors[:5]]
        elif row.must_balance and not row.disconnected:
            ok = row.received + row.dropped == row.sent
            if row.domain == "execution" and row.dropped:
                ok = False
            verdicts[index] = "ok" if ok else "FAIL"
            if not ok:
                problems.append(f"{row.domain}/{row.client}: received {row.received} + "
                                f"dropped {row.dropped} != sent {row.sent}")
        elif row.must_balance and row.domain != "signal":
            verdicts[index] = "FAIL"
            problems.append(f"{row.domain}/{row.client}: disconnected, but the "
                            f"{row.domain} policy never disconnects a reading consumer")
        elif row.must_balance:
            verdicts[index] = "cut off"  # signal's disconnect policy; gap-free until then
        elif row.disconnected:
            verdicts[index] = "FAIL"
            problems.append(f"{row.domain}/{row.client}: lost its connection")
        else:
            verdicts[index] = "-"

    print()
    print(format_table(rows, verdicts))
    print()
    print("relay counters (final stats):")
    for domain, (code, stats) in results.items():
        counters = ", ".join(f"{k} {v:,}" for k, v in stats.items())
        print(f"  {domain:12} exit {code}: {counters or 'no final stats line'}")
        if code != 0 or not stats:
            problems.append(f"{domain} relay: exit code {code}; log tail:\n"
                            + relays[domain].log()[-2000:])
            continue
        stayed = [r for r in rows if r.domain == domain and r.must_balance
                  and not r.disconnected]
        if domain == "execution" and (stats["dropped"] or stats["slow_disconnects"]):
            problems.append("execution relay dropped or disconnected: " + str(stats))
        if domain == "market_data" and stats["dropped"] < sum(r.dropped for r in stayed):
            problems.append("market_data relay counted fewer drops than its consumers saw")
        for name in ("invalid", "protocol_errors"):
            if stats[name]:
                problems.append(f"{domain} relay: {name} {stats[name]}")

    shutil.rmtree(directory, ignore_errors=True)
    print()
    if problems:
        print("soak: DOES NOT BALANCE")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print("soak: balances (received + dropped = sent for every consumer that stayed "
          "connected; nothing lost in execution)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="how long to run the traffic (default: 60)")
    parser.add_argument("--seed", type=int, default=6, help="random seed (default: 6)")
    args = parser.parse_args(argv)
    return run(args.seconds, args.seed)


if __name__ == "__main__":
    sys.exit(main())
