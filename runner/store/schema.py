"""The tables of the current schema: what a new store is created from, and what the queries use.

A change here needs a migration in :mod:`runner.store.migrations` that brings an older store to the
same tables (tests/test_migrations.py compares the two, column by column and index by index).
Migrations never import these models: they describe the tables as they were.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


# 64-bit integers (a seed up to 2**63-1, a checkpoint over 2 GiB, a parameter count): BIGINT on a
# server, where INTEGER has 32 bits; SQLite's INTEGER already holds 64
BigInteger = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(sa.String, primary_key=True)
    value: Mapped[str] = mapped_column(sa.String)


class Sweep(Base):
    """Many runs from one spec (``runner run SPEC --sweep …``, ``seeds:``): its runs are queued rows of ``runs``.

    A sweep is found again by its name and hash (the hash of its expanded runs), so running the same
    sweep command twice continues the first sweep instead of starting another.
    """

    __tablename__ = "sweeps"
    __table_args__ = (sa.UniqueConstraint("name", "spec_hash", name="uq_sweeps_name_spec_hash"),)
    id: Mapped[str] = mapped_column(sa.String, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String, index=True)
    spec_hash: Mapped[str] = mapped_column(sa.String)
    spec_json: Mapped[str] = mapped_column(sa.Text)  # the sweep as given: base spec, sweep section, seeds
    spec_dir: Mapped[str] = mapped_column(sa.String)  # where the spec's relative paths point
    keys_json: Mapped[str] = mapped_column(sa.Text)  # the swept spec keys, in order (the report's default --group-by)
    max_attempts: Mapped[int] = mapped_column(sa.Integer)  # a failed or lost run is started at most this often
    created_at: Mapped[datetime] = mapped_column(sa.DateTime)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(sa.String, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String, index=True)
    status: Mapped[str] = mapped_column(sa.String, index=True)
    spec_yaml: Mapped[str] = mapped_column(sa.Text)
    spec_json: Mapped[str] = mapped_column(sa.Text)
    spec_hash: Mapped[str] = mapped_column(sa.String, index=True)
    model: Mapped[str] = mapped_column(sa.String)
    strategy: Mapped[str] = mapped_column(sa.String)
    dataset: Mapped[str] = mapped_column(sa.String)
    seed: Mapped[int] = mapped_column(BigInteger)
    device: Mapped[str | None] = mapped_column(sa.String)
    host: Mapped[str | None] = mapped_column(sa.String)
    python_version: Mapped[str | None] = mapped_column(sa.String)
    torch_version: Mapped[str | None] = mapped_column(sa.String)
    torchvision_version: Mapped[str | None] = mapped_column(sa.String)
    runner_version: Mapped[str | None] = mapped_column(sa.String)
    git_commit: Mapped[str | None] = mapped_column(sa.String)
    params_total: Mapped[int | None] = mapped_column(BigInteger)
    params_trainable: Mapped[int | None] = mapped_column(BigInteger)
    model_summary: Mapped[str | None] = mapped_column(sa.Text)
    plugins_json: Mapped[str | None] = mapped_column(sa.Text)
    settings_json: Mapped[str | None] = mapped_column(sa.Text)
    class_names_json: Mapped[str | None] = mapped_column(sa.Text)
    confusion_json: Mapped[str | None] = mapped_column(sa.Text)
    weights_source: Mapped[str | None] = mapped_column(sa.String)
    weights_sha256: Mapped[str | None] = mapped_column(sa.String)
    started_at: Mapped[datetime] = mapped_column(sa.DateTime)
    ended_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    duration_s: Mapped[float | None] = mapped_column(sa.Float)
    heartbeat_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    # a running run not heard from by then died without a word (SIGKILL, out of memory): "lost"
    lost_after: Mapped[datetime | None] = mapped_column(sa.DateTime)
    epochs_run: Mapped[int] = mapped_column(sa.Integer, default=0)
    stop_reason: Mapped[str | None] = mapped_column(sa.String)
    best_epoch: Mapped[int | None] = mapped_column(sa.Integer)
    best_val_accuracy: Mapped[float | None] = mapped_column(sa.Float)
    error: Mapped[str | None] = mapped_column(sa.Text)
    traceback: Mapped[str | None] = mapped_column(sa.Text)
    artifacts_dir: Mapped[str | None] = mapped_column(sa.String)  # as Checkpoint.path
    # the process that may write this run's rows ("host:pid:nonce"); every other process is fenced off
    owner: Mapped[str | None] = mapped_column(sa.String)
    # a run of a sweep: its place in the sweep's expansion and the swept values it has (seed aside)
    sweep_id: Mapped[str | None] = mapped_column(sa.ForeignKey("sweeps.id"), index=True)
    sweep_index: Mapped[int | None] = mapped_column(sa.Integer)
    combination_json: Mapped[str | None] = mapped_column(sa.Text)
    # how many times a process started training the run (a queued run: 0; resumed or requeued: more)
    attempts: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))


class EpochMetric(Base):
    __tablename__ = "epoch_metrics"
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String, primary_key=True)
    value: Mapped[float | None] = mapped_column(sa.Float)  # NULL: not a finite number (a diverged loss)


class Epoch(Base):
    """Per-epoch bookkeeping that is not a metric (timings)."""

    __tablename__ = "epochs"
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    duration_s: Mapped[float] = mapped_column(sa.Float)
    finished_at: Mapped[datetime] = mapped_column(sa.DateTime)


class SplitMetric(Base):
    """End-of-training metrics of a split (``test``)."""

    __tablename__ = "split_metrics"
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    split: Mapped[str] = mapped_column(sa.String, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String, primary_key=True)
    value: Mapped[float | None] = mapped_column(sa.Float)  # NULL: not a finite number


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String, primary_key=True)  # best | last
    epoch: Mapped[int] = mapped_column(sa.Integer)
    # relative to runs/ beside the store (absolute elsewhere): read and written through Store.artifact_path / stored_path
    path: Mapped[str] = mapped_column(sa.String)
    sha256: Mapped[str] = mapped_column(sa.String)
    size_bytes: Mapped[int] = mapped_column(BigInteger)


class Tag(Base):
    """A user's label on a run (``runner tag``); ``--tag`` filters ``runs`` and ``report``."""

    __tablename__ = "tags"
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(sa.String, primary_key=True, index=True)


class Evaluation(Base):
    """A later evaluation of a run's checkpoint (``runner eval``): on its own split or other data."""

    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime)
    split: Mapped[str] = mapped_column(sa.String)
    checkpoint: Mapped[str] = mapped_column(sa.String)  # best | last
    checkpoint_epoch: Mapped[int | None] = mapped_column(sa.Integer)
    dataset: Mapped[str] = mapped_column(sa.String)
    overrides_json: Mapped[str] = mapped_column(sa.Text)  # the data.* overrides, [] for the run's own data
    device: Mapped[str | None] = mapped_column(sa.String)
    samples: Mapped[int] = mapped_column(sa.Integer)
    loss: Mapped[float | None] = mapped_column(sa.Float)  # NULL: not a finite number
    accuracy: Mapped[float] = mapped_column(sa.Float)
    f1_macro: Mapped[float] = mapped_column(sa.Float)


__all__ = ["Base", "Meta", "Sweep", "Run", "EpochMetric", "Epoch", "SplitMetric", "Checkpoint", "Tag", "Evaluation"]
