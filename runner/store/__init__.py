"""The results store: the only package that talks to the database (SQLAlchemy 2.x). It never imports torch.

- :mod:`~runner.store.database`: :class:`Store`, opening a store (engine, SQLite settings, lock
  retries, schema creation and migration, transactions) and where run artefacts live;
- :mod:`~runner.store.schema`: the tables of the current schema; :mod:`~runner.store.migrations`:
  how an older store becomes one;
- ``store.runs`` (:mod:`~runner.store.runs`): writing runs; ``store.query``
  (:mod:`~runner.store.queries`): reading them, for ``runs``, ``show``, ``report`` and ``compare``;
  ``store.manage`` (:mod:`~runner.store.manage`): tags and deleting runs; ``store.queue``
  (:mod:`~runner.store.queue`): sweeps, their queued runs, claims and requeues.
"""

from runner.store.database import ARTIFACTS_ENV, DB_ENV, DEFAULT_DB, Store, artifacts_required, mask_url, missing_artifacts, resolve_url
from runner.store.migrations import SCHEMA_VERSION
from runner.store.queries import RunFilter
from runner.store.runs import new_owner
from runner.store.status import LOST_AFTER_BEATS, RESUMABLE, STATUSES, live_status, utcnow

__all__ = [
    "new_owner",
    "Store", "RunFilter", "STATUSES", "RESUMABLE", "LOST_AFTER_BEATS", "SCHEMA_VERSION",
    "utcnow", "live_status", "resolve_url", "mask_url", "artifacts_required", "missing_artifacts", "DB_ENV", "DEFAULT_DB", "ARTIFACTS_ENV",
]
