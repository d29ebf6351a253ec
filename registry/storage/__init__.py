"""Content-addressed blob storage for the registry: a local directory or an S3 bucket.

Both stores implement :class:`BlobStore`; :func:`make_blob_store` builds one from settings.
The S3 store (and the ``minio`` client it needs) is imported only when first used, so a
registry on local storage starts without it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quiver.errors import InvalidRequest

from .base import CHUNK_SIZE, BlobListing, BlobStore, BlobStream, check_sha256
from .local import LocalBlobStore

if TYPE_CHECKING:
    from .s3 import S3BlobStore

__all__ = [
    "BlobStore", "BlobStream", "BlobListing", "LocalBlobStore", "S3BlobStore", "make_blob_store",
    "STORE_KINDS", "CHUNK_SIZE", "check_sha256",
]


def _local(*, root: str | Path | None = None, **_: object) -> BlobStore:
    if root is None:
        raise InvalidRequest("a local blob store needs a root directory", details={"kind": "local"})
    return LocalBlobStore(root)


def _s3(*, endpoint: str | None = None, access_key: str | None = None,
        secret_key: str | None = None, bucket: str | None = None, secure: bool = False,
        region: str | None = None, public_endpoint: str | None = None,
        **_: object) -> BlobStore:
    from .s3 import S3BlobStore

    if not endpoint or not bucket:
        raise InvalidRequest("an S3 blob store needs an endpoint and a bucket",
                             details={"kind": "s3", "endpoint": endpoint, "bucket": bucket})
    return S3BlobStore(endpoint=endpoint, bucket=bucket, access_key=access_key,
                       secret_key=secret_key, secure=secure, region=region,
                       public_endpoint=public_endpoint)


STORE_KINDS: dict[str, Callable[..., BlobStore]] = {"local": _local, "s3": _s3}


def make_blob_store(kind: str, *, root: str | Path | None = None, endpoint: str | None = None,
                    access_key: str | None = None, secret_key: str | None = None,
                    bucket: str | None = None, secure: bool = False,
                    region: str | None = None,
                    public_endpoint: str | None = None) -> BlobStore:
    """Build the blob store ``kind`` (``"local"`` or ``"s3"``) from its settings.

    ``public_endpoint`` (S3 only) is the address clients outside the registry's network reach
    the object store at; presigned URLs are made for it when given.
    """
    factory = STORE_KINDS.get(kind)
    if factory is None:
        raise InvalidRequest(f"unknown blob store kind {kind!r}; choose one of "
                             f"{', '.join(sorted(STORE_KINDS))}", details={"kind": kind})
    return factory(root=root, endpoint=endpoint, access_key=access_key, secret_key=secret_key,
                   bucket=bucket, secure=secure, region=region, public_endpoint=public_endpoint)


def __getattr__(name: str) -> Any:
    if name == "S3BlobStore":
        from .s3 import S3BlobStore

        return S3BlobStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
