"""Managing stored runs (``store.manage``): tags, deleting runs, dropping checkpoint rows.

Only rows: the files (checkpoints, run directories) are removed by :mod:`runner.manage`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import sqlalchemy as sa
from sqlalchemy.orm import Session

from runner.store.schema import Base, Checkpoint, Run, Tag

if TYPE_CHECKING:
    from runner.store.database import Store


class RunManagement:
    """Changes to stored runs after they ran."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def add_tags(self, run_id: str, tags: Sequence[str]) -> None:
        """Add the tags the run does not carry yet (in the order given, each once)."""
        def write(session: Session) -> None:
            existing = set(session.execute(sa.select(Tag.tag).where(Tag.run_id == run_id)).scalars())
            session.add_all(Tag(run_id=run_id, tag=tag) for tag in dict.fromkeys(tags) if tag not in existing)

        self._store.write(write)

    def remove_tags(self, run_id: str, tags: Sequence[str]) -> None:
        self._store.write(lambda s: s.execute(sa.delete(Tag).where(Tag.run_id == run_id, Tag.tag.in_(list(tags)))))

    def delete_runs(self, run_ids: Sequence[str]) -> None:
        """Every row of these runs, in every table, in one transaction (artefacts are the caller's)."""
        ids = list(run_ids)

        def write(session: Session) -> None:
            # children first: a database without ON DELETE CASCADE must not refuse the runs
            for table in reversed(Base.metadata.sorted_tables):
                if table.name != Run.__tablename__ and "run_id" in table.c:
                    session.execute(sa.delete(table).where(table.c.run_id.in_(ids)))
            session.execute(sa.delete(Run).where(Run.id.in_(ids)))

        self._store.write(write)

    def remove_checkpoint(self, run_id: str, kind: str) -> None:
        """The row of a checkpoint whose file is gone (retention removed it)."""
        self._store.write(lambda s: s.execute(sa.delete(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.kind == kind)))


__all__ = ["RunManagement"]
