"""``image_folder``: images in a folder, in either of two layouts (detected).

* ``labels_csv``: ``labels.csv`` (``filename,labels``; + optional ``classes.txt`` and
  ``dataset.json``) as for audio; ids are the image paths relative to the folder.
* ``class_folders`` (torchvision ``ImageFolder``): ``root/<class>/<file>.png|jpg|...``; the
  classes are the sorted sub-folder names, the ids ``<class>/<file>`` in sorted order; files
  without an image extension are skipped, as torchvision does.

Images decode with Pillow to float32 ``[3, H0, W0]`` in [0, 1] (greyscale, palette and RGBA
converted to RGB). The view size comes from ``--image-size`` or ``dataset.json``'s
``image_size`` (default 224).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from logitcache.data import PATH_LIMIT, _image_header, _load_image, _read_info, _resolved
from logitcache.errors import LogitCacheError, quote, shorten
from logitcache.labels import LabelTable
from logitcache.sources import IMAGE_EXTS, Source, image_size, modality_of, register_source
from logitcache.sources.audio_folder import read_folder_table

DEFAULT_IMAGE_SIZE = 224


def scan_images(paths: list[str], listed_in: str, inside: str | None = None, threads: int = 8) -> None:
    """Check every image's header (missing, not a regular file, undecodable, empty), in list
    order; with ``inside``, refuse a file that resolves outside that folder (a link)."""
    def one(path: str) -> None:
        _image_header(path, listed_in)
        if inside is not None:
            real = _resolved(path)
            if not real.startswith(inside.rstrip(os.sep) + os.sep):
                raise LogitCacheError(f"{shorten(path, PATH_LIMIT)}: leaves the data folder "
                                      f"(it resolves to {shorten(real, PATH_LIMIT)})")

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(one, paths):  # map re-raises the first failure in list order
            pass


def file_bytes(paths: list[str]) -> int:
    return sum(os.stat(p).st_size for p in paths)


@register_source
class ImageFolder(Source):
    """A labelled image folder (``labels_csv`` or ``class_folders`` layout)."""

    kind = "image_folder"
    modality = "image"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise LogitCacheError(f"{self.root}: data folder not found")
        if (self.root / "labels.csv").is_file():
            self.layout = "labels_csv"
            self.table = read_folder_table(self.root)
            if modality_of(self.labels_file, self.ids) != "image":
                raise LogitCacheError(f"{self.labels_file}: lists no image files ({quote(self.ids[0])}); an "
                                      f"image_folder holds {', '.join(sorted(IMAGE_EXTS))} files")
        else:
            self.layout = "class_folders"
            self.table = _class_folder_table(self.root)
        self.info = _read_info(self.root / "dataset.json")

    @property
    def labels_file(self) -> Path:
        return self.root / "labels.csv" if self.layout == "labels_csv" else self.root

    def path_of(self, index: int) -> str:
        return str(self.root / self.ids[index])

    def load_with_crc(self, index: int) -> tuple[torch.Tensor, int]:
        return _load_image(self.path_of(index), self._listed_in)

    @property
    def _listed_in(self) -> str:
        return "labels.csv" if self.layout == "labels_csv" else "the class folders"

    def defaults(self) -> dict:
        size = self.info.get("image_size", DEFAULT_IMAGE_SIZE)
        return {"size": image_size(size, self.root / "dataset.json")}

    def scan(self) -> None:
        from logitcache.data import _real_dir

        _real_dir.cache_clear()
        scan_images([self.path_of(i) for i in range(len(self))], self._listed_in, os.path.realpath(self.root))

    def dataset_entry(self) -> dict:
        return {"image_bytes": file_bytes([self.path_of(i) for i in range(len(self))]),
                "path": str(self.root.resolve())}

    def describe(self) -> dict:
        return {"kind": self.kind, "layout": self.layout}


def _class_folder_table(root: Path) -> LabelTable:
    """torchvision's ImageFolder: one class per sub-folder (sorted), its image files (any depth,
    sorted) the samples. An empty class folder is refused: its class could never be learnt, and
    a typo'd folder name would pass unnoticed."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise LogitCacheError(f"{root}: no labels.csv and no class sub-folders (an image folder needs one)")
    ids, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p.relative_to(root).as_posix() for p in (root / name).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and not p.is_dir())
        if not files:
            raise LogitCacheError(f"{root / name}: class folder holds no images "
                                  f"({', '.join(sorted(IMAGE_EXTS))}); remove it or add its images")
        ids += files
        labels.append(np.full(len(files), c, dtype=np.int32))
    return LabelTable(ids, classes, np.arange(len(ids) + 1, dtype=np.int64), np.concatenate(labels))
