"""The ``producer`` CLI.

Run as the ``producer`` console script, a Ctrl-C from the moment this package is imported
(the first line of digitscore that runs) until the command begins, while its libraries are
imported and its arguments parsed, ends it quietly with status 130: nothing has been done
yet. ``producer.cli.ProducerGroup`` hands Ctrl-C back to Python (KeyboardInterrupt) as the
command begins (:func:`take_ctrl_c`; one that lands inside an import is held until the import
ends), and each command says what its interruption left. Before this package is
imported, the interpreter starts, its ``site`` runs and the console script imports ``re``: a
Ctrl-C then is Python's own (docs/faults.md).
"""

from __future__ import annotations

import builtins
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any


def _stopped_before_start(_signum: int, _frame: object) -> None:
    os.write(2, b"stopped before the command began: nothing was submitted or changed\n")
    os._exit(130)


_import = builtins.__import__
_MAIN = threading.main_thread().ident
_depth = 0  # imports under way in the main thread
_held = False  # a Ctrl-C that landed inside one


def take_ctrl_c() -> None:
    """Hand Ctrl-C to the command: SIGINT raises KeyboardInterrupt (:func:`raise_interrupt`),
    and imports are counted so that one landing inside an import waits for its end."""
    if builtins.__import__ is not _counted_import:
        builtins.__import__ = _counted_import
    signal.signal(signal.SIGINT, raise_interrupt)


def raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    """The command's SIGINT handler: a KeyboardInterrupt, held while the main thread imports
    a module and raised as the import ends. An import stopped midway leaves its module half
    loaded, and numpy and torch cannot be imported again in the process. A second Ctrl-C is
    raised at once, so that an import that hangs can still be stopped."""
    global _held
    if _depth and not _held:
        _held = True
        return
    raise KeyboardInterrupt


def _counted_import(*args: Any, **kwargs: Any) -> Any:
    # by hand: no import hook runs when an import ends
    global _depth, _held
    if threading.get_ident() != _MAIN:
        return _import(*args, **kwargs)
    _depth += 1
    try:
        return _import(*args, **kwargs)
    finally:
        _depth -= 1
        if _held and not _depth:
            _held = False
            raise KeyboardInterrupt


if os.path.basename(sys.argv[0] if sys.argv else "") == "producer":
    signal.signal(signal.SIGINT, _stopped_before_start)
