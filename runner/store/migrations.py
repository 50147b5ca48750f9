"""Schema migrations: ordered functions, each bringing a store from version N-1 to N.

A new store is created from the current tables (:mod:`runner.store.schema`) and stamped with the
newest version; an older store runs the migrations it lacks, in order, in one transaction each
(:mod:`runner.store.database`). Each migration is self-contained: it spells out the tables as they
were at its version and never imports today's tables, so later schema changes cannot change what it
does. Never edit a released migration: add one. tests/test_migrations.py checks that a store
migrated from every released version (fixtures in tests/data) has exactly the tables of a new one.
"""

from __future__ import annotations

from typing import Callable

import sqlalchemy as sa


def m001_initial(conn: sa.Connection) -> None:
    """Version 1, the first release (the fixture tests/data/store_v1.db): runs and their results.

    New stores are created from the models, so this runs only to build a store up from nothing
    (tests do, to check the migrations add up to the models).
    """
    metadata = sa.MetaData()
    sa.Table(
        "meta", metadata,
        sa.Column("key", sa.String, primary_key=True),
        sa.Column("value", sa.String, nullable=False),
    )
    runs = sa.Table(
        "runs", metadata,
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("name", sa.String, nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("spec_yaml", sa.Text, nullable=False),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("spec_hash", sa.String, nullable=False),
        sa.Column("model", sa.String, nullable=False),
        sa.Column("strategy", sa.String, nullable=False),
        sa.Column("dataset", sa.String, nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("device", sa.String),
        sa.Column("host", sa.String),
        sa.Column("python_version", sa.String),
        sa.Column("torch_version", sa.String),
        sa.Column("torchvision_version", sa.String),
        sa.Column("runner_version", sa.String),
        sa.Column("git_commit", sa.String),
        sa.Column("params_total", sa.Integer),
        sa.Column("params_trainable", sa.Integer),
        sa.Column("model_summary", sa.Text),
        sa.Column("plugins_json", sa.Text),
        sa.Column("settings_json", sa.Text),
        sa.Column("class_names_json", sa.Text),
        sa.Column("confusion_json", sa.Text),
        sa.Column("weights_source", sa.String),
        sa.Column("weights_sha256", sa.String),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("ended_at", sa.DateTime),
        sa.Column("duration_s", sa.Float),
        sa.Column("heartbeat_at", sa.DateTime),
        sa.Column("epochs_run", sa.Integer, nullable=False),
        sa.Column("stop_reason", sa.String),
        sa.Column("best_epoch", sa.Integer),
        sa.Column("best_val_accuracy", sa.Float),
        sa.Column("error", sa.Text),
        sa.Column("traceback", sa.Text),
        sa.Column("artifacts_dir", sa.String),
        sa.Index("ix_runs_name", "name"),
        sa.Index("ix_runs_status", "status"),
        sa.Index("ix_runs_spec_hash", "spec_hash"),
    )

    def run_id() -> sa.Column:
        return sa.Column("run_id", sa.String, sa.ForeignKey(runs.c.id, ondelete="CASCADE"), primary_key=True)

    sa.Table(
        "epoch_metrics", metadata, run_id(),
        sa.Column("epoch", sa.Integer, primary_key=True),
        sa.Column("name", sa.String, primary_key=True),
        sa.Column("value", sa.Float, nullable=False),
    )
    sa.Table(
        "epochs", metadata, run_id(),
        sa.Column("epoch", sa.Integer, primary_key=True),
        sa.Column("duration_s", sa.Float, nullable=False),
        sa.Column("finished_at", sa.DateTime, nullable=False),
    )
    sa.Table(
        "split_metrics", metadata, run_id(),
        sa.Column("split", sa.String, primary_key=True),
        sa.Column("name", sa.String, primary_key=True),
        sa.Column("value", sa.Float, nullable=False),
    )
    sa.Table(
        "checkpoints", metadata, run_id(),
        sa.Column("kind", sa.String, primary_key=True),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("path", sa.String, nullable=False),
        sa.Column("sha256", sa.String, nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
    )
    metadata.create_all(conn)


def m002_lost_after(conn: sa.Connection) -> None:
    """Version 2: ``runs.lost_after``, the heartbeat deadline that shows a dead run as ``lost``.

    Runs still ``running`` in an older store were written by a runner without a heartbeat thread:
    their deadline is their last sign of life.
    """
    conn.execute(sa.text("ALTER TABLE runs ADD COLUMN lost_after DATETIME"))
    conn.execute(sa.text("UPDATE runs SET lost_after = heartbeat_at WHERE status = 'running'"))


def m003_tags_evaluations(conn: sa.Connection) -> None:
    """Version 3: the ``tags`` and ``evaluations`` tables (``runner tag``, ``runner eval``).

    The tables are spelled out here, not taken from the models, so later model changes cannot
    change what this migration does.
    """
    metadata = sa.MetaData()
    runs = sa.Table("runs", metadata, sa.Column("id", sa.String, primary_key=True))
    tags = sa.Table(
        "tags", metadata,
        sa.Column("run_id", sa.String, sa.ForeignKey(runs.c.id, ondelete="CASCADE"), primary_key=True),
        sa.Column("tag", sa.String, primary_key=True, index=True),
    )
    evaluations = sa.Table(
        "evaluations", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String, sa.ForeignKey(runs.c.id, ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("split", sa.String, nullable=False),
        sa.Column("checkpoint", sa.String, nullable=False),
        sa.Column("checkpoint_epoch", sa.Integer),
        sa.Column("dataset", sa.String, nullable=False),
        sa.Column("overrides_json", sa.Text, nullable=False),
        sa.Column("device", sa.String),
        sa.Column("samples", sa.Integer, nullable=False),
        sa.Column("loss", sa.Float, nullable=False),
        sa.Column("accuracy", sa.Float, nullable=False),
        sa.Column("f1_macro", sa.Float, nullable=False),
    )
    tags.create(conn)
    evaluations.create(conn)


def m004_run_owner(conn: sa.Connection) -> None:
    """Version 4: ``runs.owner``, the token of the one process allowed to write a run (the fence).

    Runs of older stores have no owner: nothing is fenced until a process claims them (resume).
    """
    column_type = sa.String().compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE runs ADD COLUMN owner {column_type}"))


def _rebuild_sqlite_table(conn: sa.Connection, table: sa.Table, indexes: list[tuple[str, str]]) -> None:
    """SQLite cannot change a column's constraints in place: copy the rows into ``table`` built anew.

    ``table`` is named ``<name>__new``; ``indexes`` are (index name, column) pairs made once it has
    the old table's name. Foreign keys stay on: only child tables are rebuilt, nothing refers to them.
    """
    name = table.name.removesuffix("__new")
    columns = ", ".join(c.name for c in table.columns)
    table.create(conn)
    conn.execute(sa.text(f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {name}"))
    conn.execute(sa.text(f"DROP TABLE {name}"))
    conn.execute(sa.text(f"ALTER TABLE {table.name} RENAME TO {name}"))
    for index, column in indexes:
        conn.execute(sa.text(f"CREATE INDEX {index} ON {name} ({column})"))


def _values_may_be_null(conn: sa.Connection) -> None:
    metadata = sa.MetaData()
    runs = sa.Table("runs", metadata, sa.Column("id", sa.String, primary_key=True))

    def run_id(primary_key: bool = True) -> sa.Column:
        return sa.Column("run_id", sa.String, sa.ForeignKey(runs.c.id, ondelete="CASCADE"), primary_key=primary_key,
                         nullable=False)

    rebuilt = [
        (sa.Table(
            "epoch_metrics__new", metadata, run_id(),
            sa.Column("epoch", sa.Integer, primary_key=True),
            sa.Column("name", sa.String, primary_key=True),
            sa.Column("value", sa.Float),
        ), []),
        (sa.Table(
            "split_metrics__new", metadata, run_id(),
            sa.Column("split", sa.String, primary_key=True),
            sa.Column("name", sa.String, primary_key=True),
            sa.Column("value", sa.Float),
        ), []),
        (sa.Table(
            "evaluations__new", metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            run_id(primary_key=False),
            sa.Column("created_at", sa.DateTime, nullable=False),
            sa.Column("split", sa.String, nullable=False),
            sa.Column("checkpoint", sa.String, nullable=False),
            sa.Column("checkpoint_epoch", sa.Integer),
            sa.Column("dataset", sa.String, nullable=False),
            sa.Column("overrides_json", sa.Text, nullable=False),
            sa.Column("device", sa.String),
            sa.Column("samples", sa.Integer, nullable=False),
            sa.Column("loss", sa.Float),
            sa.Column("accuracy", sa.Float, nullable=False),
            sa.Column("f1_macro", sa.Float, nullable=False),
        ), [("ix_evaluations_run_id", "run_id")]),
    ]
    if conn.dialect.name == "sqlite":
        for table, indexes in rebuilt:
            _rebuild_sqlite_table(conn, table, indexes)
        return
    for table, column in (("epoch_metrics", "value"), ("split_metrics", "value"), ("evaluations", "loss")):
        conn.execute(sa.text(f"ALTER TABLE {table} ALTER COLUMN {column} DROP NOT NULL"))


def _relative_artifact_paths(conn: sa.Connection) -> None:
    database = conn.engine.url.database or ""
    if conn.dialect.name != "sqlite" or not database.startswith("/"):
        return
    root = database[: database.rfind("/")] + "/runs/"
    metadata = sa.MetaData()
    runs = sa.Table("runs", metadata, sa.Column("id", sa.String, primary_key=True), sa.Column("artifacts_dir", sa.String))
    checkpoints = sa.Table(
        "checkpoints", metadata,
        sa.Column("run_id", sa.String, primary_key=True), sa.Column("kind", sa.String, primary_key=True), sa.Column("path", sa.String),
    )
    for run_id, directory in conn.execute(sa.select(runs.c.id, runs.c.artifacts_dir)).all():
        if directory and directory.startswith(root):
            conn.execute(sa.update(runs).where(runs.c.id == run_id).values(artifacts_dir=directory.removeprefix(root)))
    for run_id, kind, path in conn.execute(sa.select(checkpoints.c.run_id, checkpoints.c.kind, checkpoints.c.path)).all():
        if path.startswith(root):
            conn.execute(sa.update(checkpoints).where(checkpoints.c.run_id == run_id, checkpoints.c.kind == kind)
                         .values(path=path.removeprefix(root)))


def m005_portable_paths_and_missing_values(conn: sa.Connection) -> None:
    """Version 5: artefact paths relative to the store's ``runs/``, and metric values that may be missing.

    Checkpoint paths and run directories inside ``runs/`` beside the store's file become relative
    to it, so that the store can be moved or copied with its runs; paths elsewhere stay absolute.
    A metric that is not a finite number (a diverged loss) is stored as NULL: ``epoch_metrics.value``,
    ``split_metrics.value`` and ``evaluations.loss`` lose their NOT NULL.
    """
    _values_may_be_null(conn)
    _relative_artifact_paths(conn)


def m006_sweeps(conn: sa.Connection) -> None:
    """Version 6: the ``sweeps`` table and the queue columns of ``runs`` (``sweep_id``, ``sweep_index``,
    ``combination_json``, ``attempts``); runs can now be ``queued``.

    Every run of an older store was started once: its ``attempts`` is 1. The table is spelled out
    here, not taken from the models, so later model changes cannot change what this migration does.
    """
    metadata = sa.MetaData()
    sweeps = sa.Table(
        "sweeps", metadata,
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("name", sa.String, nullable=False, index=True),
        sa.Column("spec_hash", sa.String, nullable=False),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("spec_dir", sa.String, nullable=False),
        sa.Column("keys_json", sa.Text, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("name", "spec_hash", name="uq_sweeps_name_spec_hash"),
    )
    sweeps.create(conn)

    def column_type(kind: sa.types.TypeEngine) -> str:
        return str(kind.compile(dialect=conn.dialect))

    text, integer = column_type(sa.Text()), column_type(sa.Integer())
    for column in (
        f"sweep_id {column_type(sa.String())} REFERENCES sweeps (id)",
        f"sweep_index {integer}",
        f"combination_json {text}",
        f"attempts {integer} DEFAULT 0 NOT NULL",
    ):
        conn.execute(sa.text(f"ALTER TABLE runs ADD COLUMN {column}"))
    conn.execute(sa.text("CREATE INDEX ix_runs_sweep_id ON runs (sweep_id)"))
    conn.execute(sa.text("UPDATE runs SET attempts = 1"))


def m007_big_integers(conn: sa.Connection) -> None:
    """Version 7: 64-bit seeds, parameter counts and checkpoint sizes on a server database.

    A seed may be up to 2**63-1 and a checkpoint over 2 GiB; PostgreSQL's INTEGER holds 32 bits, so
    those columns become BIGINT there. SQLite's INTEGER already holds 64 bits: nothing to do.
    """
    if conn.dialect.name == "sqlite":
        return
    for table, column in (("runs", "seed"), ("runs", "params_total"), ("runs", "params_trainable"), ("checkpoints", "size_bytes")):
        conn.execute(sa.text(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE BIGINT"))


def m008_runs_listing_indexes(conn: sa.Connection) -> None:
    """Version 8: indexes for the order every listing of runs comes in, newest first.

    Without them the newest page of ``runner runs`` sorted the whole table (a 100,000-run SQLite
    store: 106 ms of the listing, 0.5 ms with ``ix_runs_started_at``). ``ix_runs_status_started_at``
    does the same for one status and replaces the index on ``status`` alone, which it contains.
    """
    conn.execute(sa.text("CREATE INDEX ix_runs_started_at ON runs (started_at)"))
    conn.execute(sa.text("CREATE INDEX ix_runs_status_started_at ON runs (status, started_at)"))
    conn.execute(sa.text("DROP INDEX ix_runs_status"))


MIGRATIONS: list[Callable[[sa.Connection], None]] = [
    m001_initial, m002_lost_after, m003_tags_evaluations, m004_run_owner, m005_portable_paths_and_missing_values,
    m006_sweeps, m007_big_integers, m008_runs_listing_indexes,
]
SCHEMA_VERSION = len(MIGRATIONS)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]
