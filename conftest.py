"""Shared pytest fixtures: short socket directories, relays in threads, CLI processes."""

from __future__ import annotations

import os
import shutil
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
        """Poll ``predicate`` until true; fail the test after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting; stats: {self.relay.stats()}")
            time.sleep(0.005)

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
