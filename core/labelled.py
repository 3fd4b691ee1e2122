"""Labelled images read from class folders (``DIR/3/*.png``, ``DIR/7/*.png``...), checked
for what training needs: two classes or more, images in every class, one image size, and
validation folders of the same classes."""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import DirectoryError
from core.files import DirectoryWalk, check_directory, read_file, safe_name
from core.images import ImageError, decode_gray, image_size
from core.text import agree, plural, printable


@dataclass
class LabelledImages:
    stack: torch.Tensor  # N x H x W uint8
    labels: torch.Tensor  # N int64, index into classes
    classes: tuple[str, ...]
    n_unreadable: int


def class_sort_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def load_labelled(
    root: Path, classes: tuple[str, ...] | None = None, size: tuple[int, int] | None = None
) -> LabelledImages:
    """Every image in ``root/<class>/`` (recursively), labelled by its class folder.

    With ``classes`` given (a validation set), the class folders must be exactly those, and
    are read in that order; with ``size`` (``height, width``), every image must have it.
    Otherwise the first image fixes the size. Files that cannot be read or decoded are
    counted in ``n_unreadable`` and left out; an image of another size is an error naming
    both sizes, as is a class folder without a readable image or fewer than two classes.
    """
    root = check_directory(root)
    folders = sorted((p.name for p in root.iterdir() if p.is_dir()), key=class_sort_key)
    if classes is None:
        for name in folders:
            check_class_name(root, name)
        classes = tuple(folders)
        if len(classes) < 2:
            found = f"only {classes[0]!r}" if classes else "none"
            raise DirectoryError(
                f"{str(root)!r} needs at least two class folders (e.g. {root}/3 and {root}/7); "
                f"found {found}"
            )
    elif tuple(folders) != classes:
        raise DirectoryError(class_mismatch(root, classes, folders))
    images: list[np.ndarray] = []
    labels: list[int] = []
    first_of_size: str | None = None
    unreadable = 0
    for k, name in enumerate(classes):
        for path, _rel in DirectoryWalk(root / name):
            data, _err = read_file(path)
            if data is None:
                unreadable += 1
                continue
            try:
                if size is None:  # the first image fixes the model's size
                    size, first_of_size = image_size(data), path
                images.append(decode_gray(data, *size))
            except (ImageError, OSError):
                # the header is read again only for an image that failed: another size is
                # an error, anything else one file left out
                other = header_size(data)
                if size is not None and other is not None and other != size:
                    raise DirectoryError(
                        size_mismatch(root, size, first_of_size, other, path)
                    ) from None
                unreadable += 1
                continue
            labels.append(k)
    if not images:
        raise DirectoryError(f"no readable images in the class folders of {str(root)!r}")
    labelled = LabelledImages(
        torch.from_numpy(np.stack(images)), torch.tensor(labels), tuple(classes), unreadable
    )
    require_every_class(labelled, root)
    return labelled


#: The longest class name: a label in every report and picture.
MAX_CLASS_NAME = 100
#: Unicode categories no class name may hold: controls, format marks (such as a
#: right-to-left override), line and paragraph separators.
_REFUSED_CATEGORIES = {"Cc", "Cf", "Zl", "Zp"}


