"""Tests for the command line of relay.py (``run``, ``tail``, ``send``) and the
``RelayClient`` subscription options, as a user meets them.

Every relay, ``tail`` and ``send`` here is a real ``python relay.py`` process (the
``cli`` fixture) on a temp socket with ``--stats-interval 0``, except where a test needs
the relay's counters to know a client is connected: then the relay runs in this process
(``start_relay``) and only the command under test is a subprocess. Every wait is
bounded by ``TIMEOUT_S``; nothing here measures speed (that is ``bench.py``).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

import logic
from conftest import (
    PRICE,
    TIMEOUT_S,
    Cli,
    finish,
    gas_message,
    leave_stale_socket,
    publish_past_a_stopped_consumer,
    read_text,
    run_cli,
    stop,
    trade_message,
    wait_for_socket,
    wait_subscribed,
    wait_until,
)
from logic import (
    TLV_GAS_PRICE,
    TLV_TRADE,
    Domain,
    ExecutionLogic,
    build_message,
    decode_gap,
    parse_message,
    verify_checksum,
)
from relay import RelayClient

GLOBAL_OPTIONS = (
    "--domain", "--socket", "--queue-limit", "--queue-bytes", "--max-connections",
    "--overflow", "--max-message-size", "--stall-timeout", "--drain-timeout",
    "--socket-mode", "--stats-interval", "--log-level",
)
SENT_LINE = re.compile(r"sent (\d+) (\w+) messages to (\S+) in ([\d.]+) s \(([\d,]+) msg/s\)")

# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def exchange(path: str, message: bytes | None = None) -> None:
    """Prove the relay on ``path`` is serving: one client's message reaches another.

    The consumer connects first, so the relay accepts it before it reads the producer
    (accept is FIFO). A relay that forwards a message is inside its loop, so its signal
    handlers are installed."""
    message = message or trade_message(1)
    with RelayClient(path, timeout=TIMEOUT_S) as consumer, \
            RelayClient(path, timeout=TIMEOUT_S) as producer:
        producer.send(message)
        assert consumer.recv() == message


def start_serving(cli: Cli, *args: str, path: str, **kwargs: Any) -> subprocess.Popen[str]:
    """Start ``python relay.py ARGS`` and return once it relays messages on ``path``."""
    process = cli(*args, **kwargs)
    try:
        wait_for_socket(path)
    except ConnectionError:
        process.kill()
        _, err = process.communicate(timeout=TIMEOUT_S)
        raise AssertionError(f"relay did not start; stderr: {err}") from None
    exchange(path)
    return process


def option_help(help_text: str, option: str) -> str:
    """The help entry of ``option``: its line and the indented lines that follow it."""
    lines = help_text.splitlines()
    for index, line in enumerate(lines):
        if line.lstrip().startswith(option + " ") or line.strip() == option or \
                line.lstrip().startswith(option + ","):
            entry = [line]
            for more in lines[index + 1:]:
                if not more.startswith(" " * 8) or more.lstrip().startswith("-"):
                    break
                entry.append(more)
            return " ".join(part.strip() for part in entry)
    raise AssertionError(f"{option} is not in the help:\n{help_text}")


# ---------------------------------------------------------------------------------------
# --help and usage errors (exit 2)
# ---------------------------------------------------------------------------------------


def test_help_documents_every_option_with_its_default_and_the_three_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for option in GLOBAL_OPTIONS:
        assert "default" in option_help(result.stdout, option), option
    documented = set(re.findall(r"^ {2}(--[a-z][a-z-]*)", result.stdout, re.MULTILINE))
    assert documented >= set(GLOBAL_OPTIONS)
    for option in documented - {"--version"}:  # an option added later must say its default
        assert "default" in option_help(result.stdout, option), option
    for command in ("run", "tail", "send", "stats", "clients", "record", "replay"):
        assert re.search(rf"^\s+{command}\s+\S", result.stdout, re.MULTILINE), command
    assert "(default: 10000)" in option_help(result.stdout, "--queue-limit")
    assert "(default: 0600)" in option_help(result.stdout, "--socket-mode")
    assert "market_data" in option_help(result.stdout, "--domain")


CONNECTION_OPTIONS = ("--domain", "--socket", "--log-level", "--log-format")
RELAY_ONLY_OPTIONS = [o for o in GLOBAL_OPTIONS if o not in CONNECTION_OPTIONS]


@pytest.mark.parametrize(("command", "options"), [
    ("tail", ("--count", "--json", "--type", "--last")),
    ("send", ("--count", "--rate", "--source")),
    ("stats", ("--json", "--prometheus", "--watch")),
    ("clients", ("--json",)),
    ("record", ("--count", "--duration", "--max-bytes", "--type")),
    ("replay", ("--speed", "--rate")),
])
def test_client_command_help_shows_its_own_options_first_and_not_the_relays(
        command: str, options: tuple[str, ...]) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    for option in options:
        entry = option_help(result.stdout, option)
        if option not in ("--json", "--prometheus"):  # flags: nothing to default
            assert "default" in entry, entry
    first_own = min(result.stdout.index(f"  {o}") for o in options)
    for option in CONNECTION_OPTIONS:  # accepted after the command too, listed after
        option_help(result.stdout, option)
        assert result.stdout.index(f"  {option}") > first_own, option
    for option in RELAY_ONLY_OPTIONS:
        assert f"  {option}" not in result.stdout, option
    description = result.stdout.split("\n\n")[1]
    assert len(description.split()) >= 5, description  # a line that says what it does


def test_a_relay_option_after_a_client_command_is_accepted_and_said_to_be_ignored(
        start_relay: Any, socket_path: str) -> None:
    start_relay()
    result = run_cli("--socket", socket_path, "send", "--count", "1", "--queue-limit", "5")
    assert result.returncode == 0, result.stderr
    assert "--queue-limit only matter to run; send ignores them" in result.stderr


@pytest.mark.parametrize("args", [
    ("--domain", "nope"),
    ("tail", "--domain", "nope"),
])
def test_unknown_domain_is_a_usage_error_that_lists_the_known_domains(
        args: tuple[str, ...]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert "'nope'" in result.stderr
    for name in ("market_data", "signal", "execution"):
        assert name in result.stderr


@pytest.mark.parametrize("args", [
    ("--bogus",),
    ("--queue-limit", "0"),
    ("--queue-limit", "many"),
    ("--socket-mode", "0999"),
    ("--log-level", "loud"),
    ("--overflow", "never"),
    ("tail", "--rate", "5"),
    ("send", "--json"),
    ("frobnicate",),
])
def test_a_bad_option_is_a_usage_error(args: tuple[str, ...], socket_path: str) -> None:
    result = run_cli("--socket", socket_path, *args)
    assert result.returncode == 2, result.stderr
    assert "usage:" in result.stderr
    assert not os.path.exists(socket_path)


@pytest.mark.parametrize("size", ["10", "2000000"])
def test_an_out_of_range_max_message_size_is_a_usage_error(size: str, socket_path: str) -> None:
    """32..1 MiB is the only valid range; argparse-level errors exit 2 (SPEC: 2 usage)."""
    result = run_cli("--socket", socket_path, "--max-message-size", size)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert size in result.stderr
    assert not os.path.exists(socket_path)


# ---------------------------------------------------------------------------------------
# run: serving, the socket file, a second relay, signals
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", [
    "{domain} --socket P",
    "{domain} --socket P run",
    "--socket P {domain} run",
    "{domain} run --socket P",
    "run {domain} --socket P",
])
def test_relay_serves_with_or_without_run_and_options_before_or_after_it(
        form: str, cli: Cli, socket_path: str) -> None:
    args = form.format(domain="--domain market_data").split()
    args = [socket_path if a == "P" else a for a in args] + ["--stats-interval", "0"]
    relay = start_serving(cli, *args, path=socket_path)
    code, _, err = stop(relay)
    assert code == 0, err


@pytest.mark.parametrize("args", [
    ("--log-level", "DEBUG", "run"),
    ("run", "--log-level", "debug"),
    ("--log-level", "Debug"),
])
def test_log_level_is_case_insensitive_before_or_after_the_command(
        args: tuple[str, ...], cli: Cli, socket_path: str) -> None:
    relay = start_serving(cli, "--socket", socket_path, "--stats-interval", "0", *args,
                          path=socket_path)
    code, _, err = stop(relay)
    assert code == 0, err
    assert re.search(r" DEBUG relay: client 1 \(pid \d+ [^)]+\): connected", err), err


def test_relay_logs_at_info_by_default_and_nothing_per_message(cli: Cli,
                                                                socket_path: str) -> None:
    relay = start_serving(cli, "--socket", socket_path, "--stats-interval", "0",
                          path=socket_path)
    code, _, err = stop(relay)
    assert code == 0, err
    assert f"listening on {socket_path}" in err
    assert "DEBUG" not in err


def test_second_relay_on_a_live_socket_exits_1_naming_the_path_and_the_first_keeps_serving(
        cli: Cli, socket_path: str) -> None:
    first = start_serving(cli, "--socket", socket_path, "--stats-interval", "0",
                          path=socket_path)
    inode = os.stat(socket_path).st_ino
    code, out, err = finish(cli("--socket", socket_path, "--stats-interval", "0"))
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err
    assert socket_path in err
    assert "already listening" in err
    assert first.poll() is None
    assert os.stat(socket_path).st_ino == inode  # not stolen, not removed
    exchange(socket_path)
    assert stop(first)[0] == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_the_relay_with_exit_0_and_remove_the_socket(
        signum: int, cli: Cli, socket_path: str) -> None:
    relay = start_serving(cli, "--socket", socket_path, "--stats-interval", "0",
                          path=socket_path)
    code, _, err = stop(relay, signum)
    assert code == 0, err
    assert not os.path.exists(socket_path)
    assert "final stats" in err


SIGNAL_ON_ANOTHER_THREAD = """
import signal, sys, threading
threading.Thread(target=threading.Event().wait, daemon=True).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the kernel picks the thread
import relay
sys.exit(relay.main())
"""


def test_sigterm_stops_the_relay_even_when_it_does_not_interrupt_the_relays_select(
        socket_path: str, socket_dir: str) -> None:
    """A signal that arrives just before the loop blocks in select (or on another
    thread of an embedding program) does not interrupt that select: the relay must
    still wake up (signal.set_wakeup_fd), not sleep until the next event. With
    --stats-interval 0 and no client there is no next event: a lost SIGTERM hangs."""
    log_path = os.path.join(socket_dir, "relay.log")
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", SIGNAL_ON_ANOTHER_THREAD, "--socket", socket_path,
             "--stats-interval", "0", "--log-level", "debug"],
            cwd=os.path.dirname(os.path.abspath(__file__)), stdout=subprocess.DEVNULL,
            stderr=log_file, text=True)
    try:
        wait_for_socket(socket_path)
        exchange(socket_path)
        # Three clients came and went (the probe and the exchange); once the relay has
        # seen them leave it has nothing left to do but block in select.
        wait_until(lambda: read_text(log_path).count("closed the connection") >= 3,
                   "the relay to see the test clients leave")
        time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the relay was still running {TIMEOUT_S} s after SIGTERM: the "
                        "signal was lost (no signal.set_wakeup_fd in serve_forever)")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT_S)
    err = read_text(log_path)
    assert code == 0, err
    assert "SIGTERM received" in err
    assert not os.path.exists(socket_path)


def test_sigusr1_logs_a_stats_line_and_the_relay_keeps_serving(
        cli: Cli, socket_path: str, socket_dir: str) -> None:
    log_path = os.path.join(socket_dir, "relay.log")
    with open(log_path, "w") as log_file:
        relay = start_serving(cli, "--socket", socket_path, "--stats-interval", "0",
                              path=socket_path, stderr=log_file)
    assert "stats:" not in read_text(log_path)  # --stats-interval 0: none on its own
    relay.send_signal(signal.SIGUSR1)
    wait_until(lambda: " stats: " in read_text(log_path), "a stats line after SIGUSR1")
    line = next(x for x in read_text(log_path).splitlines() if " stats: " in x)
    assert "INFO relay: stats: clients" in line
    assert "in 1 msg" in line and "out 1 deliveries" in line
    assert relay.poll() is None
    exchange(socket_path)
    assert stop(relay)[0] == 0


@pytest.mark.parametrize(("args", "mode"), [((), 0o600), (("--socket-mode", "0640"), 0o640)])
def test_socket_mode_sets_the_socket_file_permissions(
        args: tuple[str, ...], mode: int, cli: Cli, socket_path: str) -> None:
    relay = start_serving(cli, "--socket", socket_path, "--stats-interval", "0", *args,
                          path=socket_path)
    st = os.stat(socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode
    assert stop(relay)[0] == 0


def test_relay_refuses_a_path_that_is_not_a_socket_and_leaves_it_untouched(
        socket_path: str) -> None:
    with open(socket_path, "w") as f:
        f.write("precious")
    result = run_cli("--socket", socket_path, "--stats-interval", "0")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert socket_path in result.stderr and "not a socket" in result.stderr
    assert read_text(socket_path) == "precious"


def test_relay_replaces_a_stale_socket_left_by_a_dead_relay(cli: Cli,
                                                            socket_path: str) -> None:
    leave_stale_socket(socket_path)  # the file stays, nobody listens
    relay = start_serving(cli, "--socket", socket_path, "--stats-interval", "0",
                          path=socket_path)
    code, _, err = stop(relay)
    assert code == 0, err
    assert "stale socket" in err


def test_relay_creates_a_missing_parent_directory_private_to_the_user(
        cli: Cli, socket_dir: str) -> None:
    path = os.path.join(socket_dir, "new", "md.sock")
    relay = start_serving(cli, "--socket", path, "--stats-interval", "0", path=path)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert stop(relay)[0] == 0


# ---------------------------------------------------------------------------------------
# tail
# ---------------------------------------------------------------------------------------


def test_tail_count_3_prints_three_decoded_lines_and_exits_0(
        cli: Cli, start_relay: Callable[..., Any], socket_path: str) -> None:
    running = start_relay()
    tail = cli("tail", "--socket", socket_path, "--count", "3")
    wait_subscribed(running)
    with running.client() as producer:
        producer.send_many([trade_message(1, side=0),
                            trade_message(2, side=1, price=123_456_789),
                            trade_message(3, side=0, source=logic.Source.KRAKEN)])
        code, out, err = finish(tail)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3, out
    for sequence, line in enumerate(lines, 1):
        assert f"seq={sequence} " in line
        assert "Trade(" in line
        assert "market_data" in line
    assert "src=binance" in lines[0] and "src=kraken" in lines[2]
    assert "price=45000.00000000" in lines[0] and "side=buy" in lines[0]
    assert "price=1.23456789" in lines[1] and "side=sell" in lines[1]
    assert "volume=1.00000000" in lines[0]
    assert "74B" in lines[0]
    assert lines[0].startswith("2023-11-14T22:13:20.000000Z")  # the header's timestamp


def test_tail_json_prints_one_parseable_object_per_message(
        cli: Cli, start_relay: Callable[..., Any], socket_path: str) -> None:
    running = start_relay()
    tail = cli("--socket", socket_path, "tail", "--json", "--count", "3")
    wait_subscribed(running)
    with running.client() as producer:
        producer.send_many([trade_message(1), gas_message(2), trade_message(3, side=1)])
        code, out, err = finish(tail)
    assert code == 0, err
    objects = [json.loads(line) for line in out.splitlines()]
    assert [o["sequence"] for o in objects] == [1, 2, 3]
    assert [o["source"] for o in objects] == [1, 4, 1]
    assert [o["tlvs"][0]["type"] for o in objects] == [TLV_TRADE, TLV_GAS_PRICE, TLV_TRADE]
    assert objects[0]["tlvs"][0]["name"] == "Trade"
    assert objects[0]["tlvs"][0]["price"] == "45000.00000000"
    assert objects[2]["tlvs"][0]["side"] == "sell"
    assert objects[1]["tlvs"][0]["gas_price_gwei"] == 30


def test_tail_without_count_exits_0_when_the_relay_stops(
        cli: Cli, socket_path: str, socket_dir: str) -> None:
    log_path = os.path.join(socket_dir, "relay.log")
    with open(log_path, "w") as log_file:
        relay = start_serving(cli, "--socket", socket_path, "--stats-interval", "0",
                              "--log-level", "debug", path=socket_path, stderr=log_file)
    tail = cli("tail", "--socket", socket_path)
    wait_until(lambda: "subscribed mode 0" in read_text(log_path), "tail to subscribe")
    assert stop(relay)[0] == 0
    code, out, err = finish(tail)
    assert code == 0, err
    assert out == ""


def test_tail_stops_on_ctrl_c_with_exit_0_and_no_traceback(
        cli: Cli, start_relay: Callable[..., Any], socket_path: str) -> None:
    running = start_relay()
    tail = cli("tail", "--socket", socket_path)
    wait_subscribed(running)
    code, out, err = stop(tail, signal.SIGINT)
    assert code == 0, err
    assert "Traceback" not in err


def test_tail_prints_a_visible_gap_line_and_the_gaps_add_up_to_what_it_lost(
        cli: Cli, start_relay: Callable[..., Any], socket_path: str, socket_dir: str) -> None:
    """A stopped tail behind a drop_oldest relay with a tiny queue loses messages; once
    resumed it prints a GAP line, and its lines plus the announced gaps are everything
    that was sent."""
    running = start_relay(queue_limit=4)
    out_path = os.path.join(socket_dir, "tail.out")
    with open(out_path, "w") as out_file:
        tail = cli("tail", "--socket", socket_path, stdout=out_file)
    sent = publish_past_a_stopped_consumer(running, tail, trade_message)

    def tally() -> tuple[int, int, list[str]]:
        lines = read_text(out_path).splitlines()
        gaps = [line for line in lines if " GAP: " in line]
        dropped = sum(int(n) for g in gaps for n in re.findall(r"GAP: (\d+) messages", g))
        return len(lines) - len(gaps), dropped, gaps

    wait_until(lambda: sum(tally()[:2]) >= sent, "tail to print everything or its gap")
    data_lines, dropped, gaps = tally()
    assert gaps, "no GAP line"
    assert data_lines + dropped == sent
    assert dropped == running.stats().messages_dropped
    assert re.search(r"GAP: \d+ messages lost for this consumer "
                     rf"\({dropped} in total\)", gaps[-1]), gaps[-1]
    code, _, err = stop(tail, signal.SIGINT)
    assert code == 0, err


def test_tail_prints_a_line_for_a_forwarded_message_with_a_malformed_payload(
        cli: Cli, start_relay: Callable[..., Any], socket_path: str) -> None:
    """market_data does not parse TLVs, so it forwards a frame whose payload is not
    valid TLVs; tail must still print one line for it and keep going."""
    running = start_relay()
    tail = cli("tail", "--socket", socket_path, "--count", "2")
    wait_subscribed(running)
    bad = logic.HEADER.pack(logic.MAGIC, Domain.MARKET_DATA, 1, 1, 0, 7, 0, 3, 0) + b"\x01\x05a"
    with running.client() as producer:
        producer.send(bad)
        producer.send(trade_message(8))
        code, out, err = finish(tail)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert "seq=7" in lines[0]
    assert "seq=8" in lines[1] and "Trade(" in lines[1]


def test_tail_piped_into_a_reader_that_stops_early_exits_0_quietly(
        cli: Cli, start_relay: Callable[..., Any], socket_path: str) -> None:
    """``python relay.py tail | head -1``: the closed pipe is a clean stop, not an
    error."""
    running = start_relay()
    read_end, write_end = os.pipe()
    tail = cli("tail", "--socket", socket_path, stdout=write_end)
    os.close(write_end)
    try:
        wait_subscribed(running)
        with running.client() as producer:
            producer.send(trade_message(1))
            ready, _, _ = select.select([read_end], [], [], TIMEOUT_S)
            assert ready and os.read(read_end, 65536).startswith(b"20")
            os.close(read_end)
            read_end = -1
            deadline = time.monotonic() + TIMEOUT_S
            sequence = 1
            while tail.poll() is None and time.monotonic() < deadline:
                sequence += 1
                producer.send(trade_message(sequence))
                time.sleep(0.02)
    finally:
        if read_end >= 0:
            os.close(read_end)
    code, _, err = finish(tail)
    assert code == 0, err
    assert "error" not in err.lower(), err


# ---------------------------------------------------------------------------------------
# send
# ---------------------------------------------------------------------------------------


def receive(consumer: RelayClient, count: int) -> list[logic.Message]:
    return [parse_message(consumer.recv()) for _ in range(count)]


def test_send_count_100_delivers_100_valid_frames_numbered_1_to_100_and_reports_the_rate(
        cli: Cli, socket_path: str) -> None:
    relay = start_serving(cli, "--socket", socket_path, "--stats-interval", "0",
                          path=socket_path)
    with RelayClient(socket_path, timeout=TIMEOUT_S) as consumer:
        code, out, err = finish(cli("send", "--socket", socket_path, "--count", "100"))
        assert code == 0, err
        messages = receive(consumer, 100)
        with pytest.raises(TimeoutError):
            consumer.recv(timeout=0.2)
    assert [m.header.sequence for m in messages] == list(range(1, 101))
    assert all(m.header.relay_domain == Domain.MARKET_DATA for m in messages)
    assert all(m.tlvs[0][0] == TLV_TRADE and len(m.tlvs) == 1 for m in messages)
    assert all(logic.decode_trade(m.tlvs[0][1]).venue_id == 100 for m in messages)
    match = SENT_LINE.search(out)
    assert match, out
    assert match[1] == "100" and match[2] == "market_data" and match[3] == socket_path
    assert int(match[5].replace(",", "")) > 0
    assert stop(relay)[0] == 0


@pytest.mark.parametrize(("domain", "tlv_type", "checksummed"), [
    ("execution", logic.TLV_ORDER_REQUEST, True),
    ("signal", logic.TLV_SIGNAL_IDENTITY, True),
])
def test_send_publishes_valid_messages_of_the_domain_that_its_relay_forwards(
        domain: str, tlv_type: int, checksummed: bool, cli: Cli, socket_path: str) -> None:
    relay = cli("--domain", domain, "--socket", socket_path, "--stats-interval", "0")
    wait_for_socket(socket_path)
    with RelayClient(socket_path, timeout=TIMEOUT_S) as consumer:
        code, out, err = finish(cli("send", "--domain", domain, "--socket", socket_path,
                                    "--count", "20"))
        assert code == 0, err
        frames = [consumer.recv() for _ in range(20)]
    messages = [parse_message(f) for f in frames]
    assert [m.header.sequence for m in messages] == list(range(1, 21))
    assert {m.header.relay_domain for m in messages} == {int(Domain[domain.upper()])}
    assert {m.tlvs[0][0] for m in messages} == {tlv_type}
    if checksummed:
        assert all(m.header.checksum != 0 and verify_checksum(f)
                   for m, f in zip(messages, frames, strict=True))
    assert f"sent 20 {domain} messages" in out
    code, _, err = stop(relay)
    assert code == 0, err
    assert "invalid 0" in err


def test_execution_relay_drops_sends_without_a_checksum_but_forwards_cli_send(
        cli: Cli, start_relay: Callable[..., Any], socket_path: str) -> None:
    """The execution domain requires checksums: a frame without one is counted invalid,
    while everything ``send --domain execution`` publishes passes."""
    running = start_relay(ExecutionLogic())
    with running.client() as consumer, running.client() as producer:
        producer.send(build_message(Domain.EXECUTION, 40, [
            logic.order_request(1, 0x1234, PRICE, 100)], sequence=1))
        running.wait_for(lambda: running.stats().messages_invalid == 1)
        code, _, err = finish(cli("send", "--domain", "execution", "--socket",
                                  socket_path, "--count", "5"))
        assert code == 0, err
        assert [parse_message(consumer.recv()).header.sequence for _ in range(5)] == [
            1, 2, 3, 4, 5]
    assert running.stats().messages_invalid == 1


def test_send_rate_paces_the_messages(cli: Cli, socket_path: str) -> None:
    """--rate 200 --count 20 cannot finish in under about 0.1 s (no upper bound is
    asserted: a busy machine may be slower)."""
    relay = start_serving(cli, "--socket", socket_path, "--stats-interval", "0",
                          path=socket_path)
    with RelayClient(socket_path, timeout=TIMEOUT_S) as consumer:
        code, out, err = finish(cli("send", "--socket", socket_path, "--rate", "200",
                                    "--count", "20"))
        assert code == 0, err
        assert [parse_message(consumer.recv()).header.sequence for _ in range(20)] == list(
            range(1, 21))
    match = SENT_LINE.search(out)
    assert match, out
    assert match[1] == "20"
    assert float(match[4]) >= 0.08
    assert stop(relay)[0] == 0


@pytest.mark.parametrize("command", [("tail",), ("tail", "--json"), ("send", "--count", "3")])
def test_tail_and_send_with_no_relay_exit_1_saying_no_relay_is_listening(
        command: tuple[str, ...], socket_path: str) -> None:
    result = run_cli(*command, "--socket", socket_path)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no relay is listening" in result.stderr
    assert socket_path in result.stderr
    assert result.stdout == ""


def test_the_three_terminal_demo_run_tail_send(cli: Cli, socket_path: str,
                                               socket_dir: str) -> None:
    """What README's demo does, every part a process: run, tail --count 5, send 5."""
    log_path = os.path.join(socket_dir, "relay.log")
    with open(log_path, "w") as log_file:
        relay = start_serving(cli, "--domain", "market_data", "--socket", socket_path,
                              "--stats-interval", "0", "--log-level", "debug",
                              path=socket_path, stderr=log_file)
    tail = cli("--domain", "market_data", "--socket", socket_path, "tail", "--count", "5")
    wait_until(lambda: "subscribed mode 0" in read_text(log_path), "tail to subscribe")
    code, out, err = finish(cli("--domain", "market_data", "--socket", socket_path, "send",
                                "--count", "5"))
    assert code == 0, err
    assert out.startswith("sent 5 market_data messages")
    code, out, err = finish(tail)
    assert code == 0, err
    assert re.findall(r" seq=(\d+) ", out) == ["1", "2", "3", "4", "5"]
    assert len(out.splitlines()) == 5
    assert stop(relay)[0] == 0
    assert "out 6 deliveries" in read_text(log_path)  # 5 to tail + 1 from start_serving


