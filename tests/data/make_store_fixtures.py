"""How tests/data/store_v2.db, store_v3.db and store_v4.db were made (run once; the tests use the committed files).

Each fixture is a store written by the code of a released schema version, so the migrations are
tested against what old runners really wrote, not against what today's models say they wrote:

- ``store_v1.db`` (made earlier, by the first release): one completed tiny run.
- ``store_v2.db``: ``store_v1.db`` migrated to version 2 (and no further) by the migration code of
  commit ``BASE``.
- ``store_v3.db``: a new store of commit ``BASE`` (schema version 3, the last one with a single
  ``runner/store.py``) holding three real tiny runs: one completed, tagged and evaluated, one failed
  (its epoch-2 checkpoint could not be written) and one interrupted (in epoch 2).

- ``store_v4.db``: a new store of commit ``BASE_V4`` (schema version 4, the last before sweeps)
  holding four real tiny runs: one completed (tagged and evaluated), one failed, one interrupted and
  one whose process was SIGKILLed in epoch 2 (still ``running`` in the file: a reader shows it lost).

The script extracts ``runner/`` of each commit with ``git archive`` into a temporary directory and
runs the generator there, so the fixtures come from the old code whatever the checkout holds::

    .venv/bin/python tests/data/make_store_fixtures.py            # writes tests/data/store_v{2,3,4}.db
    .venv/bin/python tests/data/make_store_fixtures.py 4          # only store_v4.db

Artefacts (checkpoints) go to /tmp/v3art and are not kept: the fixtures hold rows only, as
``store_v1.db`` does (its artefacts were in /tmp/v1art). Both files are left in DELETE journal mode,
so each is one self-contained file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

BASE = "dee5d78fd225fc5510d3728ae2780b623b90be1e"  # the last commit with runner/store.py (schema version 3)
BASE_V4 = "a9c8a2e4fb808bd159545cd90b48a2f1dbb125b5"  # main before sweeps: the last commit of schema version 4
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

GENERATE = r'''
import os, shutil, sqlite3, sys
from pathlib import Path

import pytest
import sqlalchemy as sa

import runner.store as old
assert old.SCHEMA_VERSION == 3, old.SCHEMA_VERSION
assert Path(old.__file__).is_relative_to(os.environ["PYTHONPATH"]), old.__file__  # the old code, not the checkout
here, tiny = Path(sys.argv[1]), Path(sys.argv[2])


def compact(path):
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
    conn = sqlite3.connect(path)
    conn.execute("VACUUM")
    conn.close()


# ---- v2: the v1 fixture, migrated by m002 only (as Store._migrate_to(2) does it)
v2 = here / "store_v2.db"
shutil.copy(here / "store_v1.db", v2)
engine = sa.create_engine(f"sqlite:///{v2}")
with engine.begin() as conn:
    assert conn.execute(sa.text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar_one() == "1"
    old.MIGRATIONS[1](conn)
    conn.execute(sa.text("UPDATE meta SET value = '2' WHERE key = 'schema_version'"))
engine.dispose()
compact(v2)

# ---- v3: three real runs in a new store of the old code
from runner import training
from runner.execute import RunInterrupted, TrainingFailed, run_experiment
from runner.inference import evaluate_run

v3 = here / "store_v3.db"
v3.unlink(missing_ok=True)
artifacts = Path("/tmp/v3art")
shutil.rmtree(artifacts, ignore_errors=True)
store = old.Store(v3, artifacts=artifacts)

completed = run_experiment(tiny, ["name=tiny-completed"], store=store).run_id
store.add_tags(completed, ["baseline", "fixture"])
evaluate_run(store, completed, split="test")

real_save = training.save_atomically


def failing_save(failure):
    def save(payload, path):
        if path.name == "last.pt" and payload["epoch"] == 2:
            raise failure
        real_save(payload, path)
    return save


with pytest.MonkeyPatch.context() as patch:  # a full disk in epoch 2: the run fails
    patch.setattr(training, "save_atomically", failing_save(OSError(28, "No space left on device")))
    try:
        run_experiment(tiny, ["name=tiny-failed", "seed=1"], store=store)
    except TrainingFailed:
        pass
    else:
        raise AssertionError("the run did not fail")
with pytest.MonkeyPatch.context() as patch:  # Ctrl-C in epoch 2: the run is interrupted
    patch.setattr(training, "save_atomically", failing_save(KeyboardInterrupt()))
    try:
        run_experiment(tiny, ["name=tiny-interrupted", "seed=2", "training.epochs=3"], store=store)
    except RunInterrupted:
        pass
    else:
        raise AssertionError("the run was not interrupted")
store.engine.dispose()
compact(v3)
with sqlite3.connect(v3) as conn:
    print(conn.execute("SELECT id, name, status, epochs_run FROM runs ORDER BY started_at").fetchall())
    print(conn.execute("SELECT run_id, tag FROM tags ORDER BY tag").fetchall())
    print(conn.execute("SELECT run_id, split, accuracy FROM evaluations").fetchall())
'''


GENERATE_V4 = r'''
import os, shutil, signal, sqlite3, subprocess, sys, time
from pathlib import Path

import pytest

import runner.store as old
assert old.SCHEMA_VERSION == 4, old.SCHEMA_VERSION
assert Path(old.__file__).is_relative_to(os.environ["PYTHONPATH"]), old.__file__  # the old code, not the checkout
from runner import training
from runner.execute import RunInterrupted, TrainingFailed, run_experiment
from runner.inference import evaluate_run
from runner.registries import load_registries

here, tiny = Path(sys.argv[1]), Path(sys.argv[2])
v4 = here / "store_v4.db"
v4.unlink(missing_ok=True)
artifacts = Path("/tmp/v4art")
shutil.rmtree(artifacts, ignore_errors=True)
os.environ["RUNNER_DISABLE_PLUGINS"] = "1"
registries = load_registries()
store = old.Store(v4, artifacts=artifacts)

completed = run_experiment(tiny, ["name=tiny-completed"], store=store, registries=registries).run_id
store.manage.add_tags(completed, ["baseline", "fixture"])
evaluate_run(store, completed, registries, split="test")

real_save = training.save_tensors


def failing_save(failure):
    def save(payload, path):
        if path.name == "last.pt" and payload["epoch"] == 2:
            raise failure
        real_save(payload, path)
    return save


with pytest.MonkeyPatch.context() as patch:  # a full disk in epoch 2: the run fails
    patch.setattr(training, "save_tensors", failing_save(OSError(28, "No space left on device")))
    try:
        run_experiment(tiny, ["name=tiny-failed", "seed=1"], store=store, registries=registries)
    except TrainingFailed:
        pass
    else:
        raise AssertionError("the run did not fail")
with pytest.MonkeyPatch.context() as patch:  # Ctrl-C in epoch 2: the run is interrupted
    patch.setattr(training, "save_tensors", failing_save(KeyboardInterrupt()))
    try:
        run_experiment(tiny, ["name=tiny-interrupted", "seed=2", "training.epochs=3"], store=store, registries=registries)
    except RunInterrupted:
        pass
    else:
        raise AssertionError("the run was not interrupted")

# SIGKILL in epoch 2 of a run of its own process: the row stays "running" with its heartbeat deadline
proc = subprocess.Popen([sys.executable, "-m", "runner", "run", str(tiny), "--db", str(v4), "--artifacts", str(artifacts), "-q",
                         "--set", "name=tiny-killed", "--set", "seed=3", "--set", "training.epochs=50"])
while True:
    poll = sqlite3.connect(v4)
    row = poll.execute("SELECT epochs_run FROM runs WHERE name = 'tiny-killed'").fetchone()
    poll.close()  # an open connection would keep the file in WAL mode below
    if row and row[0] >= 1:
        break
    time.sleep(0.05)
proc.send_signal(signal.SIGKILL)
proc.wait()
store.engine.dispose()
with sqlite3.connect(v4) as conn:
    conn.execute("PRAGMA journal_mode=DELETE")
conn = sqlite3.connect(v4)
conn.execute("VACUUM")
conn.close()
with sqlite3.connect(v4) as conn:
    print(conn.execute("SELECT id, name, status, epochs_run FROM runs ORDER BY started_at").fetchall())
'''


def generate(commit: str, script: str) -> None:
    """Run ``script`` with ``runner/`` of ``commit`` on the import path (not the checkout's)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "runner"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        subprocess.run([sys.executable, "-c", script, str(HERE), str(ROOT / "tests" / "specs" / "tiny.yaml")],
                       check=True, cwd=tmp, env={**os.environ, "PYTHONPATH": tmp, "OMP_NUM_THREADS": "1"})


def main() -> None:
    wanted = sys.argv[1:] or ["3", "4"]
    if "3" in wanted:  # store_v2.db and store_v3.db
        generate(BASE, GENERATE)
    if "4" in wanted:
        generate(BASE_V4, GENERATE_V4)


if __name__ == "__main__":
    main()
