"""Leaving a process that imported torch about a second sooner.

At interpreter exit, Python's garbage collector traverses every object several times, and after
torch and torchvision are imported there are about a million (measured after a quickstart run:
1.2 to 1.4 s from the end of the command to the end of the process, about 0.4 s with this hook).
The hook collects garbage once, so finalizers run as usual (SQLite connections close, loader
workers stop), then freezes what is left: torch's module state, which teardown frees without GC.

The CLI installs it for every command: after SQLAlchemy and pandas alone (``runner runs``,
``report``) teardown took 0.26 s of CPU time instead of 0.10 s with the hook (a loaded 2-core
machine, medians of 6), part of what ``bench/startup.py`` measures. The Python API installs it for
its functions that load torch.
``RUNNER_FAST_EXIT=0`` leaves the interpreter's exit alone.
"""

from __future__ import annotations

import atexit
import gc
import os

FAST_EXIT_ENV = "RUNNER_FAST_EXIT"

_installed = False


def _collect_then_freeze() -> None:
    gc.collect()
    gc.freeze()


def install() -> None:
    """Register the exit hook once per process (unless ``RUNNER_FAST_EXIT=0``)."""
    global _installed
    if _installed or os.environ.get(FAST_EXIT_ENV, "").strip() == "0":
        return
    atexit.register(_collect_then_freeze)
    _installed = True


__all__ = ["FAST_EXIT_ENV", "install"]
