"""The ``producer`` CLI.

Run as the ``producer`` console script, a Ctrl-C from the moment this package is imported
(the first line of digitscore that runs) until the command begins, while its libraries are
imported and its arguments parsed, ends it quietly with status 130: nothing has been done
yet. ``producer.cli.ProducerGroup`` hands Ctrl-C back to Python (KeyboardInterrupt) as the
command begins, and each command says what its interruption left. Before this package is
imported, the interpreter starts, its ``site`` runs and the console script imports ``re``: a
Ctrl-C then is Python's own (docs/faults.md).
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


def _stopped_before_start(_signum: int, _frame: object) -> None:
    os.write(2, b"stopped before the command began: nothing was submitted or changed\n")
    os._exit(130)


#: Whether a Ctrl-C has reached the command. One that lands inside an import (numpy's, torch's)
#: can leave the module half loaded, and the next import of it fails with an ``ImportError``
#: ("cannot load module more than once per process"): that error is the Ctrl-C's doing.
ctrl_c_seen = False


def raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    """The command's SIGINT handler: Python's own (a KeyboardInterrupt), remembered."""
    global ctrl_c_seen
    ctrl_c_seen = True
    raise KeyboardInterrupt


def interrupted(e: BaseException) -> bool:
    """Whether ``e`` is a Ctrl-C, or an import that a Ctrl-C broke."""
    return isinstance(e, KeyboardInterrupt) or (ctrl_c_seen and isinstance(e, ImportError))


if os.path.basename(sys.argv[0] if sys.argv else "") == "producer":
    signal.signal(signal.SIGINT, _stopped_before_start)
