"""File helpers every part of the runner shares: atomic writes and content hashes.

This module imports nothing from ``runner`` (and nothing heavy), so anything may use it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

TEMPORARY_SUFFIX = ".tmp"


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def temporary_path(path: Path) -> Path:
    """A hidden sibling of ``path`` unique to this process: ``.NAME.<pid>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None],
                 before_replace: Callable[[], None] | None = None) -> None:
    """``write(tmp)`` fills a temporary file next to ``path``, which then replaces ``path`` in one rename.

    A crash or a signal mid-write never leaves a half-written ``path``: the previous file stays,
    and the temporary one is removed (only a SIGKILL can leave it behind; see
    :func:`remove_stale_temporaries`). ``before_replace`` runs between the two and may refuse the
    replacement by raising (a run's checkpoint, when another process has taken the run over).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    try:
        write(tmp)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically."""
    payload = data.encode() if isinstance(data, str) else data
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Temporary files under ``directory`` left by :func:`atomic_write` in processes that no longer exist."""
    root = Path(directory)
    if not root.is_dir():
        return []
    stale = []
    for candidate in root.rglob(f".*{TEMPORARY_SUFFIX}"):
        pid_text = candidate.name[: -len(TEMPORARY_SUFFIX)].rpartition(".")[2]
        if pid_text.isdigit() and not (int(pid_text) == os.getpid() or _pid_alive(int(pid_text))):
            stale.append(candidate)
    return sorted(stale)


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> tuple[int, int]:
    """Delete :func:`stale_temporaries`: (files removed, bytes freed)."""
    removed = freed = 0
    for path in stale_temporaries(directory):
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        removed += 1
        freed += size
    return removed, freed


__all__ = ["sha256_file", "atomic_write", "atomic_write_bytes", "temporary_path", "stale_temporaries", "remove_stale_temporaries"]
