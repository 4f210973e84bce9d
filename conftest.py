"""Shared pytest fixtures and helpers: short socket directories, relays in threads, CLI
processes, waiting, raw sockets and frame header getters."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import logic
from relay import Relay, RelayClient

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 5.0  # every socket and wait in the tests is bounded by this


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


@pytest.fixture
def start_relay(socket_path: str) -> Iterator[Callable[..., RunningRelay]]:
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
def cli() -> Iterator[Callable[..., subprocess.Popen[str]]]:
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
