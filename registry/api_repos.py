"""Repos, versions and aliases: lookups, listings and the moves that change what a name means."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from quiver.refs import parse_ref, parse_repo
from quiver.registry import crud, pipeline
from quiver.registry.deps import Admin, Reader, RegistryDep, Writer
from quiver.registry.models import AliasUpdate
from quiver.wire import RegistryEvent, RepoInfo, VersionInfo

__all__ = ["router"]

router = APIRouter(tags=["repos"])

Limit = Annotated[int, Query(ge=1, le=1000)]


@router.get("/api/v1/repos")
async def list_repos(reg: RegistryDep, _: Reader, namespace: str | None = None,
                     base_model: str | None = None, q: str | None = None, limit: Limit = 50,
                     cursor: str | None = None) -> dict[str, Any]:
    items, nxt = await reg.db.run(lambda s: crud.list_repos(
        s, namespace=namespace, base_model=base_model, q=q, limit=limit, cursor=cursor))
    return {"items": items, "next_cursor": nxt}


@router.get("/api/v1/repos/{repo:path}/-/info", response_model=RepoInfo)
async def repo_info(repo: str, reg: RegistryDep, _: Reader) -> RepoInfo:
    parse_repo(repo)
    return await reg.db.run(lambda s: crud.repo_infos(s, [crud.get_repo(s, name=repo)])[0])


@router.get("/api/v1/repos/{repo:path}/-/versions")
async def list_versions(repo: str, reg: RegistryDep, _: Reader, status: str | None = None,
                        limit: Limit = 50, cursor: str | None = None) -> dict[str, Any]:
    parse_repo(repo)
    items, nxt = await reg.db.run(lambda s: crud.list_versions(
        s, repo=repo, status=status, limit=limit, cursor=cursor))
    return {"items": items, "next_cursor": nxt}


@router.get("/api/v1/resolve/{ref:path}", response_model=VersionInfo)
async def resolve(ref: str, reg: RegistryDep, _: Reader) -> VersionInfo:
    parsed = parse_ref(ref)

    def load(session) -> VersionInfo:
        repo, version = crud.resolve(session, ref=parsed)
        return crud.version_infos(session, [version], {repo.id: repo.name})[0]

    return await reg.db.run(load)


@router.get("/api/v1/versions")
async def list_all_versions(reg: RegistryDep, _: Reader, base_model: str | None = None,
                            status: str | None = "ready", limit: Limit = 100,
                            cursor: str | None = None) -> dict[str, Any]:
    items, nxt = await reg.db.run(lambda s: crud.list_all_versions(
        s, base_model=base_model, status=status, limit=limit, cursor=cursor))
    return {"items": items, "next_cursor": nxt}


def _event(kind: str, info: VersionInfo, alias: str | None = None) -> RegistryEvent:
    return RegistryEvent(type=kind, repo=info.repo, version=info.version, revision=info.revision,
                         base_model=info.base_model, alias=alias, ts=datetime.now(UTC).timestamp())


@router.put("/api/v1/repos/{repo:path}/-/aliases/{alias}", response_model=VersionInfo)
async def set_alias(repo: str, alias: str, body: AliasUpdate, reg: RegistryDep,
                    principal: Writer) -> VersionInfo:
    parse_repo(repo)
    principal.require_write(repo)
    version, moved = await reg.db.run(
        lambda s: crud.set_alias(s, repo=repo, alias=alias, number=body.version), write=True)
    info = await pipeline.version_info(reg, version.id)
    if moved:
        await reg.emit(_event("alias.moved", info, alias))
    return info


@router.delete("/api/v1/repos/{repo:path}/-/aliases/{alias}", status_code=204)
async def delete_alias(repo: str, alias: str, reg: RegistryDep, principal: Writer) -> Response:
    parse_repo(repo)
    principal.require_write(repo)
    await reg.db.run(lambda s: crud.delete_alias(s, repo=repo, alias=alias), write=True)
    return Response(status_code=204)


@router.post("/api/v1/repos/{repo:path}/-/versions/{number}/archive", response_model=VersionInfo)
async def archive(repo: str, number: int, reg: RegistryDep, principal: Writer) -> VersionInfo:
    parse_repo(repo)
    principal.require_write(repo)
    version = await reg.db.run(lambda s: crud.archive_version(s, repo=repo, number=number),
                               write=True)
    info = await pipeline.version_info(reg, version.id)
    await reg.emit(_event("version.archived", info))
    return info


@router.delete("/api/v1/repos/{repo:path}/-/versions/{number}", status_code=204)
async def delete_version(repo: str, number: int, reg: RegistryDep, _: Admin) -> Response:
    parse_repo(repo)
    version, shas = await reg.db.run(lambda s: crud.delete_version(s, repo=repo, number=number),
                                     write=True)
    await pipeline.collect_blobs(reg, shas)
    await reg.emit(RegistryEvent(type="version.deleted", repo=repo, version=number,
                                 revision=version.revision, base_model=version.base_model,
                                 ts=datetime.now(UTC).timestamp()))
    return Response(status_code=204)


@router.delete("/api/v1/repos/{repo:path}", status_code=204)
async def delete_repo(repo: str, reg: RegistryDep, _: Admin) -> Response:
    parse_repo(repo)
    shas = await reg.db.run(lambda s: crud.delete_repo(s, repo=repo), write=True)
    await pipeline.collect_blobs(reg, shas)
    await reg.emit(RegistryEvent(type="version.deleted", repo=repo,
                                 ts=datetime.now(UTC).timestamp()))
    return Response(status_code=204)
