"""The asynchronous read side of the client (``quiver.client.AsyncClient``).

Services (the router, the gateway, the backend's disk cache) use it inside their event loop:
lookups, listings, and :meth:`AsyncClient.download_version`, which streams each file into the
shared content-addressed cache, verifies its sha256 while it arrives, resumes a short
download with a ``Range`` request and starts over once on a corrupt one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any, AsyncIterator

import httpx

from quiver.errors import ChecksumMismatch, RegistryUnavailable, UpstreamError
from quiver.http import raise_for_status
from quiver.refs import parse_ref, parse_repo
from quiver.wire import BaseModelInfo, FileEntry, RepoInfo, VersionInfo

from quiver.client._cache import Cache, hash_file, safe_relpath
from quiver.client._client import http_options, resolve_settings, transport_error
from quiver.client._download import blob_url
from quiver.client.settings import ClientSettings

__all__ = ["AsyncClient"]

_ATTEMPTS = 4


async def _acquire(lock) -> None:
    """Take a blocking lock in a worker thread; if we are cancelled meanwhile, let it go."""
    pending = asyncio.ensure_future(asyncio.to_thread(lock.acquire))
    try:
        await asyncio.shield(pending)
    except asyncio.CancelledError:
        pending.add_done_callback(lambda f: f.exception() is None and lock.release())
        raise


class AsyncClient:
    """Async lookups and verified downloads against a Quiver registry."""

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 cache_dir: str | Path | None = None, timeout: float | None = None,
                 settings: ClientSettings | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.settings = resolve_settings(settings, url=url, token=token, cache_dir=cache_dir,
                                         timeout=timeout)
        self.url = self.settings.registry_url.rstrip("/")
        self.cache = Cache(self.settings.cache_path)
        self._http = httpx.AsyncClient(transport=transport, **http_options(self.settings))
        self._limit = asyncio.Semaphore(self.settings.parallel_downloads)
        self._inflight: dict[str, asyncio.Future] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = await self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise transport_error(exc, self.url) from exc
        raise_for_status(r)
        return r

    async def _pages(self, path: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        params = {k: v for k, v in params.items() if v is not None}
        while True:
            body = (await self._request("GET", path, params=params)).json()
            for item in body.get("items", []):
                yield item
            cursor = body.get("next_cursor")
            if not cursor:
                return
            params = {**params, "cursor": cursor}

    # --- reads ------------------------------------------------------------------------------------

    async def resolve(self, ref: str) -> VersionInfo:
        r = await self._request("GET", f"/api/v1/resolve/{parse_ref(ref)}")
        return VersionInfo.model_validate(r.json())

    async def list_versions(self, repo: str, status: str | None = None) -> list[VersionInfo]:
        path = f"/api/v1/repos/{parse_repo(repo)}/-/versions"
        return [VersionInfo.model_validate(i) async for i in self._pages(path, {"status": status})]

    async def list_all_versions(self, base_model: str | None = None,
                                status: str | None = None) -> list[VersionInfo]:
        params = {"base_model": base_model, "status": status}
        pages = self._pages("/api/v1/versions", params)
        return [VersionInfo.model_validate(i) async for i in pages]

    async def list_repos(self, **filters: Any) -> list[RepoInfo]:
        return [RepoInfo.model_validate(i) async for i in self._pages("/api/v1/repos", filters)]

    async def get_base_model(self, name: str) -> BaseModelInfo:
        r = await self._request("GET", f"/api/v1/base-models/{name}")
        return BaseModelInfo.model_validate(r.json())

    async def list_base_models(self) -> list[BaseModelInfo]:
        items = (await self._request("GET", "/api/v1/base-models")).json().get("items", [])
        return [BaseModelInfo.model_validate(i) for i in items]

    # --- downloads --------------------------------------------------------------------------------

    async def download_version(self, info: VersionInfo, dest_dir: Path) -> Path:
        """Fetch every file of ``info`` into the cache, then make ``dest_dir`` hold them.

        ``dest_dir`` is replaced atomically; its files are hard links to verified blobs.
        """
        for entry in info.files:
            safe_relpath(entry.path)
        unique = {e.sha256: e for e in info.files}
        await asyncio.gather(*(self._ensure_blob(e) for e in unique.values()))
        return await asyncio.to_thread(self.cache.link_tree, info.files, Path(dest_dir))

    async def _ensure_blob(self, entry: FileEntry) -> None:
        # One download per blob even when several versions share it.
        running = self._inflight.get(entry.sha256)
        if running is not None:
            await asyncio.shield(running)
            return
        fut = asyncio.get_running_loop().create_future()
        self._inflight[entry.sha256] = fut
        try:
            if not await asyncio.to_thread(self.cache.has_blob, entry):
                async with self._limit:
                    lock = self.cache.blob_lock(entry.sha256)
                    await _acquire(lock)
                    try:
                        if not await asyncio.to_thread(self.cache.has_blob, entry):
                            await self._fetch_blob(entry)
                    finally:
                        lock.release()
            fut.set_result(None)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            self._inflight.pop(entry.sha256, None)

    async def _fetch_blob(self, entry: FileEntry) -> None:
        path = self.cache.partial_path(entry.sha256)
        for attempt in range(2):
            state = self.cache.load_partial(entry, max(1, entry.size))
            held = state.have[0] if state.chunk_count == 1 else 0
            hasher = (await asyncio.to_thread(hash_file, path, 0, held)) if held \
                else hashlib.sha256()
            state.have = [held]
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                await self._stream_into(fd, entry, state, hasher)
            finally:
                os.close(fd)
                if state.have[0] < entry.size:
                    self.cache.save_partial(entry.sha256, state)
            try:
                await asyncio.to_thread(self.cache.finish_partial, entry, hasher.hexdigest())
                return
            except ChecksumMismatch:
                if attempt == 1:
                    raise

    async def _stream_into(self, fd: int, entry: FileEntry, state, hasher) -> None:
        """Append bytes ``state.have[0]:`` of the blob to ``fd``, hashing them as they come."""
        end = entry.size
        for attempt in range(_ATTEMPTS):
            pos = state.have[0]
            if pos >= end:
                return
            try:
                headers = {"Range": f"bytes={pos}-{end - 1}"}
                async with self._http.stream("GET", blob_url(entry.sha256),
                                             headers=headers) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        raise_for_status(r)
                    if r.status_code == 206:
                        if not r.headers.get("content-range", "").startswith(f"bytes {pos}-"):
                            raise UpstreamError(
                                f"registry answered the wrong range for {entry.sha256}")
                        skip = 0
                    else:
                        skip = pos
                    async for data in r.aiter_raw():
                        if skip:
                            if len(data) <= skip:
                                skip -= len(data)
                                continue
                            data, skip = data[skip:], 0
                        data = data[:end - pos]
                        os.pwrite(fd, data, pos)
                        hasher.update(data)
                        pos += len(data)
                        state.have[0] = pos
                        if pos >= end:
                            return
            except httpx.TransportError as exc:
                if attempt == _ATTEMPTS - 1:
                    raise RegistryUnavailable(
                        f"download of {entry.path} failed after {_ATTEMPTS} attempts: {exc}",
                        details={"sha256": entry.sha256}) from exc
            await asyncio.sleep(0.2 * 2 ** attempt)
        raise RegistryUnavailable(f"download of {entry.path} stopped at byte "
                                  f"{state.have[0]} of {end}",
                                  details={"sha256": entry.sha256})
