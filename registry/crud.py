"""Database operations on repos, versions, aliases and blobs; keyword-only, one session each.

Listings use keyset pagination over indexed columns and load files and aliases of a whole page
in one query each, so their cost does not grow with the size of the catalogue.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, delete, exists, func, or_, text, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from quiver.errors import (AliasNotFound, InvalidRequest, RepoNotFound, VersionNotFound)
from quiver.refs import RESERVED_ALIASES, ALIAS_RE, AdapterRef, parse_ref
from quiver.registry.models import (Alias, Blob, ManifestFile, PushMetadata, Repo, Version,
                                    VersionFile)
from quiver.wire import FileEntry, PeftEssentials, RepoInfo, VersionInfo

__all__ = [
    "encode_cursor", "decode_cursor", "find_repo", "get_repo", "resolve", "version_infos",
    "repo_infos", "list_repos", "list_versions", "list_all_versions", "set_alias",
    "delete_alias", "archive_version", "delete_version", "delete_repo", "create_version",
    "publish_version", "fail_version", "record_blob", "unreferenced", "make_revision",
    "check_alias_name", "VISIBLE",
]

VISIBLE = ("ready", "archived")


# --- cursors ---------------------------------------------------------------------------------

def encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> Any:
    if not cursor:
        return None
    try:
        return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except ValueError as exc:
        raise InvalidRequest("malformed cursor", details={"cursor": cursor}) from exc


# --- lookups ---------------------------------------------------------------------------------

def _aware(ts: datetime | None) -> datetime | None:
    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


def find_repo(session: Session, *, name: str) -> Repo | None:
    return session.exec(select(Repo).where(Repo.name == name)).first()


def get_repo(session: Session, *, name: str) -> Repo:
    repo = find_repo(session, name=name)
    if repo is None:
        raise RepoNotFound(f"no repository {name!r}", details={"repo": name})
    return repo


def resolve(session: Session, *, ref: AdapterRef | str) -> tuple[Repo, Version]:
    """The repo and the version ``ref`` names; pending and failed versions are not visible."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    repo = get_repo(session, name=ref.repo)
    stmt = select(Version).where(Version.repo_id == repo.id)
    if ref.version is not None:
        stmt = stmt.where(Version.number == ref.version)
    elif ref.revision is not None:
        stmt = stmt.where(Version.revision == ref.revision)
    elif ref.alias is not None:      # two point lookups: no join for the planner to misjudge
        target = session.exec(select(Alias.version_id).where(Alias.repo_id == repo.id,
                                                             Alias.name == ref.alias)).first()
        if target is None:
            raise AliasNotFound(f"no alias {ref.alias!r} in {ref.repo!r}",
                                details={"ref": str(ref)})
        stmt = stmt.where(Version.id == target)
    elif repo.latest_version is not None:
        stmt = stmt.where(Version.number == repo.latest_version)
    else:
        raise VersionNotFound(f"{ref.repo!r} has no ready version", details={"ref": str(ref)})
    version = session.exec(stmt).first()
    if version is None or version.status not in VISIBLE:
        raise VersionNotFound(f"no version {str(ref)!r}", details={"ref": str(ref)})
    return repo, version


def version_infos(session: Session, versions: Sequence[Version],
                  repo_names: dict[int, str] | None = None) -> list[VersionInfo]:
    """Public views of ``versions``, with files and aliases loaded in one query each."""
    if not versions:
        return []
    ids = [v.id for v in versions]
    repo_names = dict(repo_names or {})
    missing = {v.repo_id for v in versions} - repo_names.keys()
    if missing:
        for rid, name in session.exec(select(Repo.id, Repo.name).where(col(Repo.id).in_(missing))):
            repo_names[rid] = name
    files: dict[int, list[FileEntry]] = defaultdict(list)
    rows = session.exec(select(VersionFile).where(col(VersionFile.version_id).in_(ids))
                        .order_by(VersionFile.version_id, VersionFile.path))
    for f in rows:
        files[f.version_id].append(FileEntry(path=f.path, sha256=f.sha256, size=f.size))
    aliases: dict[int, list[str]] = defaultdict(list)
    for vid, name in session.exec(select(Alias.version_id, Alias.name)
                                  .where(col(Alias.version_id).in_(ids))):
        aliases[vid].append(name)
    out = []
    for v in versions:
        repo = repo_names[v.repo_id]
        out.append(VersionInfo(
            repo=repo, version=v.number, ref=f"{repo}/{v.number}", revision=v.revision,
            status=v.status, base_model=v.base_model, base_model_revision=v.base_model_revision,
            adapter_type=v.adapter_type, peft=PeftEssentials(**v.peft) if v.peft else None,
            dtype=v.dtype, parameter_count=v.parameter_count, size_bytes=v.size_bytes,
            description=v.description, task_description=v.task_description,
            examples=list(v.examples or []), labels=dict(v.labels or {}), parent=v.parent,
            aliases=sorted(aliases[v.id]), pushed_by=v.pushed_by, created_at=_aware(v.created_at),
            files=files[v.id]))
    return out


