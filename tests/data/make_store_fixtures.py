"""How tests/data/store_v2.db and store_v3.db were made (run once; the tests use the committed files).

Each fixture is a store written by the code of a released schema version, so the migrations are
tested against what old runners really wrote, not against what today's models say they wrote:

- ``store_v1.db`` (made earlier, by the first release): one completed tiny run.
- ``store_v2.db``: ``store_v1.db`` migrated to version 2 (and no further) by the migration code of
  commit ``BASE``.
- ``store_v3.db``: a new store of commit ``BASE`` (schema version 3, the last one with a single
  ``runner/store.py``) holding three real tiny runs: one completed, tagged and evaluated, one failed
  (its epoch-2 checkpoint could not be written) and one interrupted (in epoch 2).

The script extracts ``runner/`` of commit ``BASE`` with ``git archive`` into a temporary directory
and runs the generator there, so the fixtures come from the old code whatever the checkout holds::

    .venv/bin/python tests/data/make_store_fixtures.py            # writes tests/data/store_v{2,3}.db

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


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASE, "runner"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        subprocess.run([sys.executable, "-c", GENERATE, str(HERE), str(ROOT / "tests" / "specs" / "tiny.yaml")],
                       check=True, cwd=tmp, env={**os.environ, "PYTHONPATH": tmp, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    main()
