"""`annotate export DIR --to PATH --format F`: the rows of an output directory in a format
training tools read (writers.py), chosen by a filter and paired with their images (source.py).

Rows whose image cannot be read now (moved, deleted) are left out of the formats that carry
images, counted and named in a warning: an export never stops on one missing file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import ConfigError
from ..store.folder import open_folder
from .source import ImagesAs, Item, items, select
from .writers import FORMATS, HF_EXTRA, takes_images, write

__all__ = ["export", "Exported", "FORMATS", "HF_EXTRA", "DEFAULT_WHERE"]

log = logging.getLogger(__name__)

DEFAULT_WHERE = "status = 'ok' AND coalesce(array_length(flags), 0) = 0"  # answered, and not flagged
_NAMED = 5


@dataclass
class Exported:
    rows: int = 0  # written
    selected: int = 0  # rows the filter kept
    skipped: list[str] = field(default_factory=list)  # why each left-out row's image could not be read


def export(directory: Path | str, to: Path, fmt: str, where: str = DEFAULT_WHERE, images: ImagesAs = "sent",
           progress: bool = True) -> Exported:
    """Write the rows `where` keeps to `to` in format `fmt`; what was written and left out."""
    if to.exists() and (to.is_file() or any(to.iterdir())):
        raise ConfigError(f"--to: {to} exists; export into a new file or an empty folder")
    selection = select(open_folder(directory), where)
    done = Exported(selected=len(selection.rows))
    with_images = takes_images(fmt)

    def kept() -> Iterator[Item]:
        with tqdm(total=done.selected, unit="row", disable=not progress, dynamic_ncols=True) as bar:
            for item in items(selection, images, with_images):
                bar.update()
                if with_images and item.image is None:
                    done.skipped.append(f"{item.row['id']} ({item.problem})")
                    continue
                done.rows += 1
                yield item

    write(fmt, kept(), to, selection.schema)
    if done.skipped:
        log.warning("left out %d rows whose image cannot be read now: %s", len(done.skipped),
                    "; ".join(done.skipped[:_NAMED]) + (" and more" if len(done.skipped) > _NAMED else ""))
    return done
