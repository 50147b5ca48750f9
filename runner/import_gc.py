"""Importing torch without the garbage collector's full passes over what is being imported.

Importing torch, torchvision and the runner's training modules creates about a million objects.
On the way Python's collector runs full collections (six while ``runner run`` imports them), each
traversing every object imported so far, and finds almost nothing: modules, classes and functions
live as long as the process. Paused during those imports, the collector saved 0.7 to 1.2 s of a
5-6 s import on this 2-core machine (``python -c "import torch, torchvision, runner.execute"``,
three runs each way under load). Then one full collection runs and what is left is frozen
(``gc.freeze``), so the full collections that training triggers later skip it: allocating three
million small lists afterwards took half as long (1.4-1.9 s against 2.7-3.9 s).

Nothing here imports torch: callers put their heavy imports inside :func:`paused`.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Collect no garbage inside the block; afterwards collect once, freeze what is left and collect as before."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.collect()  # one full pass, so that no garbage (a caller's own, too) is frozen for good
        gc.freeze()  # what is left is imported code and state: later collections skip it
        if was_enabled:
            gc.enable()


__all__ = ["paused"]