# ---------------------------------------------------------------------------------------
# RelayClient subscriptions (in-process relay)
# ---------------------------------------------------------------------------------------


def test_client_subscribed_to_trades_gets_trades_and_not_gas_prices(
        start_relay: Callable[..., Any]) -> None:
    running = start_relay()
    with running.client(subscribe=[TLV_TRADE]) as trades, running.client() as everything:
        wait_subscribed(running, 1)  # the subscriber's RELAY_SUBSCRIBE is applied
        with running.client(publish_only=True) as producer:
            sent = [trade_message(1), gas_message(2), trade_message(3), gas_message(4),
                    trade_message(5)]
            producer.send_many(sent)
            assert [everything.recv() for _ in sent] == sent
            got = [trades.recv(), trades.recv(), trades.recv()]
            with pytest.raises(TimeoutError):
                trades.recv(timeout=0.2)
    assert [parse_message(m).header.sequence for m in got] == [1, 3, 5]
    assert {parse_message(m).tlvs[0][0] for m in got} == {TLV_TRADE}


def test_publish_only_client_receives_nothing_while_others_receive(
        start_relay: Callable[..., Any]) -> None:
    running = start_relay()
    with running.client(publish_only=True) as quiet, running.client() as consumer:
        wait_subscribed(running, 1)
        with running.client(publish_only=True) as producer:
            producer.send_many([trade_message(n) for n in range(1, 11)])
            assert [parse_message(consumer.recv()).header.sequence
                    for _ in range(10)] == list(range(1, 11))
        with pytest.raises(TimeoutError):
            quiet.recv(timeout=0.2)
        quiet.send(trade_message(11))  # and it still publishes
        assert parse_message(consumer.recv()).header.sequence == 11
    # The relay counts a delivery just after the send that made it: wait for the count.
    running.wait_for(lambda: running.stats().messages_out >= 11)
    assert running.stats().messages_out == 11  # nothing was ever queued for it


def test_gap_notice_decodes_as_what_tail_reports() -> None:
    """The gap line tail prints carries the RELAY_GAP values unchanged."""
    from relay import format_line

    notice = logic.gap_message(7, 12, source=logic.Source.MARKET_DATA_RELAY, sequence=3)
    assert decode_gap(parse_message(notice).tlvs[0][1]) == (7, 12)
    assert "GAP: 7 messages lost for this consumer (12 in total)" in format_line(
        notice)
