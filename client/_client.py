"""The synchronous Python client of the registry (``quiver.Client``)."""

from __future__ import annotations

import json
import ssl
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import httpx

from quiver import __version__
from quiver.errors import InvalidRequest, RegistryUnavailable, Timeout
from quiver.http import raise_for_status
from quiver.refs import parse_ref, parse_repo
from quiver.wire import BaseModelInfo, RepoInfo, VersionInfo

from quiver.client._cache import Cache, safe_relpath
from quiver.client._download import Downloader
from quiver.client._rawhttp import raw_usable
from quiver.client._upload import collect_files, push_manifest, push_multipart
from quiver.client.examples import read_examples
from quiver.client.settings import ClientSettings

__all__ = ["Client", "build_metadata", "load_base_config", "transport_error", "tls_context",
           "resolve_settings", "http_options"]


def transport_error(exc: httpx.TransportError, url: str) -> Exception:
    """The Quiver error for a request that never got an answer."""
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return Timeout(f"registry at {url} timed out: {exc}")
    return RegistryUnavailable(f"registry at {url} is unavailable: {exc or type(exc).__name__}",
                               details={"url": url})


def build_metadata(*, base_model: str, examples=None, description=None, task_description=None,
                   parent=None, aliases=None, labels=None) -> dict[str, Any]:
    """The ``PushMetadata`` body; ``examples`` may be a list of prompts or a file path."""
    if isinstance(examples, (str, Path)):
        examples = read_examples(examples)
    if isinstance(aliases, str):
        aliases = [aliases]
    if parent is not None:
        parent = str(parse_ref(str(parent)))
    meta: dict[str, Any] = {"base_model": base_model}
    for key, value in (("description", description), ("task_description", task_description),
                       ("examples", list(examples) if examples is not None else None),
                       ("labels", dict(labels) if labels else None), ("parent", parent),
                       ("aliases", list(aliases) if aliases else None)):
        if value is not None:
            meta[key] = value
    return meta


