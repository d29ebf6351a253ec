"""Per-key requests-per-minute and tokens-per-minute limits, global across gateway replicas.

A sliding-window counter: counts per one-minute window, the previous window weighted by the
part of it still inside the last 60 s (``now_count + prev_count × (1 − elapsed/60s)``).
With Redis, one Lua script checks both limits and counts the request atomically, on Redis's
clock, so N replicas enforce the limit once, never N times. Tokens are counted after the
answer from its ``usage`` (or an estimate); the check before it uses an estimate of the prompt
plus ``max_tokens``. Without Redis the same arithmetic runs in this process.

When Redis cannot be reached the configured policy applies: ``open`` lets the request through,
``closed`` answers 503. Either way the metric ``quiver_gateway_rate_limiter_errors_total``
counts it and a warning is logged.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from quiver.errors import RateLimited, Unavailable
from quiver.gateway.keys import REDIS_ERRORS, ApiKey
from quiver.gateway.metrics import GatewayMetrics
from quiver.logging import get_logger, log_event

__all__ = ["RateLimiter", "WINDOW_MS"]

_log = get_logger("quiver.gateway.ratelimit")
WINDOW_MS = 60_000

# KEYS[1]: the key's counter prefix. ARGV: rpm, tpm (0 = unlimited), estimated tokens.
# Returns {1, "", 0} when admitted, {0, "rpm"|"tpm", retry_after_ms} when refused.
_CHECK = """
local window = 60000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = math.floor(now / window)
local frac = (now % window) / window
local base = KEYS[1]
local function counts(kind)
  local c = tonumber(redis.call('GET', base .. kind .. cur) or '0')
  local p = tonumber(redis.call('GET', base .. kind .. (cur - 1)) or '0')
  return c, p
end
local function wait_ms(c, p, need, limit)
  if c + need <= limit and p > 0 then
    local f = 1 - (limit - need - c) / p
    return math.max(1, math.ceil((f - frac) * window))
  end
  local f2 = 0
  if c > 0 then f2 = math.max(0, 1 - (limit - need) / c) end
  return math.max(1, math.ceil((1 - frac + f2) * window))
end
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local est = tonumber(ARGV[3])
if rpm > 0 then
  local c, p = counts(':r:')
  if c + p * (1 - frac) + 1 > rpm then
    return {0, 'rpm', wait_ms(c, p, 1, rpm)}
  end
end
if tpm > 0 then
  local c, p = counts(':t:')
  local used = c + p * (1 - frac)
  if used > 0 and used + est > tpm then
    return {0, 'tpm', wait_ms(c, p, math.min(est, tpm), tpm)}
  end
end
local rk = base .. ':r:' .. cur
redis.call('INCR', rk)
redis.call('PEXPIRE', rk, 2 * window + 1000)
return {1, '', 0}
"""

# KEYS[1]: the key's counter prefix. ARGV: tokens to add to the current window.
_ADD_TOKENS = """
local t = redis.call('TIME')
local cur = math.floor((tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) / 60000)
local tk = KEYS[1] .. ':t:' .. cur
redis.call('INCRBY', tk, ARGV[1])
redis.call('PEXPIRE', tk, 121000)
return 1
"""


class RateLimiter:
    def __init__(self, redis: Any | None, prefix: str, *, failure: Literal["open", "closed"],
                 metrics: GatewayMetrics) -> None:
        self._redis = redis
        self._prefix = prefix + "rl:"
        self._failure = failure
        self._metrics = metrics
        self._check = redis.register_script(_CHECK) if redis is not None else None
        self._add = redis.register_script(_ADD_TOKENS) if redis is not None else None
        self._local: dict[str, int] = {}
        self._last_warning = 0.0

    def _base(self, key: ApiKey) -> str:
        return f"{self._prefix}{{{key.id}}}"

    async def admit(self, key: ApiKey, estimated_tokens: int) -> None:
        """Count one request of ``key``; raise RateLimited (429) when a limit is reached."""
        if not key.rpm and not key.tpm:
            return
        if self._check is None:
            allowed, which, wait = self._local_check(key, estimated_tokens)
        else:
            try:
                allowed, which, wait = await self._check(
                    keys=[self._base(key)], args=[key.rpm or 0, key.tpm or 0, estimated_tokens])
            except REDIS_ERRORS as exc:
                self._degraded(exc)
                return
            self._metrics.limiter_degraded.set(0)
        if not int(allowed):
            which = which.decode() if isinstance(which, bytes) else str(which)
            self._metrics.rate_limited.labels(which).inc()
            raise RateLimited(f"rate limit reached: {which} of key {key.name!r}",
                              retry_after=max(1.0, int(wait) / 1000.0),
                              details={"limit": which})

    async def add_tokens(self, key: ApiKey, tokens: int) -> None:
        """Count ``tokens`` used by an answer to ``key`` (best effort)."""
        if not key.tpm or tokens <= 0:
            return
        if self._add is None:
            slot = f"{key.id}:t:{self._window()}"
            self._local[slot] = self._local.get(slot, 0) + tokens
            return
        try:
            await self._add(keys=[self._base(key)], args=[tokens])
        except REDIS_ERRORS as exc:
            self._degraded(exc, refuse=False)

    def _degraded(self, exc: Exception, refuse: bool = True) -> None:
        self._metrics.limiter_errors.labels(self._failure).inc()
        self._metrics.limiter_degraded.set(1)
        now = time.monotonic()
        if now - self._last_warning > 5.0:
            self._last_warning = now
            log_event(_log, "ratelimit.redis_unreachable", level=30, policy=self._failure,
                      error=str(exc) or type(exc).__name__)
        if refuse and self._failure == "closed":
            raise Unavailable("the rate limiter cannot reach its store; refusing requests "
                              "(fail-closed policy)", retry_after=1) from exc

    @staticmethod
    def _window() -> int:
        return int(time.time() * 1000) // WINDOW_MS

    def _local_check(self, key: ApiKey, est: int) -> tuple[int, str, int]:
        now_ms = int(time.time() * 1000)
        cur = now_ms // WINDOW_MS
        frac = (now_ms % WINDOW_MS) / WINDOW_MS
        for slot in [s for s in self._local if int(s.rsplit(":", 1)[1]) < cur - 1]:
            del self._local[slot]

        def counts(kind: str) -> tuple[int, int]:
            return (self._local.get(f"{key.id}:{kind}:{cur}", 0),
                    self._local.get(f"{key.id}:{kind}:{cur - 1}", 0))

        def wait_ms(c: int, p: int, need: int, limit: int) -> int:
            if c + need <= limit and p > 0:
                f = 1 - (limit - need - c) / p
                return max(1, math.ceil((f - frac) * WINDOW_MS))
            f2 = max(0.0, 1 - (limit - need) / c) if c > 0 else 0.0
            return max(1, math.ceil((1 - frac + f2) * WINDOW_MS))

        if key.rpm:
            c, p = counts("r")
            if c + p * (1 - frac) + 1 > key.rpm:
                return 0, "rpm", wait_ms(c, p, 1, key.rpm)
        if key.tpm:
            c, p = counts("t")
            used = c + p * (1 - frac)
            if used > 0 and used + est > key.tpm:
                return 0, "tpm", wait_ms(c, p, min(est, key.tpm), key.tpm)
        slot = f"{key.id}:r:{cur}"
        self._local[slot] = self._local.get(slot, 0) + 1
        return 1, "", 0
