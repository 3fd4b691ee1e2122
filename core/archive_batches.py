"""Batches of archive members: each a range of one archive, recorded with where its members
are (``batches.members``), so that a reader opens the archive once and reads just those.

The producer cuts the archives a walk met (:attr:`core.files.DirectoryWalk.archives`) after
its loose files; a worker (``--send paths``) or ``producer resume`` (``--send bytes``) reads a
recorded batch back with :func:`read_recorded`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import closing
from typing import Any

from core import defaults
from core.archives import (
    OPEN_FLAGS,
    Archive,
    Item,
    archive_format,
    archive_of,
    list_items,
    open_archive,
    read_dense,
    read_where,
)
from core.below import Below, Outside
from core.files import OUTSIDE_ROOT, DirectoryWalk, FileBatch, on_disk_name


def archive_batches(
    walk: DirectoryWalk,
    send_mode: str,
    max_images: int = defaults.BATCH_SIZE,
    max_bytes: int = defaults.BATCH_BYTES,
    sent: set[str] | None = None,
) -> Iterator[FileBatch]:
    """The batches of every archive the walk met, archive by archive (members in ``sent``
    left out: ``producer resume``). In ``bytes`` mode each batch holds its members' bytes;
    in ``paths`` mode only its paths and record, and no image byte is read."""
    if max_images < 1:
        raise ValueError("a batch must hold at least one image")
    for path, rel in walk.archives:
        fmt = archive_format(rel)
        if fmt is None:  # a name that is all ending (".tar"): not taken for an archive
            walk.n_skipped += 1
            continue
        try:
            archive = open_archive(path, fmt)
        except OSError as e:
            if sent is None or rel not in sent:
                yield _failed(rel, fmt, f"archive could not be read: {_why(e)}", send_mode)
            continue
        with closing(archive):
            skipped = [0]
            items = list_items(archive, rel, send_mode == "bytes", skipped)
            if sent is not None:
                items = (item for item in items if item.path not in sent)
            cap = max_bytes if send_mode == "bytes" else None
            for chunk in _chunks(items, max_images, cap):
                yield _batch(archive, rel, chunk, send_mode)
            walk.n_skipped += skipped[0]


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _failed(rel: str, fmt: str, reason: str, send_mode: str) -> FileBatch:
    batch = FileBatch()
    if send_mode == "bytes":
        batch.add(rel, None, reason)
    else:
        batch.paths.append(rel)
    batch.members = {"archive": rel, "format": fmt, "size": 0, "members": [reason]}
    return batch


def _size(item: Item) -> int:
    if item.data is not None:
        return len(item.data)
    if isinstance(item.where, str):
        return 0
    return item.where[2] if len(item.where) == 5 else item.where[1]


def _chunks(items: Iterable[Item], max_images: int, max_bytes: int | None) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    n_bytes = 0
    for item in items:
        size = _size(item)
        if chunk and (len(chunk) >= max_images
                      or (max_bytes is not None and n_bytes + size > max_bytes)):
            yield chunk
            chunk, n_bytes = [], 0
        chunk.append(item)
        n_bytes += size
    if chunk:
        yield chunk


def _batch(archive: Archive, rel: str, items: list[Item], send_mode: str) -> FileBatch:
    wheres = [item.where for item in items]
    batch = FileBatch()
    if send_mode == "bytes":
        unread = [i for i, item in enumerate(items)
                  if item.data is None and not isinstance(item.where, str)]
        read = dict(zip(unread, read_where(archive, [wheres[i] for i in unread]), strict=True))
        for i, item in enumerate(items):
            if isinstance(item.where, str):
                batch.add(item.path, None, item.where)
            elif item.data is not None:
                batch.add(item.path, item.data, None)
            else:
                batch.add(item.path, *read[i])
    else:
        batch.paths = [item.path for item in items]
    batch.members = {"archive": rel, "format": archive.fmt, "size": archive.size,
                     "members": wheres}
    labels = [item.label for item in items]
    if any(label is not None for label in labels):
        batch.labels = labels
        batch.members["labels"] = labels
    return batch


def read_recorded(root: str, paths: list[str], record: dict[str, Any]) -> FileBatch:
    """The members a batch's record names, read from its archive below ``root`` (opened
    once, never listed); every row gets the archive's error if it cannot be opened, is
    outside ``root`` or has changed size since it was listed."""
    batch = FileBatch(labels=record.get("labels"), members=record)
    wheres: list[Any] = record["members"]
    archive = _open_below(root, record["archive"], record["format"])
    results: list[tuple[bytes | None, str | None]]
    if isinstance(archive, str):
        results = [(None, w if isinstance(w, str) else archive) for w in wheres]
    else:
        with closing(archive):
            if archive.size != record["size"] and record["size"]:
                changed = (f"archive changed since it was listed ({record['size']} bytes "
                           f"then, {archive.size} now): submit it again")
                results = [(None, w if isinstance(w, str) else changed) for w in wheres]
            else:
                fast = read_dense(archive, wheres)
                if fast is not None:
                    batch.paths, batch.blobs = list(paths), list[bytes | None](fast)
                    batch.errors = [None] * len(fast)
                    batch.n_bytes = sum(map(len, fast))
                    return batch
                results = read_where(archive, wheres)
    for path, (data, error) in zip(paths, results, strict=True):
        batch.add(path, data, error)
    return batch


def _open_below(root: str, rel: str, fmt: str) -> Archive | str:
    """The archive ``rel`` below ``root`` (a resolved directory), each component opened from
    its parent's descriptor (core/below.py), or why not: one that leads outside ``root`` (a
    link, ``..``), even by a folder swapped for a link meanwhile, gets :data:`OUTSIDE_ROOT`."""
    try:
        with Below(root) as below:
            try:
                fd = below.open(rel, OPEN_FLAGS)
            except FileNotFoundError:
                raw = on_disk_name(rel)  # a stored name with \xNN escapes: the file's bytes
                if raw is None:
                    raise
                fd = below.open(raw, OPEN_FLAGS)
        return archive_of(fd, fmt)
    except Outside:
        return OUTSIDE_ROOT
    except OSError as e:
        return f"archive could not be read: {_why(e)}"
    except ValueError:  # a NUL byte: no file is called that
        return "archive could not be read: the name holds a NUL byte"
