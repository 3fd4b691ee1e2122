"""A batch's rows as the data of one PostgreSQL binary ``COPY predictions FROM STDIN``, made
from its columns (core/columns.py) rather than row by row: every field of a column is made by
one C-level pass (a table look-up for the few distinct labels and answers, NumPy for the
scores), and the rows are one ``bytes.join`` of the fields taken column by column.

The format (PostgreSQL's "COPY" page, "Binary Format"): a signature and two zero words, then
per row a 16-bit field count and per field a 32-bit length (-1: NULL) and the value in
network order; an ``int4`` is 4 bytes, a ``float8`` 8 (IEEE 754), a ``timestamptz`` 8 (the
microseconds since 2000-01-01 UTC) and ``text`` its UTF-8 bytes; a 16-bit -1 ends the data.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import cast

from core.columns import BatchColumns

#: The order of the fields, as the COPY statement names them (db/bulk.py).
FIELDS = ("run_id", "batch_seq", "path", "label", "pred_l1", "pred_l2", "pred_sgd",
          "dist_l1", "dist_l2", "prob_sgd", "error", "scored_at")
_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_TRAILER = b"\xff\xff"
_NULL = b"\xff\xff\xff\xff"
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
#: The length words of text fields up to this many bytes, made once.
_LENGTHS = [struct.pack(">i", n) for n in range(1024)]


def copy_data(run_id: int, batch_seq: int, columns: BatchColumns, scored_at: datetime) -> bytes:
    """The whole COPY data of the batch's rows, signature and trailer included."""
    n = len(columns.paths)
    if n == 0:
        return _SIGNATURE + _TRAILER
    since = scored_at - _EPOCH
    micros = (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds
    fields: list[Sequence[bytes]] = [
        [struct.pack(">hiiii", len(FIELDS), 4, run_id, 4, batch_seq)] * n,
        *_text(columns.paths),
        _answers(columns),
        _scores(columns),
        _last(columns.errors, struct.pack(">iq", 8, micros)),
    ]
    parts: list[bytes] = [b""] * (n * len(fields))
    for i, field in enumerate(fields):
        parts[i :: len(fields)] = field
    return b"".join((_SIGNATURE, *parts, _TRAILER))


def _text(values: Sequence[str | None]) -> tuple[list[bytes], list[bytes]]:
    """A text column of few NULLs (the paths): its length words and its bytes, as two
    fields. A NULL is the server's to refuse (``path`` is NOT NULL), as for any statement."""
    if None in values:
        return list(map(_field, values)), [b""] * len(values)
    encoded = list(map(str.encode, cast(Sequence[str], values)))
    try:
        return list(map(_LENGTHS.__getitem__, map(len, encoded))), encoded
    except IndexError:  # a value longer than the table
        return [struct.pack(">i", len(b)) for b in encoded], encoded


def _field(value: str | None) -> bytes:
    if value is None:
        return _NULL
    data = value.encode()
    return struct.pack(">i", len(data)) + data


def _answers(columns: BatchColumns) -> list[bytes]:
    """Each row's label and answers, four fields as one value: a batch's distinct (label,
    answers) are a few hundred, found by NumPy from their codes and each made once."""
    import numpy as np

    k = len(columns.classes) + 1
    texts = (columns.labels, *columns.answers)
    if k ** len(texts) >= 2 ** 62:  # too many classes for one int64 code: by the texts
        table = {v: b"".join(map(_field, v)) for v in set(zip(*texts, strict=True))}
        return list(map(table.__getitem__, zip(*texts, strict=True)))
    combined = columns.label_codes + 1
    for codes in columns.answer_codes:
        combined = combined * k + (codes + 1)
    _, first, which = np.unique(combined, return_index=True, return_inverse=True)
    made = [b"".join(_field(t[j]) for t in texts) for j in first.tolist()]
    return list(map(made.__getitem__, which.tolist()))


def _last(errors: Iterable[str | None], scored_at: bytes) -> list[bytes]:
    """The error (NULL for most rows) and the time of each row, as one value."""
    none = _NULL + scored_at
    return [none if e is None else _field(e) + scored_at for e in errors]


def _scores(columns: BatchColumns) -> list[bytes]:
    """The three ``float8`` fields of each row, as one 36-byte value per row made by NumPy;
    a row missing a score (an unscored row has none) is made apart."""
    import numpy as np

    n = len(columns.paths)
    block = np.empty((n, 3), dtype=[("length", ">i4"), ("value", ">f8")])
    block["length"] = 8
    block["value"] = np.stack(columns.scores, axis=1)
    out = cast(list[bytes], block.view(np.dtype((np.void, 36))).reshape(n).tolist())
    missing = ~np.logical_and.reduce(columns.has_score)
    for j in np.flatnonzero(missing).tolist():
        out[j] = b"".join(
            struct.pack(">id", 8, float(s[j])) if h[j] else _NULL
            for s, h in zip(columns.scores, columns.has_score, strict=True)
        )
    return out
