"""Importing torch without the garbage collector's full passes over what is being imported.

Importing torch, torchvision and the runner's training modules creates about a million objects.
On the way Python's collector runs full collections (six while ``runner run`` imports them), each
traversing every object imported so far, and finds almost nothing: modules, classes and functions
live as long as the process. So those imports run with the collector paused.

A command (one process) also freezes what the imports left (``gc.freeze`` after one collection), so
the full collections that come later skip it. Measured on this 2-core machine under load, three
runs each way (``python -c "import torch, torchvision, runner.execute"``, then allocating three
million small lists): the import took 3.0-5.0 s paused and frozen against 4.1-6.0 s as usual, and
the allocation afterwards 1.4-1.9 s against 2.7-3.9 s. A library call (``runner.run()`` in a user's
process) only pauses: frozen objects are never collected, so a user's objects alive at that moment
would leak if they became cyclic garbage later.

The commands that only read the store (``runner report``, ``runs``, ``show``, ``compare``, ``sweep
status``, ``sweep list``) import SQLAlchemy (about 70,000 objects) and, for tables, pandas (150,000
in all) the same way, and freeze them without that collection first. Medians of 11 alternating runs
of ``runner report`` on a store of 1,000 runs (2-core machine): 1.02 s as before, 1.04 s paused
only, 1.01 s paused, collected and frozen, 0.93 s paused and frozen without the collection.

Nothing here imports torch: callers put their heavy imports inside :func:`paused`.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def paused(freeze: bool = False, collect: bool = True) -> Iterator[None]:
    """Collect no garbage inside the block.

    :param freeze: afterwards collect once and freeze what is left; only for a process that is one
        command (``runner`` on the command line, not ``runner.cli.main([...])`` called in a test or
        a user's script), see the module docstring.
    :param collect: with ``freeze``, the one collection before freezing, so that no garbage is frozen
        for good. A command that only reads the store passes False: its process ends soon after, and
        that full pass over SQLAlchemy's and pandas' objects would cost what the freeze saves.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            if collect:
                gc.collect()  # one full pass, so that no garbage is frozen for good
            gc.freeze()  # what is left is imported code and state: later collections skip it
        if was_enabled:
            gc.enable()


__all__ = ["paused"]
