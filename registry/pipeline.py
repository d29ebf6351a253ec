"""The steps every push goes through, whichever way its bytes arrived.

    prepare  → who may write, base model registered, parent resolved, alias names valid
    inspect  → file contents checked against the base model (validation.inspect_adapter)
    publish  → pending version with the next number, then ready; events out

and the collection of blobs nothing refers to any more.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlmodel import Session, col, select

from quiver.logging import get_logger, log_event
from quiver.refs import parse_ref, parse_repo
from quiver.registry import crud
from quiver.registry.auth import Principal
from quiver.registry.catalogue import get_base_model
from quiver.registry.models import Blob, ManifestFile, PushMetadata, Upload, Version
from quiver.registry.state import Registry
from quiver.wire import BaseModelInfo, RegistryEvent, VersionInfo

__all__ = ["PushContext", "prepare_push", "publish", "collect_blobs", "expire_uploads",
           "version_info"]

_log = get_logger("quiver.registry.pipeline")


@dataclass(frozen=True, slots=True)
class PushContext:
    repo: str
    base: BaseModelInfo
    parent: str | None


async def prepare_push(reg: Registry, *, repo: str, meta: PushMetadata,
                       principal: Principal) -> PushContext:
    """Checks that need no file content; raises before anything is stored."""
    parse_repo(repo)
    principal.require_write(repo)
    for alias in meta.aliases:
        crud.check_alias_name(alias)

    def lookup(session: Session) -> PushContext:
        base = get_base_model(session, name=meta.base_model)
        parent = None
        if meta.parent:
            r, v = crud.resolve(session, ref=parse_ref(meta.parent))
            parent = f"{r.name}/{v.number}"
        return PushContext(repo=repo, base=base, parent=parent)

    return await reg.db.run(lookup)


async def version_info(reg: Registry, version_id: int) -> VersionInfo:
    def load(session: Session) -> VersionInfo:
        return crud.version_infos(session, [session.get(Version, version_id)])[0]

    return await reg.db.run(load)


async def publish(reg: Registry, *, ctx: PushContext, meta: PushMetadata,
                  files: list[ManifestFile], facts: dict, principal: Principal,
                  upload_id: str | None = None) -> VersionInfo:
    """Give the push the repo's next version number, make it ready and close its upload (all
    in one trip to a database thread), then announce it."""
    facts = {**facts, "parent": ctx.parent}

    def write(session: Session) -> tuple[VersionInfo, list[str]]:
        pending = crud.create_version(session, repo=ctx.repo, meta=meta, files=files, facts=facts,
                                      pushed_by=principal.name, upload_id=upload_id)
        if upload_id is not None:
            upload = session.get(Upload, upload_id)
            upload.state, upload.version_id = "committed", pending.id
            session.add(upload)
        return _made_ready(session, pending.id, meta.aliases)

    info, moved = await reg.db.run(write, write=True)
    await _announce(reg, info, moved)
    return info


async def finish(reg: Registry, *, version_id: int, aliases: list[str]) -> VersionInfo:
    """Pending → ready (idempotent), with aliases and events."""
    info, moved = await reg.db.run(lambda s: _made_ready(s, version_id, aliases), write=True)
    await _announce(reg, info, moved)
    return info


def _made_ready(session: Session, version_id: int,
                aliases: list[str]) -> tuple[VersionInfo, list[str]]:
    """Pending → ready with its aliases; the version and the aliases that moved."""
    version, moved = crud.publish_version(session, version_id=version_id, aliases=aliases)
    return crud.version_infos(session, [version])[0], moved


async def _announce(reg: Registry, info: VersionInfo, moved: list[str]) -> None:
    now = datetime.now(UTC).timestamp()
    await reg.emit(RegistryEvent(type="version.ready", repo=info.repo, version=info.version,
                                 revision=info.revision, base_model=info.base_model, ts=now))
    for alias in moved:
        await reg.emit(RegistryEvent(type="alias.moved", repo=info.repo, version=info.version,
                                     revision=info.revision, base_model=info.base_model,
                                     alias=alias, ts=now))
    log_event(_log, "version.ready", ref=info.ref, revision=info.revision, files=len(info.files))


def _protected_shas(session: Session) -> set[str]:
    """Hashes listed by uploads still open: never collected under a push in flight."""
    out: set[str] = set()
    for files in session.exec(select(Upload.files).where(Upload.state == "open")):
        out.update(f["sha256"] for f in files)
        out.update(f["declared"] for f in files if f.get("declared"))   # hashes sent later
    return out


async def collect_blobs(reg: Registry, candidates: list[str] | None = None) -> tuple[int, int]:
    """Delete blobs no version and no open upload refers to; returns (count, bytes)."""
    def pick(session: Session) -> list[Blob]:
        return crud.unreferenced(session, candidates=candidates,
                                 protected=_protected_shas(session))

    doomed = await reg.db.run(pick, write=True)
    freed = count = 0
    for blob in doomed:
        def forget(session: Session, sha: str = blob.sha256) -> bool:
            # Re-check under the write lock: a push may have started using it meanwhile.
            if not crud.unreferenced(session, candidates=[sha], protected=_protected_shas(session)):
                return False
            row = session.get(Blob, sha)
            if row is not None:
                session.delete(row)
                session.commit()
            return True

        if await reg.db.run(forget, write=True):
            await reg.store.delete(blob.sha256)
            freed += blob.size
            count += 1
    if count:
        log_event(_log, "blobs.collected", count=count, bytes=freed)
    return count, freed


async def expire_uploads(reg: Registry) -> int:
    """Close uploads past their expiry and drop their staged parts; versions left pending that
    long (a publish interrupted and never retried) become ``failed``."""
    now = datetime.now(UTC)
    cutoff = now - timedelta(seconds=reg.settings.upload_ttl_s)

    def expired(session: Session) -> list[str]:
        rows = list(session.exec(select(Upload).where(Upload.state == "open",
                                                      col(Upload.expires_at) < now)))
        for row in rows:
            row.state = "expired"
            session.add(row)
        session.commit()
        stale = session.exec(select(Version.id).where(Version.status == "pending",
                                                      col(Version.created_at) < cutoff))
        for version_id in list(stale):
            crud.fail_version(session, version_id=version_id)
        return [r.id for r in rows]

    ids = await reg.db.run(expired, write=True)
    for upload_id in ids:
        await reg.store.abort_parts(upload_id)
    return len(ids)