def repo_infos(session: Session, repos: Sequence[Repo]) -> list[RepoInfo]:
    if not repos:
        return []
    rows = list(session.exec(select(Alias.repo_id, Alias.name, Alias.version_id)
                             .where(col(Alias.repo_id).in_([r.id for r in repos]))))
    numbers = dict(session.exec(select(Version.id, Version.number)
                                .where(col(Version.id).in_({vid for _, _, vid in rows}))).all()) \
        if rows else {}
    aliases: dict[int, dict[str, int]] = defaultdict(dict)
    for rid, name, vid in sorted(rows, key=lambda row: row[1]):
        aliases[rid][name] = numbers[vid]
    return [RepoInfo(name=r.name, namespace=r.namespace, description=r.description,
                     created_at=_aware(r.created_at), latest_version=r.latest_version,
                     version_count=r.version_count, aliases=aliases[r.id]) for r in repos]


def list_repos(session: Session, *, namespace: str | None = None, base_model: str | None = None,
               q: str | None = None, limit: int = 50,
               cursor: str | None = None) -> tuple[list[RepoInfo], str | None]:
    stmt = select(Repo)
    if namespace:
        stmt = stmt.where(Repo.namespace == namespace)
    if base_model:
        stmt = stmt.where(exists().where(Version.repo_id == Repo.id,
                                         Version.base_model == base_model,
                                         col(Version.status).in_(VISIBLE)))
    if q:
        pattern = f"%{q.lower()}%"
        stmt = stmt.where(or_(col(Repo.name).like(pattern),
                              func.lower(col(Repo.description)).like(pattern)))
    after = decode_cursor(cursor)
    if after is not None:
        stmt = stmt.where(Repo.name > str(after))
    repos = list(session.exec(stmt.order_by(Repo.name).limit(limit + 1)))
    more = len(repos) > limit
    repos = repos[:limit]
    return repo_infos(session, repos), encode_cursor(repos[-1].name) if more else None


def _statuses(status: str | None, default: Iterable[str]) -> list[str]:
    if status in (None, ""):
        return list(default)
    if status == "all":
        return ["ready", "archived", "failed"]
    allowed = {"ready", "archived", "failed"}
    wanted = [s.strip() for s in status.split(",") if s.strip()]
    bad = [s for s in wanted if s not in allowed]
    if bad or not wanted:
        raise InvalidRequest(f"unknown status filter {status!r}",
                             details={"allowed": sorted(allowed | {'all'})})
    return wanted


