"""Reading PyTorch files safely: ``torch.load(weights_only=True)`` always, never retried unsafely."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from runner.errors import RunnerError, SpecError
from runner.files import atomic_write


def unsafe_load_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in words that do not invite an unsafe retry."""
    text = str(exc).strip()
    if text.startswith("Weights only load failed"):
        # torch's first paragraph suggests weights_only=False; the useful line names what was refused
        detail = next((line.strip() for line in text.splitlines()[1:] if "GLOBAL" in line or "Unsupported" in line), "")
        return ("refused: it holds pickled code or objects other than tensors, and is only ever loaded with "
                f"weights_only=True{f' ({detail[:160]})' if detail else ''}")
    first = text.splitlines()[0][:160] if text else ""
    return f"cannot be read as a PyTorch file ({type(exc).__name__}{f': {first}' if first else ''})"


def load_tensors(path: Path, what: str, error: type[RunnerError] = RunnerError) -> Any:
    """The content of a file written by ``torch.save``, loaded on the CPU with ``weights_only=True``.

    ``what`` names the file in the one-line error (``checkpoint /x/last.pt``).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise error(f"{what} not found") from None
    except Exception as exc:  # UnpicklingError for pickled code; RuntimeError for non-torch files
        raise error(f"{what} {unsafe_load_reason(exc)}") from None


def load_state_dict_file(path: Path, source: str) -> dict[str, torch.Tensor]:
    """A state dict from a weights file or a runner checkpoint (its ``model`` entry)."""
    if not path.is_file():
        raise SpecError(f"weights file not found: {path}")
    state = load_tensors(path, f"weights {source}", SpecError)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a runner checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"weights {source} is not a state dict (a mapping of names to tensors)")
    return state


@contextlib.contextmanager
def _without_zip_checksums() -> Iterator[None]:
    """Skip the CRC-32 that ``torch.save`` computes for each zip record (a third of saving a resnet18 state dict).

    ``torch.load`` has never checked it (PyTorch builds its zip reader without CRC checks), and the
    runner's own integrity check is the sha256 the store records for every checkpoint. Where torch
    has no such option (before 2.6), saving is unchanged.
    """
    if not hasattr(torch.serialization, "set_crc32_options"):
        yield
        return
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def _torch_save(payload: Any, tmp: Path, path: Path) -> None:
    """``torch.save`` through a Python file, so that a failed write (a full disk) raises its own
    ``OSError`` naming ``path``, not torch's "enforce fail … unexpected pos" that hides it."""
    try:
        with open(tmp, "wb") as f, _without_zip_checksums():
            torch.save(payload, f)
    except RuntimeError as exc:
        if not isinstance(exc.__context__, OSError):
            raise
        cause = exc.__context__
        raise OSError(cause.errno, cause.strerror, str(path)) from None
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def save_tensors(payload: Any, path: Path, before_replace: Callable[[], None] | None = None) -> None:
    """``torch.save`` to ``path`` atomically (see :func:`runner.files.atomic_write`, also for ``before_replace``)."""
    atomic_write(path, lambda tmp: _torch_save(payload, tmp, path), before_replace)


__all__ = ["unsafe_load_reason", "load_tensors", "load_state_dict_file", "save_tensors"]
