"""Classification data: torchvision's ``ImageFolder`` tree (``ROOT/<class name>/<image>``),
with one-line errors, class names mapped to a model's labels, and a header check of every
image before training."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from spinedet.data.check import Problem
from spinedet.data.coco_files import load_image
from spinedet.data.errors import DataError

__all__ = ["ImageFolderDataset", "check_image_folder"]


def _image_folder(root: str | Path) -> ImageFolder:
    """torchvision's index of ``root`` (no transform), or a one-line DataError."""
    path = Path(root)
    if not path.is_dir():
        raise DataError("no such directory; give an ImageFolder root (one folder per class)", path)
    try:
        return ImageFolder(str(path), loader=load_image)
    except FileNotFoundError as e:  # no class folder, or a class folder without images
        reason = " ".join(str(e).split()).removesuffix(".").replace(str(path), "the folder")
        raise DataError(f"not an ImageFolder tree: {reason}", path) from None


def _some(names: Sequence[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


class ImageFolderDataset(Dataset):
    """``(image, {"labels": class index})`` samples of an ImageFolder tree.

    ``classes``: the class names the labels index (a model's); a folder class not among them
    is refused in one line. By default the folder's own classes (sorted, as ImageFolder does).
    ``by_order``: the sorted class folders are ``classes`` in order, whatever their names (after
    a leading ``"background"`` class the folders lack: ImageNet's synset folders, n01440764
    ..., are classes 1..1000 of a tensorflow/tpu zoo classifier).
    """

    def __init__(
        self,
        root: str | Path,
        transform: Any = None,
        classes: Sequence[str] | None = None,
        by_order: bool = False,
    ) -> None:
        self.root = Path(root)
        self.folder = _image_folder(root)
        self.transform = transform
        self.classes = list(self.folder.classes if classes is None else classes)
        if by_order:
            self._label = self._labels_by_order()
            return
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = [name for name in self.folder.classes if name not in index]
        if unknown:
            raise DataError(f"class folder(s) {_some(unknown)} not among the model's "
                            f"{len(index)} classes ({_some(self.classes)})", root)  # fmt: skip
        # The folder's label -> the label of the same name in ``classes``.
        self._label = [index[name] for name in self.folder.classes]

    def _labels_by_order(self) -> list[int]:
        folders = len(self.folder.classes)
        skip = len(self.classes) - folders
        if skip not in (0, 1) or (skip == 1 and self.classes[0] != "background"):
            raise DataError(f"{folders} class folders for the model's {len(self.classes)} "
                            "classes: by order, give one folder per class", self.root)  # fmt: skip
        return list(range(skip, skip + folders))

    @property
    def categories(self) -> list[dict[str, Any]]:
        """``{id, name}`` per class, ids 0, 1, ... (classifier labels start at 0)."""
        return [{"id": i, "name": name} for i, name in enumerate(self.classes)]

    @property
    def labels(self) -> list[int]:
        """Every image's label, in sample order."""
        return [self._label[folder_label] for _, folder_label in self.folder.samples]

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, torch.Tensor]]:
        path, folder_label = self.folder.samples[index]
        image = self.folder.loader(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, {"labels": torch.tensor(self._label[folder_label])}


def _header_problem(path: str) -> Problem | None:
    try:
        with Image.open(path) as image:
            image.verify()  # header and structure; decoding every pixel is the loader's job
    except Exception as e:  # a check never crashes, whatever Pillow raises
        reason = " ".join(str(e).split())
        return Problem(path, None, None, f"cannot decode image: {reason}", "unreadable image")
    return None


def check_image_folder(
    root: str | Path, progress: bool | None = None, workers: int = 8
) -> list[Problem]:
    """The images of an ImageFolder tree that Pillow cannot open (raises for a tree that is not
    one, see :class:`ImageFolderDataset`)."""
    paths = [path for path, _ in _image_folder(root).samples]
    with ThreadPoolExecutor(max(1, workers)) as pool:  # file I/O bound: threads overlap it
        found = tqdm(pool.map(_header_problem, paths, chunksize=64), total=len(paths),
                     desc="checking images", unit="img",
                     disable=None if progress is None else not progress)  # fmt: skip
        return [problem for problem in found if problem is not None]