def list_versions(session: Session, *, repo: str, status: str | None = None, limit: int = 50,
                  cursor: str | None = None) -> tuple[list[VersionInfo], str | None]:
    """Versions of one repo, newest first."""
    r = get_repo(session, name=repo)
    stmt = select(Version).where(Version.repo_id == r.id,
                                 col(Version.status).in_(_statuses(status, VISIBLE)))
    after = decode_cursor(cursor)
    if after is not None:
        stmt = stmt.where(Version.number < int(after))
    rows = list(session.exec(stmt.order_by(col(Version.number).desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return (version_infos(session, rows, {r.id: r.name}),
            encode_cursor(rows[-1].number) if more else None)


def list_all_versions(session: Session, *, base_model: str | None = None, status: str | None = None,
                      limit: int = 100,
                      cursor: str | None = None) -> tuple[list[VersionInfo], str | None]:
    """Versions across repos in creation order (the router's training set)."""
    stmt = select(Version).where(col(Version.status).in_(_statuses(status, ["ready"])))
    if base_model:
        stmt = stmt.where(Version.base_model == base_model)
    after = decode_cursor(cursor)
    if after is not None:
        stmt = stmt.where(Version.id > int(after))
    rows = list(session.exec(stmt.order_by(Version.id).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return version_infos(session, rows), encode_cursor(rows[-1].id) if more else None


# --- aliases, archive, delete ------------------------------------------------------------------

def check_alias_name(alias: str) -> None:
    if not ALIAS_RE.match(alias) or alias in RESERVED_ALIASES or alias == "main":
        raise InvalidRequest(f"invalid alias {alias!r}: lower-case, starts with a letter, not "
                             "'latest' or 'main'", details={"alias": alias})


def set_alias(session: Session, *, repo: str, alias: str, number: int) -> tuple[Version, bool]:
    """Point ``alias`` at version ``number``; returns the version and whether the alias moved."""
    check_alias_name(alias)
    r, version = resolve(session, ref=AdapterRef(repo, version=number))
    row = session.exec(select(Alias).where(Alias.repo_id == r.id, Alias.name == alias)).first()
    moved = row is None or row.version_id != version.id
    if row is None:
        session.add(Alias(repo_id=r.id, name=alias, version_id=version.id))
    elif moved:
        row.version_id = version.id
        row.updated_at = datetime.now(UTC)
        session.add(row)
    session.commit()
    return version, moved


def delete_alias(session: Session, *, repo: str, alias: str) -> None:
    r = get_repo(session, name=repo)
    row = session.exec(select(Alias).where(Alias.repo_id == r.id, Alias.name == alias)).first()
    if row is None:
        raise AliasNotFound(f"no alias {alias!r} in {repo!r}",
                            details={"repo": repo, "alias": alias})
    session.delete(row)
    session.commit()


def _refresh_repo_counts(session: Session, repo_id: int) -> None:
    latest = (select(func.max(Version.number))
              .where(Version.repo_id == repo_id, Version.status == "ready").scalar_subquery())
    count = (select(func.count()).select_from(Version)
             .where(Version.repo_id == repo_id, col(Version.status).in_(VISIBLE)).scalar_subquery())
    session.exec(update(Repo).where(Repo.id == repo_id)
                 .values(latest_version=latest, version_count=count))


def archive_version(session: Session, *, repo: str, number: int) -> Version:
    r, version = resolve(session, ref=AdapterRef(repo, version=number))
    if version.status != "archived":
        version.status = "archived"
        session.add(version)
        session.flush()
        _refresh_repo_counts(session, r.id)
    session.commit()
    return version


def _delete_versions(session: Session, version_ids: list[int]) -> list[str]:
    if not version_ids:
        return []
    shas = list(session.exec(select(VersionFile.sha256)
                             .where(col(VersionFile.version_id).in_(version_ids)).distinct()))
    session.exec(delete(Alias).where(col(Alias.version_id).in_(version_ids)))
    session.exec(delete(VersionFile).where(col(VersionFile.version_id).in_(version_ids)))
    session.exec(delete(Version).where(col(Version.id).in_(version_ids)))
    return shas


def delete_version(session: Session, *, repo: str, number: int) -> tuple[Version, list[str]]:
    """Delete one version; returns it and the blobs it used (candidates for collection)."""
    r = get_repo(session, name=repo)
    version = session.exec(select(Version).where(Version.repo_id == r.id,
                                                 Version.number == number)).first()
    if version is None:
        raise VersionNotFound(f"no version {repo}/{number}", details={"ref": f"{repo}/{number}"})
    shas = _delete_versions(session, [version.id])
    _refresh_repo_counts(session, r.id)
    session.commit()
    return version, shas


def delete_repo(session: Session, *, repo: str) -> list[str]:
    r = get_repo(session, name=repo)
    ids = list(session.exec(select(Version.id).where(Version.repo_id == r.id)))
    shas = _delete_versions(session, ids)
    session.exec(delete(Alias).where(Alias.repo_id == r.id))
    session.exec(delete(Repo).where(Repo.id == r.id))
    session.commit()
    return shas


# --- publishing --------------------------------------------------------------------------------

def make_revision(repo: str, number: int, files: Iterable[ManifestFile]) -> str:
    """A 40-hex id from the repo, the number, the sorted file hashes and a random salt."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"{repo}\n{number}\n".encode())
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.sha256}\n".encode())
    h.update(uuid.uuid4().bytes)
    return h.hexdigest()


def _get_or_create_repo(session: Session, name: str) -> Repo:
    repo = find_repo(session, name=name)
    if repo is not None:
        return repo
    namespace = name.split("/")[0] if "/" in name else None
    try:
        with session.begin_nested():
            session.add(Repo(name=name, namespace=namespace))
    except IntegrityError:
        pass  # created by a concurrent push
    return get_repo(session, name=name)


def create_version(session: Session, *, repo: str, meta: PushMetadata, files: list[ManifestFile],
                   facts: dict[str, Any], pushed_by: str | None,
                   upload_id: str | None = None) -> Version:
    """Insert a pending version with the next number of ``repo`` and its file rows."""
    r = _get_or_create_repo(session, repo)
    bumped = session.exec(update(Repo).where(Repo.id == r.id)
                          .values(next_version=Repo.next_version + 1)
                          .returning(Repo.next_version)).one()
    number = bumped[0] - 1
    version = Version(
        repo_id=r.id, number=number, revision=make_revision(repo, number, files), status="pending",
        base_model=meta.base_model, base_model_revision=facts.get("base_model_revision"),
        adapter_type=meta.adapter_type, peft=facts.get("peft"), dtype=facts.get("dtype"),
        parameter_count=facts.get("parameter_count"), size_bytes=sum(f.size for f in files),
        description=meta.description, task_description=meta.task_description,
        examples=list(meta.examples), labels=dict(meta.labels), parent=facts.get("parent"),
        pushed_by=pushed_by, upload_id=upload_id)
    session.add(version)
    session.flush()
    for f in files:
        session.add(VersionFile(version_id=version.id, path=f.path, sha256=f.sha256, size=f.size))
    session.commit()
    return version


def publish_version(session: Session, *, version_id: int,
                    aliases: Iterable[str] = ()) -> tuple[Version, list[str]]:
    """Mark a pending version ready and point ``aliases`` at it; returns it and the aliases
    that moved."""
    version = session.get(Version, version_id)
    if version is None:
        raise VersionNotFound(f"no version with id {version_id}")
    if version.status == "ready":
        return version, []
    version.status = "ready"
    session.add(version)
    session.exec(update(Repo).where(Repo.id == version.repo_id).values(
        latest_version=case((or_(col(Repo.latest_version).is_(None),
                                 Repo.latest_version < version.number), version.number),
                            else_=Repo.latest_version),
        version_count=Repo.version_count + 1))
    moved = []
    for alias in aliases:
        row = session.exec(select(Alias).where(Alias.repo_id == version.repo_id,
                                               Alias.name == alias)).first()
        if row is None:
            session.add(Alias(repo_id=version.repo_id, name=alias, version_id=version.id))
        else:
            row.version_id = version.id
            row.updated_at = datetime.now(UTC)
            session.add(row)
        moved.append(alias)
    session.commit()
    _refresh_planner_stats(session, version.id)
    return version, moved


def _refresh_planner_stats(session: Session, version_id: int) -> None:
    """PostgreSQL picks the index plans of the listings from table statistics; refresh them each
    time the catalogue doubles, so plans stay right even where autovacuum is off."""
    if version_id < 64 or version_id & (version_id - 1):
        return
    if session.get_bind().dialect.name == "postgresql":
        session.exec(text("ANALYZE repo, version, version_file, alias"))
        session.commit()


def fail_version(session: Session, *, version_id: int) -> None:
    version = session.get(Version, version_id)
    if version is not None and version.status == "pending":
        version.status = "failed"
        session.add(version)
        session.commit()


# --- blobs -------------------------------------------------------------------------------------

def record_blob(session: Session, *, sha256: str, size: int) -> None:
    if session.get(Blob, sha256) is None:
        try:
            with session.begin_nested():
                session.add(Blob(sha256=sha256, size=size))
        except IntegrityError:
            pass
    session.commit()


def unreferenced(session: Session, *, candidates: Iterable[str] | None,
                 protected: Iterable[str] = ()) -> list[Blob]:
    """Blobs (among ``candidates``, or all) that no version and no ``protected`` hash uses."""
    stmt = select(Blob).where(~exists().where(VersionFile.sha256 == Blob.sha256))
    if candidates is not None:
        cands = list(set(candidates))
        if not cands:
            return []
        stmt = stmt.where(col(Blob.sha256).in_(cands))
    keep = set(protected)
    return [b for b in session.exec(stmt) if b.sha256 not in keep]
