"""One :class:`Settings`: every ``DIGITSCORE_*`` setting, built once, checked once, passed down.

A command-line flag and its env var are one setting: Click reads the env var through
``envvar=`` and hands the value to :meth:`Settings.from_env`, which reads every other setting
from the environment, checking each as it parses it, and returns the one object code receives.
The defaults, with their units, are the constants of :mod:`core.defaults`. What follows from
another setting is derived, not a knob: the task time limit and the longest wait between two
database retries both follow from the visibility timeout (:attr:`Settings.task_time_limit`,
:attr:`Settings.db_retry_max`), which is why that must be at least 2 s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from core import defaults
from core.errors import BadInput
from core.text import mask_url


class SettingError(BadInput):
    """A ``DIGITSCORE_*`` setting that cannot be used; the message names it and what to use."""


def positive_whole(name: str, raw: str, unit: str) -> int:
    """``raw`` (the value of setting ``name``) as a whole number of ``unit`` above 0."""
    try:
        value = int(raw)
    except ValueError as e:
        raise SettingError(f"{name}={raw!r} is not a whole number of {unit}") from e
    if value <= 0:
        raise SettingError(f"{name} must be a positive number of {unit}")
    return value


def yes_or_no(name: str, raw: str) -> bool:
    """``raw`` as a switch: 1/true/yes/on or 0/false/no/off."""
    value = raw.lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on"):
        raise SettingError(f"{name}={raw!r}: use 1 or 0")
    return value in ("1", "true", "yes", "on")


def parse_path_map(name: str, raw: str) -> tuple[str, str]:
    """``/producer/prefix=/worker/prefix`` as the pair of prefixes."""
    source, sep, target = raw.partition("=")
    if not sep or not source.startswith("/") or not target.startswith("/"):
        raise SettingError(
            f"{name}={raw!r}: use /producer/prefix=/worker/prefix (two absolute paths)"
        )
    return source.rstrip("/") or "/", target.rstrip("/") or "/"


def parse_secret(name: str, raw: str) -> bytes:
    if len(raw) < defaults.MIN_SECRET_CHARS:
        raise SettingError(
            f"{name} is shorter than {defaults.MIN_SECRET_CHARS} characters: use a random "
            "one, e.g. `openssl rand -hex 32`"
        )
    return raw.encode()


def parse_send(name: str, raw: str) -> str:
    if raw not in defaults.SEND_MODES:
        raise SettingError(f"{name}={raw!r}: use one of {', '.join(defaults.SEND_MODES)}")
    return raw


def _seconds(name: str, raw: str) -> int:
    return positive_whole(name, raw, "seconds")


def _visibility_timeout(name: str, raw: str) -> int:
    """Seconds, at least 2: the task time limit and the longest database retry wait, each at
    least 1 s, must fit below it."""
    value = positive_whole(name, raw, "seconds")
    if value < 2:
        raise SettingError(
            f"{name}={value} s leaves the task time limit (1 s) no room below it: a batch would "
            "be handed to a second worker while the first still holds it; use at least 2 s "
            "(600 s unless batches are tiny)"
        )
    return value


def _bytes(name: str, raw: str) -> int:
    return positive_whole(name, raw, "bytes")


def _images(name: str, raw: str) -> int:
    return positive_whole(name, raw, "images")


def _processes(name: str, raw: str) -> int:
    return positive_whole(name, raw, "processes")


def _port(name: str, raw: str) -> int:
    value = positive_whole(name, raw, "(a TCP port)")
    if value > 65535:
        raise SettingError(f"{name}={raw!r} is not a TCP port (1-65535)")
    return value


def _seconds_or_off(name: str, raw: str) -> float:
    """A number of seconds, 0 meaning off."""
    try:
        value = float(raw)
    except ValueError as e:
        raise SettingError(f"{name}={raw!r} is not a number of seconds") from e
    if not value >= 0:
        raise SettingError(f"{name} must be 0 (off) or a number of seconds")
    return value


def _env(name: str, parse: Any, flag: str = "") -> dict[str, Any]:
    """A field's metadata: its env var (``defaults.<name>_ENV``), how its text is parsed
    (``None``: kept as text), and its flag, if any."""
    return {"env": getattr(defaults, f"{name}_ENV"), "parse": parse, "flag": flag}


@dataclass(frozen=True)
class Settings:
    """Every setting of digitscore; see :mod:`core.defaults` for what each default means."""

    database_url: str = field(
        default=defaults.DATABASE_URL, metadata=_env("DATABASE_URL", None, "--database-url"))
    broker_url: str | None = field(
        default=defaults.BROKER_URL, metadata=_env("BROKER_URL", None, "--broker-url"))
    queue: str = field(default=defaults.QUEUE, metadata=_env("QUEUE", None))
    visibility_timeout: int = field(
        default=defaults.VISIBILITY_TIMEOUT,
        metadata=_env("VISIBILITY_TIMEOUT", _visibility_timeout))
    concurrency: int | None = field(
        default=defaults.WORKER_CONCURRENCY,
        metadata=_env("CONCURRENCY", _processes, "--concurrency"))
    require_gpu: bool = field(
        default=False, metadata=_env("REQUIRE_GPU", yes_or_no, "--require-gpu"))
    payload_ttl: int = field(
        default=defaults.PAYLOAD_TTL, metadata=_env("PAYLOAD_TTL", _seconds))
    task_events: bool = field(
        default=defaults.TASK_EVENTS, metadata=_env("TASK_EVENTS", yes_or_no))
    stall_hint_after: int = field(
        default=defaults.STALL_HINT_AFTER, metadata=_env("STALL_HINT_AFTER", _seconds))
    heal_every: float = field(
        default=defaults.HEAL_EVERY, metadata=_env("HEAL_EVERY", _seconds_or_off))
    debug: bool = field(default=False, metadata=_env("DEBUG", yes_or_no, "--debug"))
    send: str = field(default=defaults.SEND, metadata=_env("SEND", parse_send, "--send"))
    #: ``None``: the smaller of :data:`defaults.MAX_QUEUED_BYTES` and half Redis's maxmemory.
    max_queued_bytes: int | None = field(
        default=None, metadata=_env("MAX_QUEUED_BYTES", _bytes))
    path_map: tuple[str, str] | None = field(
        default=None, metadata=_env("PATH_MAP", parse_path_map))
    secret: bytes | None = field(
        default=None, repr=False, metadata=_env("SECRET", parse_secret))
    max_batch_images: int = field(
        default=defaults.MAX_BATCH_IMAGES, metadata=_env("MAX_BATCH_IMAGES", _images))
    allow_eviction: bool = field(
        default=False, metadata=_env("ALLOW_EVICTION", yes_or_no))
    metrics_port: int | None = field(
        default=defaults.METRICS_PORT, metadata=_env("METRICS_PORT", _port, "--metrics-port"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **flags: Any) -> Settings:
        """The settings of ``env`` (default: this process's environment; an env var unset or
        blank is not given), with ``flags`` (the values Click read from a flag or its env var;
        ``None``: not given) on top."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            if flags.get(f.name) is not None:
                values[f.name] = flags[f.name]
                continue
            raw, parse = env.get(f.metadata["env"], "").strip(), f.metadata["parse"]
            if raw:
                values[f.name] = parse(f.metadata["env"], raw) if parse else raw
        unknown = set(flags) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"no such settings: {sorted(unknown)}")
        return cls(**values)

    @property
    def task_time_limit(self) -> int:
        """Seconds a batch may take in a pool process before Celery kills that process and
        the batch goes back to the queue: 4/5 of the visibility timeout, at most
        :data:`defaults.TASK_TIME_LIMIT`, so a batch is never still running when Redis hands
        its message to another worker."""
        return max(1, min(defaults.TASK_TIME_LIMIT, self.visibility_timeout * 4 // 5))

    @property
    def db_retry_max(self) -> int:
        """Longest wait between two tries of a batch whose database was unreachable: half the
        visibility timeout, at most :data:`defaults.DB_RETRY_MAX`; a retry waits in its
        worker unacknowledged, so it must end before Redis hands the message out again."""
        return max(1, min(defaults.DB_RETRY_MAX, self.visibility_timeout // 2))

    @property
    def heal_after(self) -> float:
        """Seconds a batch waits after it was last sent before it can be suspected lost: two
        sweeps (a second when healing is off: ``producer heal`` by hand)."""
        return 2 * (self.heal_every or 0.5)

    def __repr__(self) -> str:  # a repr may reach a log: the URLs masked, the secret left out
        return f"Settings({self.describe()})"

    def describe(self) -> str:
        """One line naming every setting a worker acts on, URLs masked, secrets only as set or
        not set."""
        if self.database_url == defaults.DATABASE_URL:
            database = (
                f"{defaults.DATABASE_URL} in {os.getcwd()} (the default: set "
                "DIGITSCORE_DATABASE_URL to a PostgreSQL URL to share results between hosts)"
            )
        else:
            database = mask_url(self.database_url)
        broker = mask_url(self.broker_url) if self.broker_url else "none"
        signed = "signed messages only" if self.secret else (
            "unsigned messages (DIGITSCORE_SECRET is not set)")
        mapped = (f", --send paths runs read below {self.path_map[0]} from {self.path_map[1]}"
                  if self.path_map else "")
        return (
            f"broker {broker}, queue {self.queue}, database {database}, visibility timeout "
            f"{self.visibility_timeout} s, task time limit {self.task_time_limit} s, database "
            f"retries at most {self.db_retry_max} s apart, at most {self.max_batch_images} "
            f"images a batch, {signed}{mapped}"
        )


def env_names() -> dict[str, str]:
    """Each setting's env var and its flag (``""`` when it has none): the README's table."""
    return {f.metadata["env"]: f.metadata["flag"] for f in fields(Settings)}
