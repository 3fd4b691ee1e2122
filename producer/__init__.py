"""The ``producer`` CLI.

Run as the ``producer`` console script, a Ctrl-C from the moment this package is imported
(the first line of digitscore that runs) until the command begins, while its libraries are
imported and its arguments parsed, ends it quietly with status 130: nothing has been done
yet. ``producer.cli.ProducerGroup`` hands Ctrl-C back to Python (KeyboardInterrupt) as the
command begins (:func:`raise_interrupt`, which holds one that lands inside an import until
the import ends), and each command says what its interruption left. Before this package is
imported, the interpreter starts, its ``site`` runs and the console script imports ``re``: a
Ctrl-C then is Python's own (docs/faults.md).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType


def _stopped_before_start(_signum: int, _frame: object) -> None:
    os.write(2, b"stopped before the command began: nothing was submitted or changed\n")
    os._exit(130)


#: Set while a Ctrl-C that landed inside an import waits for the import to end.
_held = threading.Event()


def raise_interrupt(_signum: int, frame: FrameType | None) -> None:
    """The command's SIGINT handler: Python's own (a KeyboardInterrupt), except inside an
    import. An import stopped midway leaves its module half loaded, and numpy and torch
    cannot be imported again in the process, so there the Ctrl-C is held and sent again to
    the main thread once the import has ended."""
    if not _importing(frame):
        raise KeyboardInterrupt
    if not _held.is_set():
        _held.set()
        threading.Thread(target=_send_after_import, args=(threading.get_ident(),),
                         daemon=True).start()


def _importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside an import: importlib's frames are on its stack."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _send_after_import(main: int) -> None:
    # sys._current_frames is the one way to see another thread's stack (documented in sys)
    while _importing(sys._current_frames().get(main)):
        time.sleep(0.02)
    _held.clear()
    signal.pthread_kill(main, signal.SIGINT)


if os.path.basename(sys.argv[0] if sys.argv else "") == "producer":
    signal.signal(signal.SIGINT, _stopped_before_start)
