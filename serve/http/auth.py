"""API keys: stored hashed, compared in constant time, revocable without a restart.

The keys file (YAML) holds one entry per key, never the key itself::

    keys:
      - name: team-a
        sha256: 9f86d0...        # sha256 hex of the key
        revoked: false
        requests_per_s: 10       # optional: overrides the configured default
        images_per_min: 300      # optional
        max_priority: 5          # optional: the highest job priority it may ask for

``kandinsky-serve keys new NAME --file F`` makes a key, prints it once and appends its
hash; ``kandinsky-serve keys revoke NAME --file F`` revokes it. The file is re-read when
it changes, so a revocation takes effect within a second, without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from serve.settings import MAX_JOB_PRIORITY

KEY_PREFIX = "ks-"


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes
    revoked: bool = False
    requests_per_s: float | None = None
    images_per_min: float | None = None
    admin: bool = False
    """Sees and cancels every client's jobs (others see only their own); any job priority."""
    max_priority: int | None = None
    """The highest job ``priority`` this key may ask for; None: ``args.jobs.max_priority``."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def load_keys(path: Path) -> list[ApiKey]:
    """Parse a keys file; raise ``ValueError`` naming the entry at fault."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with a 'keys' list")
    keys = []
    for index, entry in enumerate(data.get("keys") or []):
        where = f"{path}: keys.{index}"
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("sha256"):
            raise ValueError(f"{where}: needs a name and a sha256")
        try:
            raw = bytes.fromhex(str(entry["sha256"]))
        except ValueError:
            raise ValueError(f"{where}.sha256: not hex") from None
        if len(raw) != 32:
            raise ValueError(f"{where}.sha256: must be 64 hex digits")
        max_priority = entry.get("max_priority")
        if max_priority is not None and (type(max_priority) is not int or abs(max_priority) > MAX_JOB_PRIORITY):
            raise ValueError(f"{where}.max_priority: an integer from -{MAX_JOB_PRIORITY} to {MAX_JOB_PRIORITY}")
        keys.append(ApiKey(
            str(entry["name"]), raw, bool(entry.get("revoked", False)),
            entry.get("requests_per_s"), entry.get("images_per_min"), entry.get("admin", False) is True, max_priority,
        ))
    names = [key.name for key in keys]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: key names must be unique")
    return keys


def add_key(path: Path, name: str, requests_per_s: float | None = None, images_per_min: float | None = None,
            admin: bool = False, max_priority: int | None = None) -> str:
    """Append a new key's hash to ``path``; return the key (shown once, never stored)."""
    data = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
    entries = data.setdefault("keys", [])
    if any(entry.get("name") == name for entry in entries):
        raise ValueError(f"{path}: a key named {name!r} exists already")
    key = new_key()
    entry = {"name": name, "sha256": digest(key).hex(), "revoked": False}
    if requests_per_s is not None:
        entry["requests_per_s"] = requests_per_s
    if images_per_min is not None:
        entry["images_per_min"] = images_per_min
    if admin:
        entry["admin"] = True
    if max_priority is not None:
        entry["max_priority"] = max_priority
    entries.append(entry)
    _write(path, data)
    return key


def revoke_key(path: Path, name: str) -> None:
    data = yaml.safe_load(path.read_text()) or {}
    for entry in data.get("keys") or []:
        if entry.get("name") == name:
            entry["revoked"] = True
            _write(path, data)
            return
    raise ValueError(f"{path}: no key named {name!r}")


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(yaml.safe_dump(data, sort_keys=False))
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


class KeyStore:
    """The keys in force, reloaded when the file changes (checked at most once a second)."""

    def __init__(self, path: Path, check_interval_s: float = 1.0) -> None:
        self.path = path
        self.check_interval_s = check_interval_s
        self._keys: list[ApiKey] = load_keys(path)
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[int, int]:
        stat = self.path.stat()
        return stat.st_mtime_ns, stat.st_size

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.check_interval_s:
            return
        self._checked = now
        try:
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._keys, self._stamp = load_keys(self.path), stamp
        except (OSError, ValueError):
            pass  # keep the last good keys; a broken edit must not open or close the API

    def lookup(self, presented: str) -> ApiKey | None:
        """The entry whose hash matches ``presented`` (revoked or not), else None.

        Every entry is compared, with ``hmac.compare_digest``, so the time taken does not
        depend on which entry (if any) matches or how much of it does.
        """
        self._refresh()
        wanted = digest(presented)
        found = None
        for key in self._keys:
            if hmac.compare_digest(key.digest, wanted):
                found = key
        return found
