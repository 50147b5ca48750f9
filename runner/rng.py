"""Random number generators: seeding a run, saving and restoring every generator, leaving them alone.

A run draws from four global generators (Python's ``random``, NumPy's, torch's CPU and CUDA ones)
plus the train loader's own seeded generator. Checkpoints hold all of them so a resumed run draws
exactly what it would have drawn; :func:`preserved` lets code that must not shift them (planning,
summaries) run without a trace.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch


def seed_generators(seed: int) -> None:
    """Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_everything(seed: int, deterministic: bool) -> None:
    seed_generators(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)


def global_state(train_loader: Any = None) -> dict[str, Any]:
    """Every generator's state as tensors and plain values (loads with ``weights_only=True``)."""
    generator = getattr(train_loader, "generator", None)
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, [int(k) for k in keys], int(position), int(has_gauss), float(cached_gauss)],
        "python": random.getstate(),
        "train_loader": generator.get_state() if generator is not None else None,
    }


def restore_global_state(state: dict[str, Any], train_loader: Any = None) -> None:
    """Put every generator back as :func:`global_state` found it."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator = getattr(train_loader, "generator", None)
    if generator is not None and state.get("train_loader") is not None:
        generator.set_state(state["train_loader"])


@contextmanager
def preserved() -> Iterator[None]:
    """Inside, code may draw random numbers; afterwards every global generator is as it was."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


__all__ = ["seed_generators", "seed_everything", "global_state", "restore_global_state", "preserved"]
