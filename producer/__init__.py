"""The ``producer`` CLI.

Run as the ``producer`` console script, a Ctrl-C while the command's libraries are still
being imported (its first few tenths of a second) ends it quietly with status 130: nothing
has been done yet. ``producer.cli.main`` hands Ctrl-C back to Python (KeyboardInterrupt) as
soon as it starts, and each command says what its interruption left.
"""

from __future__ import annotations

import os
import signal
import sys


def _stopped_before_start(_signum: int, _frame: object) -> None:
    os.write(2, b"stopped before the command began: nothing was submitted or changed\n")
    os._exit(130)


if os.path.basename(sys.argv[0] if sys.argv else "") == "producer":
    signal.signal(signal.SIGINT, _stopped_before_start)
