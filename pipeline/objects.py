"""Object stores (S3, GCS, Azure Blob): the bucket a URL names, and reading, listing and
writing its objects, through obstore (Rust's object_store, the library Polars reads them with).

Owns: which URLs name objects, the extra each needs, one store per bucket made from the
store's standard environment (AWS_*, GOOGLE_*, AZURE_*), an AWS profile (aws_profile.py) and the
config's storage_options, and turning the store's failures into messages that name the object
and never a key. Never: what the bytes are. obstore retries throttling answers (S3's 503 SlowDown, 429s,
other 5xx) and dropped connections itself, with backoff.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, TypeGuard
from urllib.parse import urlsplit

from .aws_profile import profile_options
from .errors import ConfigError

__all__ = ["is_object_url", "check_extra", "use_options", "polars_options", "child", "parent", "bucket_of", "Bucket",
           "Tag", "read_async", "NotFound", "Conflict", "TooLarge"]

# scheme -> the extra that reads it (all three are obstore; the names say what a user has)
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "az": "azure", "azure": "azure", "abfs": "azure", "abfss": "azure",
           "adl": "azure"}
_options: tuple[tuple[str, str], ...] = ()  # the config's storage_options (use_options)
# What names a version of an object for a conditional write: its ETag, and its version or
# generation where the store has one (GCS updates only by generation).
Tag = tuple[str, str | None]


class NotFound(FileNotFoundError):
    """No object at that URL."""


class TooLarge(Exception):
    """An object larger than the reader would take."""


class Conflict(Exception):
    """A conditional write lost: the object exists, or changed since it was read."""


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def is_object_url(ref: object) -> TypeGuard[str]:
    """A URL of an object store this tool reads (s3://, gs://, az://, abfs://, ...)."""
    return isinstance(ref, str) and "://" in ref[:10] and _scheme(ref) in _EXTRAS


def _obstore(url: str) -> ModuleType:
    try:
        import obstore  # the optional extras' one library
    except ImportError:
        extra = f"annotate-pipeline[{_EXTRAS[_scheme(url)]}]"
        raise ConfigError(f"{url}: this URL needs the {extra} extra: pip install '{extra}'") from None
    return obstore


def check_extra(url: str) -> None:
    """ConfigError (exit 2) naming the extra when the library for `url` is not installed."""
    _obstore(url)


def use_options(options: Mapping[str, str]) -> None:
    """The config's storage_options, for every bucket this process opens from now on."""
    global _options
    _options = tuple(sorted(options.items()))


def polars_options(url: str) -> dict[str, str]:
    """What Polars needs beyond the environment to read `url`: the profile's and storage_options."""
    return {**(profile_options() if _EXTRAS[_scheme(url)] == "s3" else {}), **dict(_options)}


def _split(url: str) -> tuple[str, str]:
    """('s3://bucket', 'key/of/object'): the bucket (an Azure container) is the URL's host, as
    Polars and fsspec read these URLs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/")


def bucket_of(url: str) -> str:
    """The bucket's URL: 's3://bucket'."""
    return _split(url)[0]


def _store(root: str) -> Any:
    return _store_with(root, _options)


@cache
def _store_with(root: str, options: tuple[tuple[str, str], ...]) -> Any:
    """One store per bucket and options: its connections are pooled across reads."""
    return _obstore(root).store.from_url(root, config=polars_options(root) or None)


def child(base: str, name: str) -> str:
    """`name` (a relative path) under the folder URL `base`."""
    return f"{base.rstrip('/')}/{name.lstrip('/')}"


def parent(url: str) -> str:
    """The folder URL an object is in."""
    return url.rstrip("/").rsplit("/", 1)[0]


def _tag(meta: Mapping[str, Any]) -> Tag:
    version = meta.get("version")
    return str(meta["e_tag"]), None if version is None else str(version)


def _named(exc: Exception, url: str) -> Exception:
    """The store's failure as NotFound, Conflict or OSError, naming the object."""
    import obstore.exceptions as oe

    text = str(exc).split(": Error performing", 1)[0]  # the request line and the server's XML are noise
    if isinstance(exc, FileNotFoundError | oe.NotFoundError):
        return NotFound(f"no object {url}")
    if isinstance(exc, oe.AlreadyExistsError | oe.PreconditionError):
        return Conflict(f"{url}: {text}")
    return OSError(f"{url}: {type(exc).__name__}: {text}")


class Bucket:
    """The objects under one folder URL (a bucket, or a prefix in one)."""

    def __init__(self, url: str) -> None:
        self._obstore = _obstore(url)  # first: a missing extra is named with the URL as given
        self.url = url.rstrip("/")
        root, folder = _split(self.url)
        self._prefix = f"{folder}/" if folder else ""
        self._store = _store(root)

    def url_of(self, name: str) -> str:
        return child(self.url, name)

    def _call(self, name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._obstore, method)(self._store, self._prefix + name, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - obstore's errors, and OSError's family
            raise _named(exc, self.url_of(name)) from None

    def read(self, name: str) -> bytes:
        return bytes(self._call(name, "get").bytes())

    def write(self, name: str, data: bytes | Path) -> str:
        """One PUT (a multipart upload for a large file): the object appears whole or not at all."""
        return str(self._call(name, "put", data)["e_tag"])

    def create(self, name: str, data: bytes) -> Tag:
        """Write only if no object has the name; Conflict if one has. The new object's tag."""
        return _tag(self._call(name, "put", data, mode="create"))

    def replace(self, name: str, data: bytes, tag: Tag) -> Tag:
        """Write only if the object is still the one tagged `tag`; Conflict if not. The new tag."""
        e_tag, version = tag
        mode = {"e_tag": e_tag, **({"version": version} if version is not None else {})}  # obstore refuses a None
        return _tag(self._call(name, "put", data, mode=mode))

    def read_tagged(self, name: str) -> tuple[bytes, Tag]:
        """The object's bytes and its tag."""
        found = self._call(name, "get")
        return bytes(found.bytes()), _tag(found.meta)

    def delete(self, name: str) -> None:
        self._call(name, "delete")

    def exists(self, name: str) -> bool:
        try:
            self._call(name, "head")
        except NotFound:
            return False
        return True

    def names(self, under: str = "") -> Iterator[tuple[str, int]]:
        """(name, size) of every object under `under`, relative to this folder, in key order."""
        try:
            for page in self._obstore.list(self._store, self._prefix + under or None):
                for meta in page:
                    yield str(meta["path"])[len(self._prefix):], int(meta["size"])
        except Exception as exc:  # noqa: BLE001 - obstore's errors
            raise _named(exc, self.url_of(under)) from None


async def read_async(url: str, first: int | None = None, limit: int | None = None) -> bytes:
    """The object's bytes, fetched without blocking; with `first`, only its first bytes (a
    ranged GET). NotFound, TooLarge (over `limit`, nothing read) or OSError name the object."""
    obstore = _obstore(url)
    root, key = _split(url)
    store = _store(root)
    try:
        if first is not None:
            return bytes(await obstore.get_range_async(store, key, start=0, length=first))
        found = await obstore.get_async(store, key)
        if limit is not None and found.meta["size"] > limit:
            raise TooLarge(f"{url} is {found.meta['size']} bytes")
        return bytes(await found.bytes_async())
    except TooLarge:
        raise
    except Exception as exc:  # noqa: BLE001 - obstore's errors
        raise _named(exc, url) from None
