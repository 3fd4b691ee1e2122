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


def _stopped_before_start(_signum: int, _frame: object) -> None:
    os.write(2, b"stopped before the command began: nothing was submitted or changed\n")
    os._exit(130)


if os.path.basename(sys.argv[0] if sys.argv else "") == "producer":
    signal.signal(signal.SIGINT, _stopped_before_start)
