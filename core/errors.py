"""The errors digitscore raises on purpose, under one base class.

Each message says what went wrong and what to do next. The ``producer`` and ``worker`` command
lines turn them into one line on stderr and an exit status in one place each (producer/cli.py,
worker/cli.py): :attr:`DigitscoreError.exit_code` is 2 for bad usage or input, 1 for a failure
at run time (docs/usage.md, "Errors and exit codes").
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2  # the status Click uses for usage errors
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a process ended by SIGINT


class DigitscoreError(Exception):
    """Something the user can act on; a failure at run time unless a subclass says otherwise."""

    exit_code = EXIT_FAILURE


class BadInput(DigitscoreError, ValueError):
    """Input that cannot be used: fix the argument or setting and run the command again."""

    exit_code = EXIT_BAD_INPUT


class DirectoryError(BadInput):
    """A directory that cannot be submitted or trained on: missing, unlistable, no images."""


class NotFound(BadInput, LookupError):
    """A model or run id that the database does not hold."""


class ModelNotFound(NotFound):
    """No such model, or none trained yet; the message says to run ``producer train``."""


class ModelDamaged(DigitscoreError):
    """A stored model whose classes or arrays cannot be read back: it cannot score."""


class RunNotFound(NotFound):
    """No such run."""


class DatabaseURLError(BadInput):
    """A database URL that cannot be parsed or names an unsupported database."""


class WrongDatabase(DatabaseURLError):
    """A database that does not exist, or holds something other than digitscore's schema."""


class BrokerURLError(BadInput):
    """A broker URL that cannot be used, or none where one is needed."""


class DeviceError(BadInput):
    """A ``--device`` that is not ``cpu`` or ``cuda:N``, or a GPU this host does not have."""


class DatabaseUnavailable(DigitscoreError):
    """The database cannot be opened or written: the driver's reason, password masked."""


class RedisPolicyError(BrokerURLError):
    """A Redis that may evict keys under memory pressure: queued batches would vanish."""


class BrokerUnavailable(DigitscoreError):
    """The broker cannot be reached or refuses a write."""


class SubmitInterrupted(DigitscoreError):
    """A ``submit`` or ``resume`` stopped part way by the database, the broker or the file
    system; the run is kept, and ``producer resume RUN`` sends the rest once that is fixed."""


class WaitTimeout(DigitscoreError):
    """``--wait --timeout S`` gave up: the run goes on without the command that waited."""
class RedisFull(BrokerUnavailable):
    """Redis refused a batch for want of memory (submit and resume add ``producer resume RUN``)."""


class GpuError(DigitscoreError):
    """The GPUs cannot be counted or used as the host's devices promise."""


class ImageError(DigitscoreError, ValueError):
    """One image that cannot be decoded; it becomes that image's error row."""


class MessageError(DigitscoreError, ValueError):
    """A queue message or payload that is not what a producer sends; it is dropped, logged."""


class RunBeingSent(DigitscoreError):
    """A live ``submit`` or ``resume`` holds the run's lease: a second sender would record
    the batches it records."""


class RunCancelled(DigitscoreError):
    """The run was cancelled (``producer cancel``): nothing sends or scores it any more."""


class RunUnfinished(BadInput):
    """A run still queued or running, which ``delete`` refuses: cancel it first."""
