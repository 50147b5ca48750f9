"""Managing stored runs (``store.manage``): tags, deleting runs, dropping checkpoint rows.

Only rows: the files (checkpoints, run directories) are removed by :mod:`runner.manage`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import sqlalchemy as sa

from runner.store import schema

if TYPE_CHECKING:
    from runner.store.database import Store


class RunManagement:
    """Changes to stored runs after they ran."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def add_tags(self, run_id: str, tags: Sequence[str]) -> None:
        """Add the tags the run does not carry yet (in the order given, each once)."""
        def write(conn: sa.Connection) -> None:
            existing = set(conn.execute(sa.select(schema.tags.c.tag).where(schema.tags.c.run_id == run_id)).scalars())
            new = [{"run_id": run_id, "tag": tag} for tag in dict.fromkeys(tags) if tag not in existing]
            if new:
                conn.execute(sa.insert(schema.tags), new)

        self._store.write(write)

    def remove_tags(self, run_id: str, tags: Sequence[str]) -> None:
        removed = sa.delete(schema.tags).where(schema.tags.c.run_id == run_id, schema.tags.c.tag.in_(list(tags)))
        self._store.write(lambda conn: conn.execute(removed))

    def delete_runs(self, run_ids: Sequence[str]) -> None:
        """Every row of these runs, in every table, in one transaction (artefacts are the caller's)."""
        ids = list(run_ids)

        def write(conn: sa.Connection) -> None:
            # children first: a database without ON DELETE CASCADE must not refuse the runs
            for table in reversed(schema.metadata.sorted_tables):
                if table.name != schema.runs.name and "run_id" in table.c:
                    conn.execute(sa.delete(table).where(table.c.run_id.in_(ids)))
            conn.execute(sa.delete(schema.runs).where(schema.runs.c.id.in_(ids)))

        self._store.write(write)

    def remove_checkpoint(self, run_id: str, kind: str) -> None:
        """The row of a checkpoint whose file is gone (retention removed it)."""
        removed = sa.delete(schema.checkpoints).where(schema.checkpoints.c.run_id == run_id, schema.checkpoints.c.kind == kind)
        self._store.write(lambda conn: conn.execute(removed))


__all__ = ["RunManagement"]
