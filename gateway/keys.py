"""API keys: stored as sha256 hashes, in Redis (shared by every replica) or in this process.

A key carries the adapters it may use (patterns over ``repo`` and ``repo/N``, such as
``acme/*``, ``support-bot`` or ``support-bot/3``; none means all), whether it may call base
models without an adapter, and its requests-per-minute and tokens-per-minute limits.
The plain key is shown once, when it is created, and never stored.

Lookups are cached for a few seconds so the hot path rarely touches Redis; a revoked key stops
working on every replica within that time. While Redis is unreachable, keys seen before keep
working from the cache and unknown keys are refused with 503: authentication never fails open.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from quiver.errors import InvalidRequest, NotFound, Unavailable
from quiver.logging import get_logger, log_event

__all__ = ["ApiKey", "KeyStore", "hash_key", "REDIS_ERRORS"]

_log = get_logger("quiver.gateway.keys")
_CACHE_TTL_S = 5.0
_MAX_CACHED = 50_000
# What a lost Redis raises: redis-py's errors do not derive from the builtin ones.
REDIS_ERRORS = (RedisError, ConnectionError, OSError, TimeoutError)


def hash_key(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


@dataclass(slots=True)
class ApiKey:
    id: str
    name: str
    adapters: list[str] | None = None
    base_models: bool = True
    rpm: int | None = None
    tpm: int | None = None
    created_at: float = field(default_factory=time.time)

    def allows(self, adapter: str | None) -> bool:
        """True when this key may call ``adapter`` (canonical ``repo/N``; None: base model)."""
        if adapter is None:
            return self.base_models
        if self.adapters is None:
            return True
        repo = adapter.partition("@")[0] if "@" in adapter else adapter.rsplit("/", 1)[0]
        return any(fnmatch.fnmatchcase(adapter, p) or fnmatch.fnmatchcase(repo, p)
                   for p in self.adapters)

    def public(self) -> dict[str, Any]:
        return asdict(self)


def _key_from_json(text: str) -> ApiKey:
    data = json.loads(text)
    return ApiKey(**{k: data[k] for k in ApiKey.__dataclass_fields__ if k in data})


def _validate(name: str, adapters: list[str] | None, rpm: int | None, tpm: int | None) -> None:
    if not isinstance(name, str) or not name or len(name) > 200:
        raise InvalidRequest("a key needs a name of 1 to 200 characters", details={"param": "name"})
    if adapters is not None and (not isinstance(adapters, list)
                                 or not all(isinstance(a, str) and a for a in adapters)):
        raise InvalidRequest("adapters must be a list of patterns", details={"param": "adapters"})
    for label, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InvalidRequest(f"{label} must be a positive integer", details={"param": label})


class KeyStore:
    """Keys by hash. ``redis`` is a ``redis.asyncio`` client, or None for in-process storage."""

    def __init__(self, redis: Any | None, prefix: str) -> None:
        self._redis = redis
        self._hash_key = prefix + "keys"
        self._memory: dict[str, str] = {}
        self._cache: dict[str, tuple[ApiKey | None, float]] = {}

    async def create(self, *, name: str, adapters: list[str] | None = None,
                     base_models: bool = True, rpm: int | None = None,
                     tpm: int | None = None, plain: str | None = None) -> tuple[ApiKey, str]:
        """Store a new key and return it with its plain text (shown this once)."""
        _validate(name, adapters, rpm, tpm)
        plain = plain or "qk-" + secrets.token_urlsafe(32)
        digest = hash_key(plain)
        key = ApiKey(id=digest[:16], name=name, adapters=adapters, base_models=base_models,
                     rpm=rpm, tpm=tpm)
        await self._put(digest, json.dumps(key.public()))
        self._cache.pop(digest, None)
        log_event(_log, "key.created", id=key.id, name=name)
        return key, plain

    async def load_file(self, path: str | Path) -> int:
        """Load keys from a JSON file: a list of ``{"key" or "sha256", "name", "adapters"?,
        "base_models"?, "rpm"?, "tpm"?}``. Returns how many were loaded."""
        entries = json.loads(Path(path).read_text())
        if not isinstance(entries, list):
            raise InvalidRequest(f"{path}: expected a JSON list of keys")
        for entry in entries:
            digest = entry.get("sha256") or hash_key(entry["key"])
            _validate(entry.get("name", ""), entry.get("adapters"), entry.get("rpm"),
                      entry.get("tpm"))
            key = ApiKey(id=digest[:16], name=entry["name"], adapters=entry.get("adapters"),
                         base_models=entry.get("base_models", True), rpm=entry.get("rpm"),
                         tpm=entry.get("tpm"))
            await self._put(digest, json.dumps(key.public()))
        return len(entries)

    async def lookup(self, plain: str) -> ApiKey | None:
        """The key for ``plain``, or None when it is unknown."""
        digest = hash_key(plain)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            raw = await self._get(digest)
        except REDIS_ERRORS as exc:
            if cached is not None and cached[0] is not None:
                return cached[0]
            log_event(_log, "keys.unavailable", level=30, error=str(exc))
            raise Unavailable("the key store is unreachable", retry_after=1) from exc
        key = _key_from_json(raw) if raw else None
        if len(self._cache) >= _MAX_CACHED:  # made-up keys must not grow the cache forever
            for stale in [d for d, (_, until) in self._cache.items() if until <= now]:
                del self._cache[stale]
            while len(self._cache) >= _MAX_CACHED:
                del self._cache[next(iter(self._cache))]
        self._cache[digest] = (key, now + _CACHE_TTL_S)
        return key

    async def list(self) -> list[ApiKey]:
        raw = (await self._redis.hgetall(self._hash_key)).values() if self._redis \
            else self._memory.values()
        return sorted((_key_from_json(r) for r in raw), key=lambda k: k.created_at)

    async def delete(self, key_id: str) -> None:
        items = await self._redis.hgetall(self._hash_key) if self._redis else dict(self._memory)
        for digest, raw in items.items():
            if _key_from_json(raw).id == key_id:
                if self._redis:
                    await self._redis.hdel(self._hash_key, digest)
                else:
                    del self._memory[digest]
                self._cache.pop(digest, None)
                log_event(_log, "key.deleted", id=key_id)
                return
        raise NotFound(f"no key with id {key_id!r}")

    async def _put(self, digest: str, raw: str) -> None:
        if self._redis:
            await self._redis.hset(self._hash_key, digest, raw)
        else:
            self._memory[digest] = raw

    async def _get(self, digest: str) -> str | None:
        if self._redis:
            return await self._redis.hget(self._hash_key, digest)
        return self._memory.get(digest)
