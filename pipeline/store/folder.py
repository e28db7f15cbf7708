"""Where an output directory's files live: a local folder, or a folder URL in a bucket.

Owns: listing, reading, publishing (a file appears whole or not at all) and removing the
files of an output directory, the same way for both; where a bucket's journal and lock live on
local disk. Never: what the files hold.

Publishing is write-then-rename on a local disk (synced, so it survives a power cut), and one
PUT on an object store: S3, GCS and Azure Blob make an object visible only once all of it is
stored, and a read after a write sees it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .. import objects
from ..errors import StoreError

__all__ = ["Folder", "LocalFolder", "BucketFolder", "open_folder", "local_dir_for", "cache_home", "journal_owner", "hidden_copy",
           "OWNER_FILE"]

OWNER_FILE = "_owner.json"  # in a bucket output's journal folder: the output it serves and its id


def sync_dir(directory: Path) -> None:
    """Make renames and removals in `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hidden_copy(path: Path, write: Callable[[Path], Any]) -> Path:
    """`write` to a hidden name beside `path`, synced to disk; that name is returned."""
    tmp = path.with_name(f".{path.name}.tmp")  # hidden and not *.parquet: readers never see it half-written
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    return tmp


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    os.replace(hidden_copy(path, write), path)
    sync_dir(path.parent)  # before the journal lets go of the rows this file holds


class Folder(Protocol):
    """The files of an output directory, by name."""

    label: str  # for messages: the path or URL
    options: dict[str, str] | None  # what Polars needs to read the files, beyond the environment

    def names(self, pattern: str) -> list[str]:
        """Names matching a glob pattern, sorted."""

    def locate(self, name: str) -> str:
        """What Polars and pyarrow read the file by."""

    def read(self, name: str) -> bytes:
        """FileNotFoundError when there is no such file."""

    def exists(self, name: str) -> bool: ...

    def publish(self, name: str, write: Callable[[Path], Any]) -> None:
        """`write` the file to a local path, then make it appear under `name` whole."""

    def put_file(self, name: str, path: Path) -> None:
        """A finished local file moved here under `name`, whole."""

    def remove(self, name: str) -> None:
        """Gone, or already gone."""


class LocalFolder:
    """An output directory on local disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = str(path)
        self.options: dict[str, str] | None = None

    def names(self, pattern: str) -> list[str]:
        return sorted(p.name for p in self.path.glob(pattern))

    def locate(self, name: str) -> str:
        return str(self.path / name)

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def publish(self, name: str, write: Callable[[Path], Any]) -> None:
        write_atomically(self.path / name, write)

    def put_file(self, name: str, path: Path) -> None:
        os.replace(path, self.path / name)
        sync_dir(self.path)

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)
        sync_dir(self.path)


class BucketFolder:
    """An output directory in a bucket; files reach it from a local staging folder."""

    def __init__(self, url: str, staging: Path | None) -> None:
        self.bucket = objects.Bucket(url)
        self.label = self.bucket.url
        self.options = objects.polars_options(url) or None
        self._staging = staging  # local files on their way up

    def names(self, pattern: str) -> list[str]:
        top = (name for name, _ in self.bucket.names() if "/" not in name)
        return sorted(name for name in top if fnmatch.fnmatchcase(name, pattern))

    def locate(self, name: str) -> str:
        return self.bucket.url_of(name)

    def read(self, name: str) -> bytes:
        try:
            return self.bucket.read(name)
        except objects.NotFound as exc:
            raise FileNotFoundError(str(exc)) from None

    def exists(self, name: str) -> bool:
        return self.bucket.exists(name)

    def publish(self, name: str, write: Callable[[Path], Any]) -> None:
        with tempfile.TemporaryDirectory(dir=self._staging) as staging:
            path = Path(staging) / name
            write(path)
            self.bucket.write(name, path)

    def put_file(self, name: str, path: Path) -> None:
        self.bucket.write(name, path)
        path.unlink()

    def remove(self, name: str) -> None:
        self.bucket.delete(name)  # deleting a missing object succeeds on S3, GCS and Azure alike


def local_dir_for(location: Path | str, journal_dir: Path | None = None) -> Path:
    """Where the journal and lock of an output directory live: in it when it is local; for a
    bucket, `journal_dir`, else a folder of the user's cache named by the URL (so a run started
    from any working directory finds it)."""
    if isinstance(location, Path):
        return location
    if journal_dir is not None:
        return journal_dir
    key = hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:16]
    return cache_home() / "outputs" / key


def cache_home() -> Path:
    """This tool's folder in the user's cache ($XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "annotate-pipeline"


def journal_owner(local: Path, url: str) -> str:
    """The random id of the journal folder `local`, made on first use, which the bucket's lease
    names; StoreError when the folder serves another output (its rows would go to the wrong place)."""
    path = local / OWNER_FILE
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        owner = {"url": url, "id": uuid.uuid4().hex}
        write_atomically(path, lambda p: p.write_text(json.dumps(owner), encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"output.journal_dir: cannot read {path}: {exc}") from None
    if owner.get("url") != url:
        raise StoreError(f"output.journal_dir: {local} holds the journal of {owner.get('url')}; give each output "
                         "its own journal folder")
    return str(owner["id"])


def open_folder(location: Path | str, local: Path | None = None) -> Folder:
    """The folder at a local path or a bucket URL (`local`: where files for a bucket are staged,
    by default the system's temporary folder)."""
    if isinstance(location, Path):
        return LocalFolder(location)
    return BucketFolder(location, local)
