"""Object stores (S3, GCS, Azure Blob): the bucket a URL names, and reading, listing and
writing its objects, through obstore (Rust's object_store, the library Polars reads them with).

Owns: which URLs name objects, the extra each needs, one store per bucket made from the
store's standard environment (AWS_*, GOOGLE_*, AZURE_*), an AWS profile's files and the config's
storage_options, and turning the store's failures into messages that name the object and never
a key. Never: what the bytes are. obstore retries throttling answers (S3's 503 SlowDown, 429s,
other 5xx) and dropped connections itself, with backoff.
"""

from __future__ import annotations

import configparser
import os
import threading
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, TypeGuard
from urllib.parse import urlsplit

from .errors import ConfigError

__all__ = ["is_object_url", "check_extra", "use_options", "polars_options", "child", "parent", "Bucket", "read_async",
           "NotFound", "Conflict", "TooLarge"]

# scheme -> the extra that reads it (all three are obstore; the names say what a user has)
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "az": "azure", "azure": "azure", "abfs": "azure", "abfss": "azure",
           "adl": "azure"}
# An AWS profile's settings, as the AWS CLI's files name them -> object_store's keys. object_store
# reads the environment only; these files are INI, so configparser reads them.
_PROFILE_KEYS = {"aws_access_key_id": "aws_access_key_id", "aws_secret_access_key": "aws_secret_access_key",
                 "aws_session_token": "aws_session_token", "region": "aws_region", "endpoint_url": "aws_endpoint_url"}
_options: dict[str, str] = {}
_lock = threading.Lock()


class NotFound(FileNotFoundError):
    """No object at that URL."""


class TooLarge(Exception):
    """An object larger than the reader would take."""


class Conflict(Exception):
    """A conditional write lost: the object exists, or changed since it was read."""


def is_object_url(ref: object) -> TypeGuard[str]:
    """A URL of an object store this tool reads (s3://, gs://, az://, abfs://, ...)."""
    return isinstance(ref, str) and "://" in ref[:10] and ref.split("://", 1)[0].lower() in _EXTRAS


def _obstore(url: str) -> ModuleType:
    try:
        import obstore  # the optional extras' one library
    except ImportError:
        extra = f"annotate-pipeline[{_EXTRAS[url.split('://', 1)[0].lower()]}]"
        raise ConfigError(f"{url}: this URL needs the {extra} extra: pip install '{extra}'") from None
    return obstore


def check_extra(url: str) -> None:
    """ConfigError (exit 2) naming the extra when the library for `url` is not installed."""
    _obstore(url)


def use_options(options: Mapping[str, str]) -> None:
    """The config's storage_options, for every bucket this process opens from now on."""
    global _options
    with _lock:
        if dict(options) != _options:
            _options = dict(options)
            _store.cache_clear()


def _aws_profile() -> dict[str, str]:
    """Keys, region and endpoint of $AWS_PROFILE (else 'default') from the AWS CLI's files, each
    only where its environment variable is unset (the environment wins, as in the AWS CLI)."""
    name = os.environ.get("AWS_PROFILE", "default")
    found: dict[str, str] = {}
    for variable, default, section in (("AWS_CONFIG_FILE", "~/.aws/config", "default" if name == "default" else f"profile {name}"),
                                       ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials", name)):
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(os.path.expanduser(os.environ.get(variable, default)))
        if parser.has_section(section):
            found |= {_PROFILE_KEYS[k]: v for k, v in parser[section].items() if k in _PROFILE_KEYS}
    return {key: value for key, value in found.items() if key.upper() not in os.environ}


def polars_options(url: str) -> dict[str, str]:
    """What Polars needs beyond the environment to read `url`: the profile's and storage_options."""
    return {**(_aws_profile() if _EXTRAS[url.split("://", 1)[0].lower()] == "s3" else {}), **_options}


def _split(url: str) -> tuple[str, str]:
    """('s3://bucket', 'key/of/object'): the bucket (an Azure container) is the URL's host, as
    Polars and fsspec read these URLs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/")


@cache
def _store(root: str) -> Any:
    obstore = _obstore(root)
    return obstore.store.from_url(root, config=polars_options(root) or None)


def child(base: str, name: str) -> str:
    """`name` (a relative path) under the folder URL `base`."""
    return f"{base.rstrip('/')}/{name.lstrip('/')}"


def parent(url: str) -> str:
    """The folder URL an object is in."""
    return url.rstrip("/").rsplit("/", 1)[0]


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

    def create(self, name: str, data: bytes) -> str:
        """Write only if no object has the name; Conflict if one has. Its ETag."""
        return str(self._call(name, "put", data, mode="create")["e_tag"])

    def replace(self, name: str, data: bytes, e_tag: str) -> str:
        """Write only if the object is still the one read with `e_tag`; Conflict if not."""
        return str(self._call(name, "put", data, mode={"e_tag": e_tag})["e_tag"])

    def read_tagged(self, name: str) -> tuple[bytes, str]:
        """The object's bytes and its ETag."""
        found = self._call(name, "get")
        return bytes(found.bytes()), str(found.meta["e_tag"])

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
    """The object's bytes, fetched without blocking; with `first`, only its first bytes (the
    rest of the stream is dropped unread). NotFound, TooLarge (over `limit`, nothing read) or
    OSError name the object."""
    obstore = _obstore(url)
    root, key = _split(url)
    try:
        found = await obstore.get_async(_store(root), key)
        if first is None and limit is not None and found.meta["size"] > limit:
            raise TooLarge(f"{url} is {found.meta['size']} bytes")
        if first is None:
            return bytes(await found.bytes_async())
        head = bytearray()
        async for chunk in found.stream(min_chunk_size=min(first, 1 << 16)):
            head += chunk
            if len(head) >= first:
                break
        return bytes(head[:first])
    except TooLarge:
        raise
    except Exception as exc:  # noqa: BLE001 - obstore's errors
        raise _named(exc, url) from None
