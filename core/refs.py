"""Adapter references: the public names of adapter versions.

    REPO        := NAME | NAMESPACE "/" NAME        (each part: [a-z0-9][a-z0-9._-]*, with a letter)
    REF         := REPO                              latest ready version
                 | REPO "/" N                        version N (N >= 1)
                 | REPO "@" ALIAS                    an alias such as prod, staging
                 | REPO "@" REVISION                 the 40-hex revision id of a version

Because a name must contain a letter, a trailing all-digit segment is always a version number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quiver.errors import InvalidReference

__all__ = ["AdapterRef", "parse_ref", "parse_repo", "REVISION_RE", "ALIAS_RE", "is_revision"]

_PART = r"[a-z0-9][a-z0-9._-]{0,95}"
_PART_RE = re.compile(rf"^{_PART}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
REVISION_RE = re.compile(r"^[0-9a-f]{40}$")
RESERVED_ALIASES = frozenset({"latest"})


def is_revision(text: str) -> bool:
    return bool(REVISION_RE.match(text))


def _check_part(part: str, whole: str) -> None:
    if not _PART_RE.match(part) or part.isdigit() or ".." in part:
        raise InvalidReference(
            f"invalid repository name {whole!r}: parts are lower-case letters, digits, '.', '_' "
            "or '-', start with a letter or digit and contain at least one letter",
            details={"ref": whole},
        )


def parse_repo(text: str) -> str:
    """Validate a repository name (``name`` or ``namespace/name``) and return it."""
    parts = text.split("/")
    if not 1 <= len(parts) <= 2:
        raise InvalidReference(f"invalid repository name {text!r}", details={"ref": text})
    for p in parts:
        _check_part(p, text)
    return text


@dataclass(frozen=True, slots=True)
class AdapterRef:
    repo: str
    version: int | None = None
    alias: str | None = None
    revision: str | None = None

    @property
    def namespace(self) -> str | None:
        return self.repo.split("/")[0] if "/" in self.repo else None

    @property
    def is_pinned(self) -> bool:
        """True when the ref names one immutable version (a number or a revision id)."""
        return self.version is not None or self.revision is not None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.repo}/{self.version}"
        if self.alias is not None:
            return f"{self.repo}@{self.alias}"
        if self.revision is not None:
            return f"{self.repo}@{self.revision}"
        return self.repo


def parse_ref(text: str) -> AdapterRef:
    """Parse ``repo``, ``repo/3``, ``org/repo@prod`` or ``repo@<40-hex revision>``."""
    if not isinstance(text, str) or not text or len(text) > 300:
        raise InvalidReference(f"invalid adapter reference {text!r}", details={"ref": text})
    text = text.strip()
    if "@" in text:
        repo, _, tag = text.partition("@")
        parse_repo(repo)
        if REVISION_RE.match(tag):
            return AdapterRef(repo, revision=tag)
        if not ALIAS_RE.match(tag):
            raise InvalidReference(f"invalid alias {tag!r} in {text!r}", details={"ref": text})
        if tag == "latest":
            return AdapterRef(repo)
        return AdapterRef(repo, alias=tag)
    parts = text.split("/")
    if len(parts) >= 2 and parts[-1].isdigit():
        version = int(parts[-1])
        repo = "/".join(parts[:-1])
        parse_repo(repo)
        if version < 1:
            raise InvalidReference(f"version numbers start at 1: {text!r}", details={"ref": text})
        return AdapterRef(repo, version=version)
    return AdapterRef(parse_repo(text))
