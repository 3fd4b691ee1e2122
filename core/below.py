"""Opening a recorded relative path beneath a run's source directory, one component at a time.

A worker reading a ``--send paths`` batch must never read a file outside the run's source
directory, even while someone swaps a folder under it for a symlink to elsewhere. Resolving a
path first (``realpath``) and opening it afterwards looks each name up twice, and a swap
between the two leads out. Here every component is opened relative to its parent's
descriptor with ``O_NOFOLLOW``, so each name is looked up once: a symlink met on the way is
read where it stands (``readlinkat``) and its target walked the same way, from the root when
it is absolute. Nothing ever climbs above the root: a ``..`` there, or an absolute target
that does not start with the root, is :class:`Outside`. This is ``openat2``'s
``RESOLVE_BENEATH`` done in user space (Python has no ``openat2``).

A relative link target that climbs above the root and comes back in (``../root/x``) is
refused, where ``realpath`` would accept it: stricter, never looser.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from types import TracebackType

#: Folders are opened only to be walked through: ``O_PATH`` needs search permission only,
#: as a path lookup does.
_FOLDER_FLAGS = os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_PATH", os.O_RDONLY)
#: Symlinks followed in one path before it is given up on, as the kernel's limit.
MAX_LINKS = 40
#: Times one path's component is looked at again when it changed between two looks.
MAX_LOOKS = 3
#: Folder descriptors kept open at once; past it they are all closed and opened again.
MAX_OPEN_FOLDERS = 256


class Outside(Exception):
    """The path, its symlinks followed, leads out of the root."""



class Below:
    """The folders below ``root`` (a resolved directory) that one batch's paths pass through,
    each opened once and named by its place below the root; :meth:`close` closes them."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._prefix = os.path.join(root, "")
        self._root_fd = os.open(root, _FOLDER_FLAGS & ~os.O_NOFOLLOW)
        #: folder descriptors by their place below the root ("a/b"), reached name by name
        self._fds: dict[str, int] = {}

    def __enter__(self) -> Below:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._forget_folders()
        os.close(self._root_fd)

    def open(self, rel: str, flags: int) -> int:
        """A descriptor of ``rel``'s last component opened with ``flags`` (plus
        ``O_NOFOLLOW``); a path ending in ``/`` opens that folder itself. Raises
        :class:`Outside`, or the ``OSError`` of the component that failed."""
        folder, _, name = rel.rpartition("/")
        fd = self._fds.get(folder) if folder else None if rel[:1] == "/" else self._root_fd
        if fd is not None and name not in ("", ".", ".."):
            # the common case: a plain name in a folder already walked to
            try:
                return os.open(name, flags | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                pass  # a link, or what fails: the walk answers
        return self._walk(rel, flags)

    def _walk(self, rel: str, flags: int) -> int:
        """:meth:`open`, one component at a time."""
        want_folder = rel.endswith("/")
        pending = deque(self._components(rel))
        where = ""  # the folder reached, as names below the root joined by "/"
        links = 0
        looks = 0
        while True:
            while pending and pending[0] in ("", "."):
                pending.popleft()
            if not pending:  # the path names a folder
                return os.open(".", flags, dir_fd=self._folder(where))
            name = pending.popleft()
            if name == "..":
                if not where:
                    raise Outside(rel)
                where = where.rpartition("/")[0]
                continue
            try:
                if not want_folder and all(n in ("", ".") for n in pending):
                    return os.open(name, flags | os.O_NOFOLLOW, dir_fd=self._folder(where))
                where = self._enter(where, name)
                continue
            except OSError as e:
                target = _link_target(e, name, self._folder(where))
                if target is None:  # not a link when read: swapped since it was opened?
                    looks += 1
                    if looks >= MAX_LOOKS:
                        raise
                    pending.appendleft(name)
                    continue
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
            if target.startswith("/"):
                where = ""
            pending.extendleft(reversed(self._components(target)))

    def _components(self, path: str) -> list[str]:
        """The names to walk from the root for ``path``: an absolute path leads in only
        through the root's own spelling, and is then walked as a relative one."""
        if not path.startswith("/"):
            return path.split("/")
        if path.rstrip("/") == self.root:
            return []
        if not path.startswith(self._prefix):
            raise Outside(path)
        return path[len(self._prefix):].split("/")

    def _enter(self, where: str, name: str) -> str:
        """The folder ``name`` in ``where``, opened (not through a link): its place."""
        child = f"{where}/{name}" if where else name
        self._folder(child)
        return child

    def _folder(self, where: str) -> int:
        """The descriptor of the folder at ``where``, opened from its parent's."""
        if not where:
            return self._root_fd
        fd = self._fds.get(where)
        if fd is None:
            parent, _, name = where.rpartition("/")
            fd = os.open(name, _FOLDER_FLAGS, dir_fd=self._folder(parent))
            if len(self._fds) >= MAX_OPEN_FOLDERS:
                self._forget_folders()
            self._fds[where] = fd
        return fd

    def _forget_folders(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _link_target(error: OSError, name: str, folder: int) -> str | None:
    """The target of the symlink ``name`` in ``folder``, when ``error`` (opening it without
    following links) may have come from its being one; ``None`` when it is no link (a file
    where a folder was wanted, or a link swapped for something else since); else ``error``
    again, or the reading's own error (the name is gone)."""
    if error.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        raise error
    try:
        return os.readlink(name, dir_fd=folder)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
