"""A run's life around the training loop: signals that stop it cleanly, and a heartbeat that shows it alive.

Runs go ``running`` → ``completed | failed | interrupted | lost``. SIGINT (Ctrl-C) and SIGTERM raise
:class:`Interrupted` in the main thread, so the run is stored as ``interrupted`` with its last
checkpoint; while a checkpoint and its store rows are being written, a signal waits until they are
whole (:func:`signals_deferred`). A run whose process dies without a word (SIGKILL, out of memory)
stops beating and is shown as ``lost`` (see :func:`runner.store.live_status`).

This module never imports torch or touches the database: the heartbeat calls a function it is given.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from runner.errors import RunnerError

HEARTBEAT_ENV = "RUNNER_HEARTBEAT_S"
DEFAULT_HEARTBEAT_S = 10.0
# a run is lost after two missed beats, and a beat is a store write that may wait for another
# process's transaction: beating more often than this makes live runs flicker to lost
MIN_HEARTBEAT_S = 1.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def heartbeat_interval() -> float:
    """Seconds between heartbeats: ``RUNNER_HEARTBEAT_S`` (at least :data:`MIN_HEARTBEAT_S`), else 10."""
    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not raw:
        return DEFAULT_HEARTBEAT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise RunnerError(f"{HEARTBEAT_ENV} must be a positive number of seconds, got {raw!r}")
    if value < MIN_HEARTBEAT_S:
        raise RunnerError(f"{HEARTBEAT_ENV} must be at least {MIN_HEARTBEAT_S:g} s (each beat writes to the store), got {raw!r}")
    return value


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a run was training."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """As a shell reports a process ended by the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


class _SignalState:
    """Process-wide, as signal handlers are: how deep in deferred blocks we are, and what waits."""

    depth = 0
    pending: int | None = None
    late: int | None = None  # dropped by a block whose work was already done (see late_signal)


_state = _SignalState()


def _raise_or_defer(signum: int, _frame: Any) -> None:
    # a second signal does not wait: whoever presses Ctrl-C twice wants out now, and the store and
    # the checkpoint stay usable (each write is one transaction or one rename)
    if _state.depth and _state.pending is None:
        _state.pending = signum
        return
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM raise :class:`Interrupted`; the previous handlers come back after.

    SIGTERM's default would end the process at once, leaving the run ``running`` until it shows as
    lost. Handlers can only be installed from the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_or_defer) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _state.pending = None


@contextmanager
def signals_deferred(raise_after: bool = True) -> Iterator[None]:
    """A stop signal arriving inside waits until the block is done, then raises (or is dropped).

    Used where stopping half-way would waste an epoch's bookkeeping; a second signal raises at once.
    A dropped signal is kept for :func:`late_signal`: it came too late to stop this run, not too
    late to stop a worker from claiming the next one. So is one that waited in a block an error
    left: the error goes on, it says more than the signal.
    """
    _state.depth += 1
    try:
        yield
    except BaseException:
        _state.depth -= 1
        if _state.depth == 0 and _state.pending is not None:
            _state.late, _state.pending = _state.pending, None
        raise
    _state.depth -= 1
    if _state.depth == 0 and _state.pending is not None:
        signum, _state.pending = _state.pending, None
        if raise_after:
            raise Interrupted(signum)
        _state.late = signum


def late_signal() -> int | None:
    """The stop signal a finished run's bookkeeping dropped since the last call, if any (then forgotten)."""
    signum, _state.late = _state.late, None
    return signum


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM do nothing; the previous handlers come back after.

    The ranks other than 0 of a distributed run train inside: rank 0 alone decides whether a signal
    interrupts the run (torchrun passes a signal on to every rank); the others stop when rank 0 is gone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class StopBeating(Exception):
    """Raised by a beat to end the heartbeat for good (the run is no longer this process's)."""


@contextmanager
def heartbeat(beat: Callable[[], None], interval: float) -> Iterator[None]:
    """Call ``beat`` every ``interval`` seconds from a daemon thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            try:
                beat()
            except StopBeating:
                return
            except Exception:  # noqa: BLE001 - a missed beat must never stop training; the next one retries
                pass

    thread = threading.Thread(target=loop, name="runner-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval + 5)


__all__ = [
    "DEFAULT_HEARTBEAT_S", "HEARTBEAT_ENV", "MIN_HEARTBEAT_S", "Interrupted", "StopBeating", "heartbeat", "heartbeat_interval",
    "late_signal", "signals_deferred", "signals_ignored", "stop_on_signals",
]
