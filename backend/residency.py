"""Adapter residency: GPU *slots*, a host-memory *cache* and a local disk *cache*.

The registry is the source of truth; these tiers only hold copies of immutable adapter versions,
keyed by their 40-hex revision. A request names a reference (``repo/3``, ``repo@prod``, ``repo``);
:meth:`Residency.acquire` resolves it to a revision, brings that version into a slot and returns a
:class:`Lease` that keeps it there until released.

    request ─▶ resolve ─▶ slot? ──yes──────────────────────────────▶ lease
                            │no        (one flight per revision)
                            ▼
                     host cache? ─no─▶ disk cache? ─no─▶ pull (sha256-verified)
                            │               │                │
                            │               └─▶ read ─▶ validate + prepare ─▶ host cache
                            ▼                                        │
                      free slot or evict the LRU unused, unpinned ◀──┘

Every tier is LRU within its budget. A slot whose adapter a running request uses is never
evicted; pinned adapters stay in their slot. Validation happens before any weight enters a slot
and its verdict is remembered per revision (a revision never changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from quiver.errors import (
    ChecksumMismatch,
    Conflict,
    Forbidden,
    IncompatibleAdapter,
    InvalidAdapter,
    InvalidReference,
    ModelNotFound,
    NotFound,
    Overloaded,
    QuiverError,
    RegistryUnavailable,
    Timeout,
    Unauthorized,
    UpstreamError,
    VersionNotFound,
)
from quiver.logging import get_logger, log_event
from quiver.refs import AdapterRef, parse_ref
from quiver.wire import VersionInfo

__all__ = ["Residency", "Lease", "AdapterEntry", "RegistryAccess", "SlotEngine", "TIERS"]

_log = get_logger("quiver.backend.residency")
TIERS = ("gpu", "host", "disk")
_MARKER = ".quiver-version.json"
_DOWNLOAD_ATTEMPTS = 3


class RegistryAccess(Protocol):
    """What the backend needs of the registry client (``quiver.client.AsyncClient``)."""

    async def resolve(self, ref: str) -> VersionInfo: ...

    async def download_version(self, info: VersionInfo, dest_dir: Path) -> Path: ...


class SlotEngine(Protocol):
    """What residency needs of the engine: validate + prepare, then load into / unload a slot."""

    def prepare(self, adapter_dir: Path) -> tuple[Any, int]: ...

    async def load(self, key: str, prepared: Any) -> int: ...

    async def unload(self, key: str) -> None: ...


@dataclass(eq=False)
class AdapterEntry:
    """One adapter version this backend holds in at least one tier (or is loading)."""

    info: VersionInfo
    slot: int | None = None
    prepared: Any = None
    host_bytes: int = 0
    disk_dir: Path | None = None
    disk_bytes: int = 0
    in_use: int = 0
    pinned: bool = False
    loading: bool = False
    verified: bool = False       # disk copy checked against its sha256s in this process
    waiters: int = 0             # requests waiting for this adapter to reach a slot
    last_used: float = field(default_factory=time.monotonic)

    @property
    def revision(self) -> str:
        return self.info.revision

    @property
    def ref(self) -> str:
        return self.info.ref

    def tiers(self) -> list[str]:
        out = []
        if self.slot is not None:
            out.append("gpu")
        if self.prepared is not None:
            out.append("host")
        if self.disk_dir is not None:
            out.append("disk")
        return out

    def describe(self) -> dict[str, Any]:
        tiers = self.tiers()
        return {"ref": self.ref, "repo": self.info.repo, "version": self.info.version,
                "revision": self.revision, "tier": tiers[0] if tiers else
                ("loading" if self.loading else None), "tiers": tiers, "slot": self.slot,
                "pinned": self.pinned, "in_use": self.in_use, "loading": self.loading,
                "size_bytes": self.info.size_bytes, "rank": self.info.peft.r if self.info.peft
                else None}


class Lease:
    """A request's hold on an adapter's slot; ``key`` is what the engine calls the adapter."""

    def __init__(self, residency: Residency | None, entry: AdapterEntry | None) -> None:
        self._residency = residency
        self.entry = entry
        self._released = False

    @property
    def key(self) -> str | None:
        return self.entry.revision if self.entry else None

    @property
    def ref(self) -> str | None:
        return self.entry.ref if self.entry else None

    def release(self) -> None:
        if not self._released and self._residency is not None and self.entry is not None:
            self._released = True
            self._residency._release(self.entry)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(slots=True)
class _Alias:
    revision: str
    at: float


class Residency:
    """The three tiers, single-flight pulls and the resolution of references to revisions."""

    def __init__(self, *, registry: RegistryAccess, engine: SlotEngine, base_model: str,
                 max_slots: int, host_cache_bytes: int, disk_cache_bytes: int,
                 disk_cache_dir: Path, alias_ttl: float = 0.0, registry_retry_after: float = 5.0,
                 slot_wait_timeout: float = 300.0,
                 on_load: Callable[[str, float], None] | None = None,
                 on_evict: Callable[[str], None] | None = None,
                 on_pull: Callable[[str], None] | None = None,
                 discard_blob: Callable[[str], None] | None = None) -> None:
        self.registry = registry
        self.engine = engine
        self.base_model = base_model
        self.max_slots = max_slots
        self.host_cache_bytes = host_cache_bytes
        self.disk_cache_bytes = disk_cache_bytes
        self.disk_cache_dir = Path(disk_cache_dir)
        self._adapters_dir = self.disk_cache_dir / "adapters"
        self.alias_ttl = alias_ttl
        self.registry_retry_after = registry_retry_after
        self.slot_wait_timeout = slot_wait_timeout
        self._on_load = on_load or (lambda source, seconds: None)
        self._on_evict = on_evict or (lambda tier: None)
        self._on_pull = on_pull or (lambda result: None)
        self._discard_blob = discard_blob

        self._entries: dict[str, AdapterEntry] = {}          # revision -> entry
        self._slots: OrderedDict[str, AdapterEntry] = OrderedDict()   # LRU: oldest first
        self._host: OrderedDict[str, AdapterEntry] = OrderedDict()
        self._disk: OrderedDict[str, AdapterEntry] = OrderedDict()
        self._pinned_refs: dict[str, str] = {}                # "repo/3" or "repo@<rev>" -> rev
        self._aliases: dict[str, _Alias] = {}                # "repo@prod" or "repo" -> rev
        self._names: dict[str, set[str]] = {}                # revision -> the keys above
        self._rejected: dict[str, QuiverError] = {}           # revision -> validation verdict
        self._flights: dict[str, asyncio.Task[AdapterEntry]] = {}
        self._staging: dict[str, asyncio.Task[None]] = {}   # prefetches into the host cache
        self._slot_lock = asyncio.Lock()
        self._slot_freed = asyncio.Event()
        self._waiting = 0
        self.host_used = 0
        self.disk_used = 0

    # --- start-up ------------------------------------------------------------------------

    def scan_disk_cache(self) -> int:
        """Adopt the verified versions a previous run left in the disk cache; returns how many."""
        self._adapters_dir.mkdir(parents=True, exist_ok=True)
        found = []
        for d in self._adapters_dir.iterdir():
            marker = d / _MARKER
            if not d.is_dir() or not marker.is_file():
                shutil.rmtree(d, ignore_errors=True)
                continue
            try:
                info = VersionInfo.model_validate_json(marker.read_text())
            except ValueError:
                shutil.rmtree(d, ignore_errors=True)
                continue
            found.append((marker.stat().st_mtime, d, info))
        for _, d, info in sorted(found, key=lambda t: t[0]):
            entry = self._entry(info)
            entry.disk_dir = d
            entry.disk_bytes = sum(f.size for f in info.files)
            self._disk[entry.revision] = entry
            self.disk_used += entry.disk_bytes
            self._remember(info, info.ref, pinned=True)
        return len(found)

    # --- resolution ----------------------------------------------------------------------

    async def resolve(self, text: str) -> VersionInfo:
        """The version a reference names now. Pinned references are asked once; aliases (and
        bare repos, meaning latest) are asked again after ``alias_ttl``. While the registry is
        unreachable, an alias last seen pointing at a version this backend holds keeps
        resolving to it."""
        try:
            ref = parse_ref(text)
        except InvalidReference as exc:
            raise ModelNotFound(f"model {text!r} is neither the base model nor an adapter "
                                f"reference: {exc.message}",
                                details={"param": "model", "model": text}) from None
        key = str(ref)
        if ref.is_pinned:
            rev = self._pinned_refs.get(key)
            if rev is not None and rev in self._entries:
                return self._entries[rev].info
            return self._remember(await self._ask_registry(key, ref), key, pinned=True)
        cached = self._aliases.get(key)
        now = time.monotonic()
        if cached and cached.revision in self._entries and now - cached.at < self.alias_ttl:
            return self._entries[cached.revision].info
        try:
            info = await self._ask_registry(key, ref)
        except RegistryUnavailable:
            entry = self._entries.get(cached.revision) if cached else None
            if entry is not None and (entry.tiers() or entry.loading):
                log_event(_log, "alias.stale_while_registry_down", ref=key, serving=entry.ref)
                return entry.info
            raise
        return self._remember(info, key, pinned=False)

    async def _ask_registry(self, key: str, ref: AdapterRef) -> VersionInfo:
        try:
            info = await self.registry.resolve(key)
        except RegistryUnavailable as exc:
            exc.retry_after = exc.retry_after or self.registry_retry_after
            raise
        except (Unauthorized, Forbidden) as exc:  # this backend's credentials, not the caller's
            raise UpstreamError(f"the registry refused this backend's token for {key!r}: "
                                f"{exc.message}", details={"ref": key}) from exc
        except QuiverError as exc:
            if exc.status < 500:                  # the registry's answer: unknown, invalid…
                raise
            raise RegistryUnavailable(f"registry failed while resolving {key!r}: {exc.message}",
                                      retry_after=self.registry_retry_after) from exc
        except (OSError, ConnectionError, TimeoutError) as exc:
            raise RegistryUnavailable(f"registry unreachable while resolving {key!r}: {exc}",
                                      retry_after=self.registry_retry_after) from exc
        if info.status not in ("ready", "archived"):
            raise VersionNotFound(f"{info.ref} is {info.status}, not servable",
                                  details={"ref": key, "status": info.status})
        return info

    def _remember(self, info: VersionInfo, key: str, *, pinned: bool) -> VersionInfo:
        entry = self._entries.get(info.revision)
        names = self._names.setdefault(info.revision, set())
        self._pinned_refs[info.ref] = info.revision
        names.add(info.ref)
        if pinned:
            self._pinned_refs[key] = info.revision
        else:
            self._aliases[key] = _Alias(info.revision, time.monotonic())
        names.add(key)
        return entry.info if entry is not None else info

    def forget_alias(self, repo: str, alias: str | None = None) -> None:
        """Drop cached alias resolutions of ``repo`` (all of them when ``alias`` is None)."""
        for key in list(self._aliases):
            name, _, tag = key.partition("@")
            if name == repo and (alias is None or tag == alias or (not tag and alias == "")):
                del self._aliases[key]

    def forget_alias_all(self) -> None:
        self._aliases.clear()

    # --- acquiring -----------------------------------------------------------------------

    async def acquire(self, text: str | None) -> Lease:
        """Resolve ``text`` and hold its adapter in a slot; ``None`` is the base model."""
        if text is None:
            return Lease(None, None)
        info = await self.resolve(text)
        entry = self._entries.get(info.revision)
        if entry is not None and entry.slot is not None:          # the hot path
            return self._lease(entry)
        if info.revision in self._rejected:
            raise self._rejected[info.revision]
        entry = self._entry(info)
        entry.waiters += 1              # a slot with waiters is never chosen for eviction
        self._waiting += 1
        try:
            for _ in range(4):
                await self._bring_in(info)
                if entry.slot is not None:
                    return self._lease(entry)
            raise Overloaded(f"adapter {info.ref} could not keep a slot; try again",
                             retry_after=1.0)
        finally:
            entry.waiters -= 1
            self._waiting -= 1
            self._drop_if_empty(entry)

    def _lease(self, entry: AdapterEntry) -> Lease:
        entry.in_use += 1
        entry.last_used = time.monotonic()
        self._slots.move_to_end(entry.revision)
        return Lease(self, entry)

    def _release(self, entry: AdapterEntry) -> None:
        entry.in_use -= 1
        entry.last_used = time.monotonic()
        if entry.in_use == 0:
            self._slot_freed.set()

    async def _bring_in(self, info: VersionInfo) -> AdapterEntry:
        if info.revision in self._rejected:
            raise self._rejected[info.revision]
        flight = self._flights.get(info.revision)
        if flight is None:
            flight = asyncio.create_task(self._load(info), name=f"load {info.ref}")
            self._flights[info.revision] = flight
            flight.add_done_callback(lambda _t, rev=info.revision: self._flights.pop(rev, None))
        return await asyncio.shield(flight)

    async def _load(self, info: VersionInfo) -> AdapterEntry:
        entry = self._entry(info)
        entry.loading = True
        started = time.perf_counter()
        try:
            staging = self._staging.get(info.revision)
            if staging is not None:               # a prefetch is already bringing it in
                await asyncio.shield(staging)
            prepared, source = await self._stage(entry)
            staged = time.perf_counter()
            await self._take_slot(entry, prepared)
            seconds = time.perf_counter() - started
            self._on_load(source, seconds)
            log_event(_log, "adapter.loaded", ref=info.ref, source=source, slot=entry.slot,
                      ms=round(seconds * 1000, 2), stage_ms=round((staged - started) * 1000, 2),
                      slot_ms=round((time.perf_counter() - staged) * 1000, 2))
            return entry
        finally:
            entry.loading = False
            self._drop_if_empty(entry)

    async def _stage(self, entry: AdapterEntry) -> tuple[Any, str]:
        """Bring ``entry`` into the host cache (from the disk cache or the registry) and return
        its prepared form and where it came from."""
        info = entry.info
        if entry.prepared is not None:
            self._touch(self._host, entry)
            return entry.prepared, "host"
        self._check_base_model(info)
        source = "disk"
        if entry.disk_dir is None or not entry.disk_dir.is_dir():
            source = "registry"
            await self._pull(entry)
        else:
            self._touch(self._disk, entry)
            if not entry.verified:
                try:
                    await asyncio.to_thread(_verify_files, entry.disk_dir, info)
                    entry.verified = True
                except (ChecksumMismatch, InvalidAdapter):
                    log_event(_log, "adapter.disk_copy_corrupt", ref=info.ref)
                    self._drop_disk(entry)
                    source = "registry"
                    await self._pull(entry)
        fetched = time.perf_counter()
        try:
            prepared, nbytes = await asyncio.to_thread(self.engine.prepare, entry.disk_dir)
        except QuiverError as exc:
            if exc.status == 422:                 # the adapter itself is at fault
                self._reject(entry, exc)
            raise
        self._cache_host(entry, prepared, nbytes)
        log_event(_log, "adapter.staged", ref=info.ref, source=source,
                  prepare_ms=round((time.perf_counter() - fetched) * 1000, 2))
        return prepared, source

    async def prefetch(self, text: str) -> bool:
        """Bring an adapter into the host cache ahead of its first request (no slot is taken);
        True when it was fetched. Failures are logged, never raised."""
        try:
            info = await self.resolve(text)
            if info.revision in self._rejected or info.revision in self._flights \
                    or info.revision in self._staging:
                return False
            entry = self._entry(info)
            if entry.slot is not None or entry.prepared is not None:
                return False
            task = asyncio.create_task(self._stage_entry(entry), name=f"prefetch {info.ref}")
            self._staging[info.revision] = task
            task.add_done_callback(lambda _t, rev=info.revision: self._staging.pop(rev, None))
            await asyncio.shield(task)
            return True
        except QuiverError as exc:
            log_event(_log, "adapter.prefetch_failed", ref=text, code=exc.code,
                      reason=exc.message)
            return False

    async def _stage_entry(self, entry: AdapterEntry) -> None:
        entry.loading = True
        try:
            await self._stage(entry)
            log_event(_log, "adapter.prefetched", ref=entry.ref)
        finally:
            entry.loading = False
            self._drop_if_empty(entry)

    def _check_base_model(self, info: VersionInfo) -> None:
        if info.base_model != self.base_model:
            exc = IncompatibleAdapter(
                f"{info.ref} was trained for base model {info.base_model!r}; this backend serves "
                f"{self.base_model!r}",
                details=[{"field": "base_model", "expected": self.base_model,
                          "found": info.base_model, "problem": "different base model"}])
            self._rejected[info.revision] = exc
            raise exc

    def _reject(self, entry: AdapterEntry, exc: QuiverError) -> None:
        self._rejected[entry.revision] = exc
        log_event(_log, "adapter.rejected", ref=entry.ref, code=exc.code, reason=exc.message)
        self._drop_disk(entry)

    # --- pulling into the disk cache -------------------------------------------------------

    async def _pull(self, entry: AdapterEntry) -> None:
        info = entry.info
        final = self._adapters_dir / info.revision
        last: Exception | None = None
        for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
            try:
                got = Path(await self.registry.download_version(info, final))
                # The client checked every sha256 as the bytes arrived; sizes are a stat away.
                _verify_files(got, info, hashes=False)
                (got / _MARKER).write_text(info.model_dump_json())
                self._on_pull("ok")
                break
            except NotFound:
                self._on_pull("not_found")
                raise
            except ChecksumMismatch as exc:
                last = exc
                self._on_pull("corrupt")
                log_event(_log, "adapter.download_corrupt", ref=info.ref, attempt=attempt,
                          reason=exc.message)
                await asyncio.to_thread(shutil.rmtree, final, True)
            except (RegistryUnavailable, Timeout, OSError, ConnectionError, TimeoutError) as exc:
                self._on_pull("unavailable")
                await asyncio.to_thread(shutil.rmtree, final, True)
                raise RegistryUnavailable(f"registry unreachable while pulling {info.ref}: {exc}",
                                          retry_after=self.registry_retry_after) from exc
            except QuiverError:
                self._on_pull("error")
                await asyncio.to_thread(shutil.rmtree, final, True)
                raise
        else:
            raise UpstreamError(f"every download of {info.ref} failed verification ({last})",
                                details={"ref": info.ref, "attempts": _DOWNLOAD_ATTEMPTS})
        entry.disk_dir = final
        entry.disk_bytes = sum(f.size for f in info.files)
        entry.verified = True
        self._disk[entry.revision] = entry
        self.disk_used += entry.disk_bytes
        await self._trim_disk(keep=entry)

    async def _trim_disk(self, keep: AdapterEntry) -> None:
        for rev in list(self._disk):
            if self.disk_used <= self.disk_cache_bytes:
                break
            victim = self._disk[rev]
            if victim is keep or victim.loading:
                continue
            self._drop_disk(victim)
            self._on_evict("disk")

    def _drop_disk(self, entry: AdapterEntry) -> None:
        if self._disk.pop(entry.revision, None) is not None:
            self.disk_used -= entry.disk_bytes
        if entry.disk_dir is not None:
            shutil.rmtree(entry.disk_dir, ignore_errors=True)
            if self._discard_blob is not None:
                shared = {f.sha256 for e in self._disk.values() for f in e.info.files}
                for f in entry.info.files:
                    if f.sha256 not in shared:
                        self._discard_blob(f.sha256)
        entry.disk_dir = None
        entry.disk_bytes = 0
        self._drop_if_empty(entry)

    # --- the host cache --------------------------------------------------------------------

    def _cache_host(self, entry: AdapterEntry, prepared: Any, nbytes: int) -> None:
        entry.prepared = prepared
        entry.host_bytes = nbytes
        self._host[entry.revision] = entry
        self.host_used += nbytes
        for rev in list(self._host):
            if self.host_used <= self.host_cache_bytes:
                break
            victim = self._host[rev]
            if victim is entry:
                continue
            self._drop_host(victim)
            self._on_evict("host")

    def _drop_host(self, entry: AdapterEntry) -> None:
        if self._host.pop(entry.revision, None) is not None:
            self.host_used -= entry.host_bytes
        entry.prepared = None
        entry.host_bytes = 0
        self._drop_if_empty(entry)

    # --- slots -----------------------------------------------------------------------------

    async def _take_slot(self, entry: AdapterEntry, prepared: Any) -> None:
        deadline = time.monotonic() + self.slot_wait_timeout
        busy: set[str] = set()            # victims the engine still counts as in use
        async with self._slot_lock:
            while len(self._slots) >= self.max_slots:
                victim = next((e for e in self._slots.values()
                               if e.in_use == 0 and e.waiters == 0 and not e.pinned
                               and e.revision not in busy), None)
                if victim is not None:
                    try:
                        await self._evict_slot(victim)
                    except Conflict:
                        busy.add(victim.revision)
                        continue
                    self._on_evict("gpu")
                    break
                busy.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Overloaded(f"all {self.max_slots} adapter slots are busy",
                                     retry_after=1.0)
                self._slot_freed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), timeout=min(left, 1.0))
            entry.slot = await self.engine.load(entry.revision, prepared)
            self._slots[entry.revision] = entry
        if entry.prepared is not None and self.host_cache_bytes == 0:
            self._drop_host(entry)

    async def _evict_slot(self, entry: AdapterEntry) -> None:
        # Out of the slot table first: no lease may be granted while the engine unloads it.
        slot, entry.slot = entry.slot, None
        self._slots.pop(entry.revision, None)
        try:
            await self.engine.unload(entry.revision)
        except BaseException:
            entry.slot = slot
            self._slots[entry.revision] = entry
            self._slots.move_to_end(entry.revision, last=False)
            raise
        log_event(_log, "adapter.evicted", ref=entry.ref, tier="gpu")
        self._drop_if_empty(entry)

    # --- explicit control (the /v1/adapters API) ---------------------------------------------

    async def load(self, text: str, *, pin: bool = False) -> AdapterEntry:
        if pin:
            pinned = sum(1 for e in self._slots.values() if e.pinned)
            if pinned >= self.max_slots - 1:
                raise Conflict(f"at most {self.max_slots - 1} adapters can be pinned",
                               details={"pinned": pinned})
        with await self.acquire(text) as lease:
            assert lease.entry is not None
            if pin:
                lease.entry.pinned = True
            return lease.entry

    async def set_pinned(self, text: str, pinned: bool) -> AdapterEntry:
        if pinned:
            return await self.load(text, pin=True)
        entry = self._entries.get((await self.resolve(text)).revision)
        if entry is None:
            raise NotFound(f"{text} is not resident on this backend", details={"ref": text})
        entry.pinned = False
        return entry

    async def unload(self, text: str, *, purge: bool = False) -> AdapterEntry:
        """Take an adapter out of its slot (409 while a request uses it); ``purge`` also drops
        the host and disk copies."""
        info = await self.resolve(text)
        entry = self._entries.get(info.revision)
        if entry is None or not entry.tiers():
            raise NotFound(f"{info.ref} is not resident on this backend", details={"ref": text})
        if entry.in_use:
            raise Conflict(f"{info.ref} is used by {entry.in_use} running request(s)",
                           details={"ref": info.ref, "in_use": entry.in_use})
        entry.pinned = False
        if entry.slot is not None:
            async with self._slot_lock:
                if entry.slot is not None and not entry.in_use:
                    await self._evict_slot(entry)
        if purge:
            self._drop_host(entry)
            self._drop_disk(entry)
        return entry

    async def forget_revision(self, revision: str) -> None:
        """The registry deleted this version: drop every copy not in use right now."""
        entry = self._entries.get(revision)
        for key in [k for k, v in self._pinned_refs.items() if v == revision]:
            del self._pinned_refs[key]
        for key in [k for k, v in self._aliases.items() if v.revision == revision]:
            del self._aliases[key]
        if entry is None or entry.in_use:
            return
        if entry.slot is not None:
            async with self._slot_lock:
                if entry.slot is not None and not entry.in_use:
                    await self._evict_slot(entry)
        self._drop_host(entry)
        self._drop_disk(entry)

    # --- views -----------------------------------------------------------------------------

    def entries(self) -> list[AdapterEntry]:
        return list(self._entries.values())

    def by_tier(self) -> dict[str, list[str]]:
        return {"gpu": [e.ref for e in self._slots.values()],
                "host": [e.ref for e in self._host.values()],
                "disk": [e.ref for e in self._disk.values()],
                "loading": [e.ref for e in self._entries.values() if e.loading]}

    def holds_repo(self, repo: str) -> bool:
        """True when some version of ``repo`` is in a slot."""
        return any(e.info.repo == repo for e in self._slots.values())

    @property
    def free_slots(self) -> int:
        return self.max_slots - len(self._slots)

    @property
    def waiting(self) -> int:
        """Requests waiting for their adapter to reach a slot."""
        return self._waiting

    # --- internals -------------------------------------------------------------------------

    def _entry(self, info: VersionInfo) -> AdapterEntry:
        entry = self._entries.get(info.revision)
        if entry is None:
            entry = self._entries[info.revision] = AdapterEntry(info=info)
        return entry

    def _drop_if_empty(self, entry: AdapterEntry) -> None:
        """Forget an entry no tier holds and no request waits for, with its cached names."""
        if entry.tiers() or entry.loading or entry.in_use or entry.waiters:
            return
        if self._entries.get(entry.revision) is entry:
            del self._entries[entry.revision]
            for key in self._names.pop(entry.revision, ()):
                if self._pinned_refs.get(key) == entry.revision:
                    del self._pinned_refs[key]
                alias = self._aliases.get(key)
                if alias is not None and alias.revision == entry.revision:
                    del self._aliases[key]

    @staticmethod
    def _touch(tier: OrderedDict[str, AdapterEntry], entry: AdapterEntry) -> None:
        if entry.revision in tier:
            tier.move_to_end(entry.revision)

    async def close(self) -> None:
        tasks = [*self._flights.values(), *self._staging.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


def _verify_files(folder: Path, info: VersionInfo, hashes: bool = True) -> None:
    """Check every file of ``info`` for its size and (``hashes``) its sha256."""
    for f in info.files:
        path = (folder / f.path).resolve()
        if folder.resolve() not in path.parents:
            raise InvalidAdapter(f"file path {f.path!r} escapes the adapter folder")
        if not path.is_file() or path.stat().st_size != f.size:
            raise ChecksumMismatch(f"{f.path}: missing or wrong size after download",
                                   details={"path": f.path, "expected_size": f.size})
        if not hashes:
            continue
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != f.sha256:
            raise ChecksumMismatch(f"{f.path}: sha256 {h.hexdigest()} != {f.sha256}",
                                   details={"path": f.path, "expected": f.sha256,
                                            "found": h.hexdigest()})