def load_base_config(config: dict | str | Path) -> dict[str, Any]:
    """A base model's HF ``config.json`` from a dict, a JSON file, or a model folder."""
    if isinstance(config, dict):
        return config
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InvalidRequest(f"cannot read base model config {path}: {exc.strerror}",
                             details={"path": str(path)}) from exc
    except ValueError as exc:
        raise InvalidRequest(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest(f"{path} does not hold a JSON object")
    return data


@lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process (building one costs ~0.1 s of CPU)."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def resolve_settings(settings: ClientSettings | None, **overrides: Any) -> ClientSettings:
    """``settings`` (or the environment's) with the explicit, non-None arguments applied."""
    base = settings or ClientSettings()
    given = {("registry_url" if k == "url" else k): v for k, v in overrides.items()
             if v is not None}
    return base.model_copy(update=given) if given else base


def http_options(settings: ClientSettings) -> dict[str, Any]:
    """Keyword arguments for the sync and async httpx clients of one registry."""
    headers = {"User-Agent": f"quiver-client/{__version__}"}
    if settings.token:
        headers["Authorization"] = f"Bearer {settings.token}"
    pool = settings.parallel_downloads + 4
    return {"base_url": settings.registry_url.rstrip("/"), "headers": headers,
            "follow_redirects": True, "verify": tls_context(),
            "timeout": httpx.Timeout(settings.timeout, connect=10.0),
            "limits": httpx.Limits(max_connections=pool, max_keepalive_connections=pool)}


class Client:
    """Push, pull, inspect and manage adapter versions on a Quiver registry.

    ``url`` and ``token`` default to ``QUIVER_REGISTRY_URL`` / ``QUIVER_TOKEN`` and then the
    config file that ``quiver login`` writes. Pulls land in a content-addressed cache.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 cache_dir: str | Path | None = None, timeout: float | None = None,
                 settings: ClientSettings | None = None,
                 transport: httpx.BaseTransport | None = None):
        self.settings = resolve_settings(settings, url=url, token=token, cache_dir=cache_dir,
                                         timeout=timeout)
        self.url = self.settings.registry_url.rstrip("/")
        self.cache = Cache(self.settings.cache_path)
        self._http = httpx.Client(transport=transport, **http_options(self.settings))
        # Blob bytes bypass httpx over plain http, unless the caller gave it a transport.
        self._lean = transport is None and raw_usable(self._http.base_url)
        self._downloader = Downloader(self._http, self.cache,
                                      parallel=self.settings.parallel_downloads,
                                      chunk=self.settings.part_size,
                                      threshold=self.settings.parallel_threshold,
                                      lean=self._lean)

    # --- plumbing -------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise transport_error(exc, self.url) from exc
        raise_for_status(r)
        return r

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        params = {k: v for k, v in params.items() if v is not None}
        while True:
            body = self._request("GET", path, params=params).json()
            yield from body.get("items", [])
            cursor = body.get("next_cursor")
            if not cursor:
                return
            params = {**params, "cursor": cursor}

    # --- service ----------------------------------------------------------------------------------

    def health(self) -> dict:
        return self._request("GET", "/api/v1/health").json()

    def whoami(self) -> dict:
        return self._request("GET", "/api/v1/whoami").json()

    def create_token(self, name: str, scopes: list[str], repos: list[str] | None = None) -> dict:
        body = {"name": name, "scopes": list(scopes), "repos": list(repos) if repos else None}
        return self._request("POST", "/api/v1/tokens", json=body).json()

    def list_tokens(self) -> list[dict]:
        return self._request("GET", "/api/v1/tokens").json().get("items", [])

    def delete_token(self, token_id: str | int) -> None:
        self._request("DELETE", f"/api/v1/tokens/{token_id}")

    def gc(self) -> dict:
        return self._request("POST", "/api/v1/gc").json()

    # --- base models ------------------------------------------------------------------------------

    def add_base_model(self, config: dict | str | Path, name: str,
                       revision: str | None = None) -> BaseModelInfo:
        body: dict[str, Any] = {"name": name, "config": load_base_config(config)}
        if revision is not None:
            body["revision"] = revision
        return BaseModelInfo.model_validate(
            self._request("POST", "/api/v1/base-models", json=body).json())

    def get_base_model(self, name: str) -> BaseModelInfo:
        return BaseModelInfo.model_validate(
            self._request("GET", f"/api/v1/base-models/{name}").json())

    def list_base_models(self) -> list[BaseModelInfo]:
        items = self._request("GET", "/api/v1/base-models").json().get("items", [])
        return [BaseModelInfo.model_validate(i) for i in items]

    # --- reading ----------------------------------------------------------------------------------

    def resolve(self, ref: str) -> VersionInfo:
        """The version a ref names now (``repo`` means the latest ready version)."""
        parsed = parse_ref(ref)
        return VersionInfo.model_validate(
            self._request("GET", f"/api/v1/resolve/{parsed}").json())

    def repo_info(self, repo: str) -> RepoInfo:
        return RepoInfo.model_validate(
            self._request("GET", f"/api/v1/repos/{parse_repo(repo)}/-/info").json())

    def list_repos(self, **filters: Any) -> list[RepoInfo]:
        """Repositories, optionally filtered by ``namespace``, ``base_model`` or ``q``."""
        return [RepoInfo.model_validate(i) for i in self._pages("/api/v1/repos", filters)]

    def list_versions(self, repo: str, status: str | None = None) -> list[VersionInfo]:
        return [VersionInfo.model_validate(i) for i in
                self._pages(f"/api/v1/repos/{parse_repo(repo)}/-/versions", {"status": status})]

    def list_all_versions(self, base_model: str | None = None,
                          status: str | None = None) -> list[VersionInfo]:
        """Every version across repositories (all pages), e.g. the router's training set."""
        params = {"base_model": base_model, "status": status}
        return [VersionInfo.model_validate(i) for i in self._pages("/api/v1/versions", params)]

    # --- writing ----------------------------------------------------------------------------------

    def push(self, path: str | Path, repo: str, *, base_model: str, examples=None,
             description: str | None = None, task_description: str | None = None,
             parent: str | None = None, aliases: list[str] | str | None = None,
             labels: dict[str, str] | None = None, progress: bool = False) -> VersionInfo:
        """Upload an adapter folder as the next version of ``repo``."""
        parse_repo(repo)
        meta = build_metadata(base_model=base_model, examples=examples, description=description,
                              task_description=task_description, parent=parent,
                              aliases=aliases, labels=labels)
        files = collect_files(Path(path))
        total = sum(f.size for f in files)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"push {repo}", leave=False)
        try:
            if total < self.settings.multipart_push_limit:
                return push_multipart(self._http, repo, meta, files, bar)
            return push_manifest(self._http, self.cache, repo, meta, files,
                                 parallel=self.settings.parallel_uploads, bar=bar,
                                 hash_while_sending=self.settings.hash_while_sending,
                                 lean=self._lean)
        except httpx.TransportError as exc:
            raise transport_error(exc, self.url) from exc
        finally:
            if bar is not None:
                bar.close()

    def pull(self, ref: str, out_dir: str | Path | None = None, *,
             progress: bool = False) -> Path:
        """Download a version into the cache (verified) and return its folder.

        With ``out_dir`` the files are also copied there and ``out_dir`` is returned.
        """
        return self.download_version(self.resolve(ref), out_dir, progress=progress)

    def download_version(self, info: VersionInfo, out_dir: str | Path | None = None, *,
                         progress: bool = False) -> Path:
        for entry in info.files:
            safe_relpath(entry.path)
        try:
            fetched = self._downloader.fetch(info.files, progress=progress, desc=f"pull {info.ref}")
        except httpx.TransportError as exc:
            raise transport_error(exc, self.url) from exc
        if fetched or not self.cache.version_complete(info.revision, info.files):
            vdir = self.cache.materialise(info.revision, info.files)
        else:
            vdir = self.cache.version_dir(info.revision)
        if out_dir is not None:
            return self.cache.export(info.files, Path(out_dir))
        return vdir

    def _version_number(self, ref: str) -> tuple[str, int]:
        parsed = parse_ref(ref)
        if parsed.version is not None:
            return parsed.repo, parsed.version
        info = self.resolve(ref)
        return info.repo, info.version

    def set_alias(self, repo: str, alias: str, version: int) -> VersionInfo:
        body = {"version": int(version)}
        return VersionInfo.model_validate(self._request(
            "PUT", f"/api/v1/repos/{parse_repo(repo)}/-/aliases/{alias}", json=body).json())

    def delete_alias(self, repo: str, alias: str) -> None:
        self._request("DELETE", f"/api/v1/repos/{parse_repo(repo)}/-/aliases/{alias}")

    def archive(self, ref: str) -> VersionInfo:
        repo, n = self._version_number(ref)
        return VersionInfo.model_validate(
            self._request("POST", f"/api/v1/repos/{repo}/-/versions/{n}/archive").json())

    def delete(self, ref_or_repo: str) -> None:
        """Delete one version (``repo/N``, ``repo@alias``) or, given a bare name, the repo."""
        parsed = parse_ref(ref_or_repo)
        if parsed.version is None and parsed.alias is None and parsed.revision is None:
            self._request("DELETE", f"/api/v1/repos/{parsed.repo}")
            return
        repo, n = self._version_number(ref_or_repo)
        self._request("DELETE", f"/api/v1/repos/{repo}/-/versions/{n}")