def class_name_problem(name: str) -> str | None:
    """Why a folder's name cannot be a class's name, or ``None``: a class is stored as text,
    compared with the folders of every later validation and shown in every report."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in name):
        return "it holds a control character"
    if len(name) > MAX_CLASS_NAME:
        return f"it is {len(name)} characters long, more than {MAX_CLASS_NAME}"
    return None


def check_class_name(root: Path, name: str) -> None:
    """:class:`DirectoryError` naming the folder (escaped) and a command that renames it."""
    problem = class_name_problem(name)
    if problem is None:
        return
    shown = printable(safe_name(name))
    fixed = "".join(
        c if class_name_problem(c) is None and c not in "/" else "_" for c in name
    )[:MAX_CLASS_NAME] or "class"
    old, new = shell_quoted(os.path.join(str(root), name)), shell_quoted(str(root / fixed))
    raise DirectoryError(
        f"class folder '{shown}' of {printable(str(root))!r} cannot name a class: {problem} "
        f"(a class name must be valid UTF-8 without control characters, at most "
        f"{MAX_CLASS_NAME} characters); rename the folder, e.g. "
        f"mv -- {old} {new}"
    )


def shell_quoted(path: str) -> str:
    """``path`` as a shell word that gives it back byte for byte (bash and zsh ``$'...'``):
    every character that is not printable, a quote or a backslash as ``\\xHH`` bytes."""
    out = []
    for c in path:
        if c.isprintable() and c not in "'\\" and class_name_problem(c) is None:
            out.append(c)
        else:
            out.extend(f"\\x{b:02x}" for b in os.fsencode(c))
    return "$'" + "".join(out) + "'"


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from an image's header, or ``None`` when it cannot be read."""
    try:
        return image_size(data)
    except ImageError:
        return None


def class_mismatch(root: Path, classes: tuple[str, ...], folders: list[str]) -> str:
    missing = [c for c in classes if c not in folders]
    extra = [f for f in folders if f not in classes]
    parts = [
        f"{what} {', '.join(map(repr, names))}"
        for what, names in (("missing", missing), ("not trained on", extra))
        if names
    ]
    return (
        f"the class folders of {str(root)!r} differ from the training classes "
        f"({', '.join(classes)}): {'; '.join(parts)}; validate on the same classes"
    )


def size_mismatch(
    root: Path, size: tuple[int, int], first: str | None, other: tuple[int, int], path: str
) -> str:
    def wxh(s: tuple[int, int]) -> str:
        return f"{s[1]}x{s[0]}"

    first_seen = f"{first!r} and others" if first else "the training images"
    return (
        f"images of two sizes in {str(root)!r}: {wxh(size)} ({first_seen}) and {wxh(other)} "
        f"({path!r}); a model takes one size: resize the images or move the others out"
    )


def require_every_class(data: LabelledImages, root: Path) -> None:
    """Training needs at least one image per class, or that class has no ideal image."""
    counts = torch.bincount(data.labels, minlength=len(data.classes)).tolist()
    empty = [c for c, n in zip(data.classes, counts, strict=True) if n == 0]
    if empty:
        raise DirectoryError(
            f"{agree(len(empty), 'class folder', 'class folders')} "
            f"{', '.join(map(repr, empty))} of {str(root)!r} "
            f"{agree(len(empty), 'holds', 'hold')} no readable images: add images or remove "
            f"{agree(len(empty), 'the folder', 'the folders')}"
        )


def holdout_split(
    data: LabelledImages, fraction: float, seed: int, root: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation indices: ``fraction`` of each class (at least one image) held
    out, so that every class is both trained on and validated on. A class of one image
    cannot be both: the error names it and says to validate on other images."""
    generator = torch.Generator().manual_seed(seed)
    train: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []
    for k, name in enumerate(data.classes):
        members = torch.nonzero(data.labels == k).flatten()
        n = len(members)
        n_valid = max(1, int(round(n * fraction)))
        if n - n_valid < 1:
            raise DirectoryError(
                f"class {name!r} of {str(root)!r} has {plural(n, 'image')}: too few to hold "
                f"some out for validation and train on the rest; add images to it, or "
                f"validate on images of your own with --valid DIR"
            )
        members = members[torch.randperm(n, generator=generator)]
        valid.append(members[:n_valid])
        train.append(members[n_valid:])
    return torch.cat(train), torch.cat(valid)


def few_validation_images(data: LabelledImages, at_least: int) -> list[tuple[str, int]]:
    """The classes with fewer than ``at_least`` validation images, and how many each has."""
    counts = torch.bincount(data.labels, minlength=len(data.classes)).tolist()
    return [(c, n) for c, n in zip(data.classes, counts, strict=True) if n < at_least]


def subset(data: LabelledImages, idx: torch.Tensor) -> LabelledImages:
    return LabelledImages(data.stack[idx], data.labels[idx], data.classes, 0)
