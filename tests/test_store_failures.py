"""When the store or the disk fails: one line naming the store or file and the cause, nothing stored lost.

A read-only store is read by the commands that only read (SQLite's read-only modes) and refused in
one line by those that write; a damaged store fails the run that cannot write to it (marked
``failed`` where the store still takes that); a disk that fills during a checkpoint write is named
as such, not hidden behind the store's own "database or disk is full".
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

def file_hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def table_rows(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True) as conn:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(conn.execute(f"SELECT * FROM {t} NOT INDEXED").fetchall(), key=repr) for t in tables}


def train(run_cli: Any, tiny_spec: Path, db: Path, *extra: str) -> str:
    result = run_cli("run", tiny_spec, "--db", db, "-q", "--set", "training.epochs=1", *extra)
    assert result.exit_code == 0, result.err
    return result.out.strip()


# ------------------------------------------------------------------------------------------
# Read-only stores


@contextmanager
def made_read_only(path: Path) -> Iterator[None]:
    """``path`` (the store file or its directory) read-only for this process.

    Permissions bind everyone but root; for root, a read-only bind mount of ``path`` (where this
    process may mount) makes it read-only as a read-only disk would.
    """
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    bound = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if bound.returncode != 0:
        pytest.skip(f"running as root, and cannot make {path.name} read-only with a bind mount: {bound.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def cli(*args: Any) -> subprocess.CompletedProcess[str]:
    """``runner ARGS…`` in a new process: one that never had the store open for writing."""
    return subprocess.run([sys.executable, "-m", "runner", *map(str, args)], capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("read_only", ["file", "directory"])
def test_a_read_only_store_is_read_by_reading_commands_and_refused_in_one_line_by_writing_ones(
    run_cli: Any, tiny_spec: Path, tmp_path: Path, read_only: str,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    db = project / "results.db"
    run_id = train(run_cli, tiny_spec, db)
    expected = run_cli("show", run_id, "--db", db, "--format", "json").json()
    gc.collect()  # this process's engines let go of the file
    before = file_hashes(project)

    with made_read_only(db if read_only == "file" else project):
        listed = cli("runs", "--db", db, "--format", "json")
        assert listed.returncode == 0, listed.stderr
        assert [r["id"] for r in json.loads(listed.stdout)] == [run_id]
        shown = cli("show", run_id, "--db", db, "--format", "json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["epochs"] == expected["epochs"]
        report = cli("report", "--db", db, "--format", "csv")
        assert report.returncode == 0 and run_id in report.stdout, report.stderr

        refused = cli("run", tiny_spec, "--db", db, "-q")
        assert refused.returncode == 2
        assert refused.stderr == (f"error: cannot use the store {db}: it is read-only here: check the permissions of the file "
                                  "and its directory\n")
        tagged = cli("tag", run_id, "paper", "--db", db)
        assert tagged.returncode == 2
        assert tagged.stderr == (f"error: cannot write to the store {db}: attempt to write a readonly database (the store is "
                                 "read-only here: check the permissions of the file and its directory)\n")
    assert file_hashes(project) == before  # nothing written, nothing lost


# ------------------------------------------------------------------------------------------
# A damaged store


def damage_index(db: Path, index: str) -> None:
    """Overwrite one index page of the store with garbage, as a disk error would."""
    gc.collect()  # this process's engines let go of the store, so that the checkpoint below is complete
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the file itself, none left in the -wal
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        [(root_page,)] = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (index,)).fetchall()
    with open(db, "r+b") as f:
        f.seek((root_page - 1) * page_size)
        f.write(b"\xff" * page_size)


def test_a_damaged_store_fails_the_run_in_one_line_marks_it_failed_and_keeps_what_it_held(
    run_cli: Any, tiny_spec: Path, db: Path,
) -> None:
    kept_id = train(run_cli, tiny_spec, db)
    damage_index(db, "sqlite_autoindex_epoch_metrics_1")
    before = table_rows(db)

    result = run_cli("run", tiny_spec, "--db", db, "-q", "--set", "training.epochs=1")

    assert result.exit_code == 1
    match = re.fullmatch(rf"error: run ([0-9a-f]{{12}}) failed: StoreError: cannot write to the store {re.escape(str(db))}: "
                         r"database disk image is malformed\n", result.err)
    assert match, result.err
    statuses = {r["id"]: r["status"] for r in run_cli("runs", "--db", db, "--format", "json").json()}
    assert statuses == {kept_id: "completed", match.group(1): "failed"}  # the store still took the failure
    after = table_rows(db)
    assert [r for r in after["runs"] if r[0] == kept_id] == [r for r in before["runs"] if r[0] == kept_id]
    for table in ("epoch_metrics", "epochs", "split_metrics", "checkpoints"):
        assert after[table] == before[table], table  # nothing stored before is lost
    shown = run_cli("show", kept_id, "--db", db)  # reading the damaged index: one line too
    assert (shown.exit_code, shown.err) == (2, f"error: cannot read the store {db}: database disk image is malformed\n")


# ------------------------------------------------------------------------------------------
# A full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB file system (tmpfs), where this process may mount one."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


WIDE = ["--set", "model.options.layers=[Flatten, {type: Linear, out_features: 600}, ReLU, {type: Linear, out_features: num_classes}]",
        "--set", "training.epochs=1"]  # a 1.9 MB model: its last checkpoint (with Adam's state) is about 5.7 MB


def test_a_disk_that_fills_during_a_checkpoint_write_is_named_and_the_run_marked_failed(
    run_cli: Any, tiny_spec: Path, small_disk: Path,
) -> None:
    db = small_disk / "results.db"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (3 << 20))  # what is left holds the store and the best checkpoint, not the last one
    result = run_cli("run", tiny_spec, "--db", db, "-q", *WIDE)

    assert result.exit_code == 1
    run_id = run_cli("runs", "--db", db, "--format", "json").json()[0]["id"]
    last = small_disk / "runs" / run_id / "last.pt"
    assert result.err == f"error: run {run_id} failed: OSError: [Errno 28] No space left on device: '{last}'\n"
    details = run_cli("show", run_id, "--db", db, "--format", "json").json()
    assert details["status"] == "failed" and details["error"] == f"OSError: [Errno 28] No space left on device: '{last}'"
    assert [e["epoch"] for e in details["epochs"]] == [1]
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt"]  # no partial file left behind


def test_when_the_full_disk_keeps_the_store_from_recording_the_failure_the_real_cause_is_still_named(
    run_cli: Any, tiny_spec: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disk fills (another file grows) while the last checkpoint is written: the checkpoint and
    then the store's own write fail. The one line names the checkpoint's cause first."""
    from runner import training

    db = small_disk / "results.db"
    real_save = training.save_tensors

    def another_file_fills_the_disk(payload: Any, path: Path, before_replace: Any = None) -> None:
        if path.name == "last.pt":
            with open(small_disk / "filler", "wb") as filler:
                try:
                    while True:
                        filler.write(b"\0" * (1 << 16))
                        filler.flush()
                except OSError:
                    pass
        real_save(payload, path, before_replace)

    monkeypatch.setattr(training, "save_tensors", another_file_fills_the_disk)
    result = run_cli("run", tiny_spec, "--db", db, "-q", *WIDE)

    assert result.exit_code == 1
    assert result.err.count("\n") == 1
    last = next((small_disk / "runs").iterdir()) / "last.pt"
    assert result.err.startswith(f"error: run {last.parent.name} failed: OSError: [Errno 28] No space left on device: '{last}'; "
                                 f"the run could not be marked failed: cannot write to the store {db}: ")
    assert "database or disk is full" in result.err
    (small_disk / "filler").unlink()
    assert run_cli("show", last.parent.name, "--db", db, "--format", "json").json()["epochs"][0]["epoch"] == 1  # what it held
