"""What a batch writes besides its rows, in the transaction that stores them: its counts
(``batch_counts``, ``batch_failures``; db/counts.py), its entries in the run's kept lists
(``run_mistakes``, ``run_unsure``; db/mistakes.py), and the run's state read back (which
says whether to settle it).

On PostgreSQL all of it is one statement of fixed text (data-modifying ``WITH`` clauses over
arrays, prepared once by the driver, its parameters sent in binary, which the driver makes
in half the time of text): one round trip to the server instead of six, which is what
those small writes cost a writer on a busy server. Each kept list's cut is read by the
same statement, before its inserts, as the statements it replaces read it. On SQLite, where
a statement costs no round trip, they are the separate statements of db/counts.py and
db/mistakes.py.
"""

from __future__ import annotations

from sqlalchemy import Connection, select

from core import defaults
from core.columns import BatchColumns
from core.rows import PREDICTORS
from db.counts import RowCounts, write_counts
from db.mistakes import batch_candidates, keep_mistakes
from db.models import runs

_ALL = (
    "WITH cells AS (INSERT INTO batch_counts (run_id, batch_seq, predictor, label, predicted, n) "
    "SELECT %(r)b, %(s)b, * FROM unnest(%(cell_p)b::text[], %(cell_label)b::text[], "
    "%(cell_pred)b::text[], %(cell_n)b::int[])), "
    "failures AS (INSERT INTO batch_failures (run_id, batch_seq, error, n) "
    "SELECT %(r)b, %(s)b, * FROM unnest(%(fail_error)b::text[], %(fail_n)b::int[])), "
    "cuts AS MATERIALIZED (SELECT p AS predictor, (SELECT k.rank_key FROM run_mistakes k "
    "WHERE k.run_id = %(r)b AND k.predictor = p ORDER BY k.rank_key LIMIT 1 OFFSET %(last)b) "
    "AS cut FROM unnest(%(predictors)b::text[]) AS p), "
    "mistakes AS (INSERT INTO run_mistakes (run_id, predictor, path, rank_key) "
    "SELECT %(r)b, v.predictor, v.path, v.rank_key FROM unnest(%(m_p)b::text[], "
    "%(m_path)b::text[], %(m_key)b::float8[]) AS v(predictor, path, rank_key) "
    "JOIN cuts USING (predictor) WHERE cuts.cut IS NULL OR v.rank_key <= cuts.cut "
    "ON CONFLICT DO NOTHING), "
    "unsure AS (INSERT INTO run_unsure (run_id, path, prob_sgd) "
    "SELECT %(r)b, v.path, v.prob FROM unnest(%(u_path)b::text[], %(u_prob)b::float8[]) "
    "AS v(path, prob) WHERE v.prob <= COALESCE((SELECT k.prob_sgd FROM run_unsure k "
    "WHERE k.run_id = %(r)b ORDER BY k.prob_sgd LIMIT 1 OFFSET %(last)b), 'Infinity') "
    "ON CONFLICT DO NOTHING) "
    "SELECT status, n_images FROM runs WHERE id = %(r)b"
)


def write_tallies(
    conn: Connection, run_id: int, seq: int, counts: RowCounts, columns: BatchColumns
) -> tuple[str, int | None]:
    """Write batch ``seq``'s counts and kept-list entries in the caller's transaction;
    return the run's status and ``n_images`` as that transaction sees them."""
    if conn.dialect.name != "postgresql":
        write_counts(conn, run_id, seq, counts)
        keep_mistakes(conn, run_id, columns)
        run = conn.execute(
            select(runs.c.status, runs.c.n_images).where(runs.c.id == run_id)).one()
        return str(run.status), run.n_images
    cells = list(counts.cells.items())
    mistakes, unsure = batch_candidates(columns)
    status, n_images = conn.exec_driver_sql(_ALL, {
        "r": run_id, "s": seq, "last": defaults.MISTAKES_KEPT - 1,
        "predictors": list(PREDICTORS),
        "cell_p": [p for (p, _, _), _ in cells], "cell_label": [lab for (_, lab, _), _ in cells],
        "cell_pred": [q for (_, _, q), _ in cells], "cell_n": [n for _, n in cells],
        "fail_error": list(counts.failures), "fail_n": list(counts.failures.values()),
        "m_p": [p for p, _, _ in mistakes], "m_path": [path for _, path, _ in mistakes],
        "m_key": [key for _, _, key in mistakes],
        "u_path": [path for path, _ in unsure], "u_prob": [key for _, key in unsure],
    }).one()
    return str(status), n_images
