"""API tokens: generation, hashed storage, scopes and per-repo write rights.

A token is shown once, at creation; the database keeps only its sha256. Scopes are ``read``,
``write`` (implies read) and ``admin`` (implies all). A token created with ``repos`` patterns
(``org/*``, ``news-*``; shell-style) may write only to matching repos.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase

from sqlmodel import Session, select

from quiver.errors import Forbidden, Unauthorized
from quiver.registry.models import Token

__all__ = ["Principal", "ANONYMOUS", "PrincipalCache", "hash_token", "new_token_secret",
           "principal_for_digest", "ensure_admin_token", "BOOTSTRAP_TOKEN_NAME"]

BOOTSTRAP_TOKEN_NAME = "bootstrap-admin"
_IMPLIED = {"admin": {"admin", "write", "read"}, "write": {"write", "read"}, "read": {"read"}}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a token's name, effective scopes and repo patterns (None: all repos)."""

    name: str
    scopes: frozenset[str]
    repos: tuple[str, ...] | None = None
    token_id: int | None = None

    @property
    def anonymous(self) -> bool:
        return self.token_id is None

    def has(self, scope: str) -> bool:
        return scope in self.scopes

    def may_write(self, repo: str) -> bool:
        if not self.has("write"):
            return False
        if self.has("admin") or self.repos is None:
            return True
        return any(fnmatchcase(repo, pattern) for pattern in self.repos)

    def require(self, scope: str) -> None:
        if self.has(scope):
            return
        if self.anonymous:
            raise Unauthorized(f"this call needs a token with the {scope!r} scope",
                               details={"scope": scope})
        raise Forbidden(f"token {self.name!r} lacks the {scope!r} scope", details={"scope": scope})

    def require_write(self, repo: str) -> None:
        self.require("write")
        if not self.may_write(repo):
            raise Forbidden(f"token {self.name!r} may not write to {repo!r}",
                            details={"repo": repo, "allowed": list(self.repos or [])})


ANONYMOUS = Principal(name="anonymous", scopes=frozenset())


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token_secret() -> str:
    return "qvr_" + secrets.token_urlsafe(32)


def _effective(scopes: list[str]) -> frozenset[str]:
    out: set[str] = set()
    for s in scopes:
        out |= _IMPLIED.get(s, set())
    return frozenset(out)


def principal_for_digest(session: Session, digest: str) -> Principal:
    """The principal of the bearer token whose :func:`hash_token` is ``digest``;
    :class:`Unauthorized` when unknown."""
    row = session.exec(select(Token).where(Token.token_hash == digest)).first()
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        raise Unauthorized("invalid or revoked token")
    return Principal(name=row.name, scopes=_effective(row.scopes),
                     repos=tuple(row.repos) if row.repos is not None else None, token_id=row.id)


class PrincipalCache:
    """Principals of recently used tokens, by token hash, each kept ``ttl_s`` seconds.

    A push or a pull is a burst of requests with one token (manifest, parts, commit; ranged
    reads): the burst costs one lookup. A token deleted through this process is forgotten at
    once, and a lookup that began before the deletion is not kept; another process serving the
    same database stops accepting it within ``ttl_s``. Only known tokens are kept, so a bad
    token is looked up (and refused) every time.
    """

    MAX_ENTRIES = 4096

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal]] = {}     # digest -> (looked up, who)
        self._lock = threading.Lock()
        self.generation = 0
        """Bumped by every :meth:`forget`; :meth:`put` drops a lookup that began before one."""

    def get(self, digest: str) -> Principal | None:
        if self.ttl_s <= 0:
            return None
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[0] + self.ttl_s <= time.monotonic():
                del self._entries[digest]
                return None
            return entry[1]

    def put(self, digest: str, principal: Principal, *, generation: int) -> None:
        """Keep what a lookup begun at ``generation`` found."""
        if self.ttl_s <= 0:
            return
        now = time.monotonic()
        with self._lock:
            if generation != self.generation:
                return
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries = {k: v for k, v in self._entries.items()
                                 if v[0] + self.ttl_s > now}
                while len(self._entries) >= self.MAX_ENTRIES:     # all fresh: drop the oldest
                    del self._entries[next(iter(self._entries))]
            self._entries[digest] = (now, principal)

    def forget(self, token_id: int) -> None:
        with self._lock:
            self.generation += 1
            self._entries = {k: v for k, v in self._entries.items()
                             if v[1].token_id != token_id}


def ensure_admin_token(session: Session, secret: str) -> None:
    """Store the bootstrap admin token (hashed), replacing an older bootstrap token."""
    digest = hash_token(secret)
    old = session.exec(select(Token).where(Token.name == BOOTSTRAP_TOKEN_NAME)).all()
    if any(t.token_hash == digest for t in old):
        return
    for t in old:
        session.delete(t)
    session.flush()
    session.add(Token(name=BOOTSTRAP_TOKEN_NAME, token_hash=digest, scopes=["admin"]))
    session.commit()
