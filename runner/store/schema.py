"""The tables of the current schema: what a new store is created from, and what the queries use.

SQLAlchemy Core tables, no ORM: importing ``sqlalchemy.orm`` and building mapped classes cost every
command about a tenth of a second at start-up (``runner runs`` on 1,000 runs: a 489 ms median with
them, 377 ms without), for nothing the store needs.
A column is NOT NULL unless it says ``nullable=True``.

A change here needs a migration in :mod:`runner.store.migrations` that brings an older store to the
same tables (tests/test_migrations.py compares the two, column by column and index by index).
Migrations never import these tables: they describe the tables as they were.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData()

# 64-bit integers (a seed up to 2**63-1, a checkpoint over 2 GiB, a parameter count): BIGINT on a
# server, where INTEGER has 32 bits; SQLite's INTEGER already holds 64
BigInteger = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _column(name: str, *args: Any, nullable: bool = False, **kwargs: Any) -> sa.Column[Any]:
    """A column, NOT NULL unless ``nullable`` (SQLAlchemy's own default is the opposite)."""
    return sa.Column(name, *args, nullable=nullable, **kwargs)


def _run_id() -> sa.Column[Any]:
    """The column of a table holding rows of one run: part of its primary key, deleted with the run."""
    return _column("run_id", sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)


meta = sa.Table(
    "meta", metadata,
    _column("key", sa.String, primary_key=True),
    _column("value", sa.String),
)

# Many runs from one spec (``runner run SPEC --sweep …``, ``seeds:``): its runs are queued rows of ``runs``.
# A sweep is found again by its name and hash (the hash of its expanded runs), so running the same
# sweep command twice continues the first sweep instead of starting another.
sweeps = sa.Table(
    "sweeps", metadata,
    _column("id", sa.String, primary_key=True),
    _column("name", sa.String, index=True),
    _column("spec_hash", sa.String),
    _column("spec_json", sa.Text),  # the sweep as given: base spec, sweep section, seeds
    _column("spec_dir", sa.String),  # where the spec's relative paths point
    _column("keys_json", sa.Text),  # the swept spec keys, in order (the report's default --group-by)
    _column("max_attempts", sa.Integer),  # a failed or lost run is started at most this often
    _column("created_at", sa.DateTime),
    sa.UniqueConstraint("name", "spec_hash", name="uq_sweeps_name_spec_hash"),
)

runs = sa.Table(
    "runs", metadata,
    _column("id", sa.String, primary_key=True),
    _column("name", sa.String, index=True),
    _column("status", sa.String),
    _column("spec_yaml", sa.Text),
    _column("spec_json", sa.Text),
    _column("spec_hash", sa.String, index=True),
    _column("model", sa.String),
    _column("strategy", sa.String),
    _column("dataset", sa.String),
    _column("seed", BigInteger),
    _column("device", sa.String, nullable=True),
    _column("host", sa.String, nullable=True),
    _column("python_version", sa.String, nullable=True),
    _column("torch_version", sa.String, nullable=True),
    _column("torchvision_version", sa.String, nullable=True),
    _column("runner_version", sa.String, nullable=True),
    _column("git_commit", sa.String, nullable=True),
    _column("params_total", BigInteger, nullable=True),
    _column("params_trainable", BigInteger, nullable=True),
    _column("model_summary", sa.Text, nullable=True),
    _column("plugins_json", sa.Text, nullable=True),
    _column("settings_json", sa.Text, nullable=True),
    _column("class_names_json", sa.Text, nullable=True),
    _column("confusion_json", sa.Text, nullable=True),
    _column("weights_source", sa.String, nullable=True),
    _column("weights_sha256", sa.String, nullable=True),
    # `runner runs` reads the newest page through this index instead of sorting every run
    _column("started_at", sa.DateTime, index=True),
    _column("ended_at", sa.DateTime, nullable=True),
    _column("duration_s", sa.Float, nullable=True),
    _column("heartbeat_at", sa.DateTime, nullable=True),
    # a running run not heard from by then died without a word (SIGKILL, out of memory): "lost"
    _column("lost_after", sa.DateTime, nullable=True),
    _column("epochs_run", sa.Integer, default=0),
    _column("stop_reason", sa.String, nullable=True),
    _column("best_epoch", sa.Integer, nullable=True),
    _column("best_val_accuracy", sa.Float, nullable=True),
    _column("error", sa.Text, nullable=True),
    _column("traceback", sa.Text, nullable=True),
    _column("artifacts_dir", sa.String, nullable=True),  # as checkpoints.path
    # the process that may write this run's rows ("host:pid:nonce"); every other process is fenced off
    _column("owner", sa.String, nullable=True),
    # a run of a sweep: its place in the sweep's expansion and the swept values it has (seed aside)
    _column("sweep_id", sa.ForeignKey("sweeps.id"), index=True, nullable=True),
    _column("sweep_index", sa.Integer, nullable=True),
    _column("combination_json", sa.Text, nullable=True),
    # how many times a process started training the run (a queued run: 0; resumed or requeued: more)
    _column("attempts", sa.Integer, server_default=sa.text("0")),
    # a status's newest runs, in order (`runner runs --status failed`), without sorting all of them
    sa.Index("ix_runs_status_started_at", "status", "started_at"),
)

epoch_metrics = sa.Table(
    "epoch_metrics", metadata,
    _run_id(),
    _column("epoch", sa.Integer, primary_key=True),
    _column("name", sa.String, primary_key=True),
    _column("value", sa.Float, nullable=True),  # NULL: not a finite number (a diverged loss)
)

# Per-epoch bookkeeping that is not a metric (timings).
epochs = sa.Table(
    "epochs", metadata,
    _run_id(),
    _column("epoch", sa.Integer, primary_key=True),
    _column("duration_s", sa.Float),
    _column("finished_at", sa.DateTime),
)

# End-of-training metrics of a split (``test``).
split_metrics = sa.Table(
    "split_metrics", metadata,
    _run_id(),
    _column("split", sa.String, primary_key=True),
    _column("name", sa.String, primary_key=True),
    _column("value", sa.Float, nullable=True),  # NULL: not a finite number
)

checkpoints = sa.Table(
    "checkpoints", metadata,
    _run_id(),
    _column("kind", sa.String, primary_key=True),  # best | last
    _column("epoch", sa.Integer),
    # relative to runs/ beside the store (absolute elsewhere): read and written through Store.artifact_path / stored_path
    _column("path", sa.String),
    _column("sha256", sa.String),
    _column("size_bytes", BigInteger),
)

# A user's label on a run (``runner tag``); ``--tag`` filters ``runs`` and ``report``.
tags = sa.Table(
    "tags", metadata,
    _run_id(),
    _column("tag", sa.String, primary_key=True, index=True),
)

# A later evaluation of a run's checkpoint (``runner eval``): on its own split or other data.
evaluations = sa.Table(
    "evaluations", metadata,
    _column("id", sa.Integer, primary_key=True, autoincrement=True),
    _column("run_id", sa.ForeignKey("runs.id", ondelete="CASCADE"), index=True),
    _column("created_at", sa.DateTime),
    _column("split", sa.String),
    _column("checkpoint", sa.String),  # best | last
    _column("checkpoint_epoch", sa.Integer, nullable=True),
    _column("dataset", sa.String),
    _column("overrides_json", sa.Text),  # the data.* overrides, [] for the run's own data
    _column("device", sa.String, nullable=True),
    _column("samples", sa.Integer),
    _column("loss", sa.Float, nullable=True),  # NULL: not a finite number
    _column("accuracy", sa.Float),
    _column("f1_macro", sa.Float),
)


__all__ = [
    "metadata", "meta", "sweeps", "runs", "epoch_metrics", "epochs", "split_metrics",
    "checkpoints", "tags", "evaluations",
]
