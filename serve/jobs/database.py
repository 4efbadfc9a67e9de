"""Job records on disk: an embedded SQLite database (standard library, WAL), so that job
state and results survive a restart of the store actor. Plain Python, no Ray.

What is kept: every field of a job (state, timings, error, seeds, owner...) and its result
images. What is not: its event history and preview image (a reloaded job starts a new
history with one ``state`` event, numbered after the last one it had sent) and its
in-flight progress between state changes (the next report of its runner brings it back).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

logger = logging.getLogger("kandinsky_serve.jobs")

SCHEMA_VERSION = 1
NOT_STORED = frozenset({"images", "events", "preview", "stored_bytes"})
"""Job fields that are not part of its record (images have their own table)."""


class JobDatabase:
    """One SQLite file; the store calls it on every state change (not on every progress report).

    Writes use ``synchronous=NORMAL`` in WAL mode: a committed change survives the process
    being killed; only a power loss can take back the last moments. One connection, used
    from the store's one thread.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).expanduser()
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"{self.path}: job database schema {version}, this version reads {SCHEMA_VERSION}; "
                               "move the file away (its jobs are lost) or run the version that wrote it")
        self._db.executescript(f"""
            CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, record TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS images (
                job_id TEXT NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (job_id, idx));
            PRAGMA user_version = {SCHEMA_VERSION};
        """)

    def save(self, job: Any, with_images: bool = False) -> None:
        """Insert or replace ``job``'s record (a :class:`serve.jobs.store.Job`) (and, with ``with_images``, its images) in one transaction."""
        record = {f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.name not in NOT_STORED}
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO jobs (id, record) VALUES (?, ?)",
                             (job.id, json.dumps(record, separators=(",", ":"))))
            if with_images:
                self._db.execute("DELETE FROM images WHERE job_id = ?", (job.id,))
                self._db.executemany("INSERT INTO images (job_id, idx, data) VALUES (?, ?, ?)",
                                     [(job.id, index, image) for index, image in enumerate(job.images)])

    def delete(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        with self._transaction():
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(job_id,) for job_id in job_ids])
            self._db.executemany("DELETE FROM images WHERE job_id = ?", [(job_id,) for job_id in job_ids])

    def load(self, job_class: type) -> list[Any]:
        """Every stored job as a ``job_class`` (the store's ``Job``), with its images; a record this version cannot read is skipped (logged)."""
        known = {f.name for f in dataclasses.fields(job_class)} - NOT_STORED
        images: dict[str, list[bytes]] = {}
        for job_id, _, data in self._db.execute("SELECT job_id, idx, data FROM images ORDER BY job_id, idx"):
            images.setdefault(job_id, []).append(bytes(data))
        jobs = []
        for job_id, record in self._db.execute("SELECT id, record FROM jobs"):
            try:
                fields = {name: value for name, value in json.loads(record).items() if name in known}
                jobs.append(job_class(**fields, images=images.get(job_id, [])))
            except (TypeError, ValueError):
                logger.warning("job %s: unreadable record in %s, skipped", job_id, self.path, exc_info=True)
        return jobs

    def close(self) -> None:
        self._db.close()

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN")

    def __exit__(self, kind, error, traceback) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
