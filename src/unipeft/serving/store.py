"""The server's registry: tenants, their API keys (hashed) and who owns which delta, in SQLite.

It lives in ``<deltas dir>/.unipeft/registry.sqlite3`` beside the deltas it describes, so a
restart (or a SIGKILL) finds every tenant, key and uploaded delta again, and ``unipeft tenants``
can manage it from a shell while the server runs (SQLite's write-ahead log lets both at once).

Keys are random tokens shown once; only their SHA-256 is stored (a key has 256 bits of entropy,
so a slow password hash would add nothing). A presented key is looked up by its hash and the
stored hash compared with ``hmac.compare_digest``.

Deltas are owned by a tenant, or by the admin (owner ``""``): the folders found in the deltas
directory at start-up are the admin's; a tenant's uploads live under ``.tenants/<tenant>/``.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from ..errors import UnipeftError

STATE_DIR = ".unipeft"
TENANTS_DIR = ".tenants"
TENANT = re.compile(r"^[a-z0-9][a-z0-9_]{0,31}$")   # no '-' or '/': tenant names appear in paths and keys
KEY_PREFIX = "upk_"

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    hash TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS deltas (
    owner TEXT NOT NULL, name TEXT NOT NULL, base TEXT NOT NULL, path TEXT NOT NULL,
    method TEXT NOT NULL, bytes INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (owner, name));
"""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_tenant_name(name: str) -> str:
    if not isinstance(name, str) or not TENANT.match(name):
        raise UnipeftError(f"tenant name {name!r} is not allowed: use 1-32 lowercase letters, digits or '_', "
                           f"starting with a letter or digit")
    return name


def db_path(deltas_dir) -> Path:
    return Path(deltas_dir) / STATE_DIR / "registry.sqlite3"


class Store:
    """Tenants, hashed keys and delta ownership; safe to share between threads."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")   # a committed upload survives a power cut, not only a kill
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _q(self, sql: str, args=()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ tenants and keys
    def add_tenant(self, name: str) -> str:
        """Create tenant ``name``; returns its first key (shown once, stored hashed)."""
        check_tenant_name(name)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT INTO tenants VALUES (?, ?)", (name, time.time()))
                self._db.execute("INSERT INTO keys VALUES (?, ?, ?)", (hash_key(key), name, time.time()))
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                raise UnipeftError(f"tenant {name!r} exists already") from None
        return key

    def new_key(self, tenant: str) -> str:
        """Another key for ``tenant`` (the old ones keep working until the tenant is removed)."""
        if tenant not in self.tenants():
            raise UnipeftError(f"no tenant named {tenant!r}")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        self._q("INSERT INTO keys VALUES (?, ?, ?)", (hash_key(key), tenant, time.time()))
        return key

    def remove_tenant(self, name: str) -> list[tuple[str, str]]:
        """Delete a tenant and its keys; returns its deltas as (name, path) for the caller to remove."""
        if name not in self.tenants():
            raise UnipeftError(f"no tenant named {name!r}")
        deltas = [(n, p) for n, p in self._q("SELECT name, path FROM deltas WHERE owner = ?", (name,))]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM deltas WHERE owner = ?", (name,))
            self._db.execute("DELETE FROM tenants WHERE name = ?", (name,))
            self._db.execute("COMMIT")
        return deltas

    def tenants(self) -> list[str]:
        return [r[0] for r in self._q("SELECT name FROM tenants ORDER BY name")]

    def tenant_for_key(self, key: str) -> str | None:
        """The tenant a presented key belongs to, or None."""
        h = hash_key(key)
        rows = self._q("SELECT hash, tenant FROM keys WHERE hash = ?", (h,))
        for stored, tenant in rows:
            if hmac.compare_digest(stored, h):
                return tenant
        return None

    # ------------------------------------------------------------------ deltas
    def add_delta(self, owner: str, name: str, base: str, path, method: str, nbytes: int) -> None:
        # a delta found again at start-up keeps its creation time
        self._q("INSERT INTO deltas VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (owner, name) DO UPDATE SET "
                "base = excluded.base, path = excluded.path, method = excluded.method, bytes = excluded.bytes",
                (owner, name, base, str(path), method, int(nbytes), time.time()))

    def remove_delta(self, owner: str, name: str) -> None:
        self._q("DELETE FROM deltas WHERE owner = ? AND name = ?", (owner, name))

    def delta(self, owner: str, name: str) -> dict | None:
        rows = self._q("SELECT owner, name, base, path, method, bytes, created FROM deltas "
                       "WHERE owner = ? AND name = ?", (owner, name))
        return _row(rows[0]) if rows else None

    def deltas(self, owner: str | None = None) -> list[dict]:
        """Every delta, or those of ``owner`` ("" for the admin's)."""
        sql = "SELECT owner, name, base, path, method, bytes, created FROM deltas"
        rows = self._q(sql + " ORDER BY owner, name") if owner is None else \
            self._q(sql + " WHERE owner = ? ORDER BY name", (owner,))
        return [_row(r) for r in rows]


def _row(r: tuple) -> dict:
    return dict(zip(("owner", "name", "base", "path", "method", "bytes", "created"), r))
