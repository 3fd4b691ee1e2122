"""Views for the common questions: outcomes per predictor, accuracy, confusion counts.

Portable SQL only (it runs as written on SQLite and PostgreSQL): UNION ALL over the three
predictors, and ``CAST(... AS DOUBLE PRECISION)`` for ratios (DOUBLE PRECISION is float8 on
PostgreSQL and has REAL affinity on SQLite).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


PREDICTORS = ("l1", "l2", "sgd")
SCORED = "FROM predictions WHERE error IS NULL"
LABELLED = "FROM predictions WHERE error IS NULL AND label IS NOT NULL"


def _union(arm: str) -> str:
    """``arm`` (a SELECT with ``{p}`` for the predictor) once per predictor, UNION ALL."""
    return "\nUNION ALL\n".join(arm.format(p=p) for p in PREDICTORS)


def _right(p: str = "{p}") -> str:
    return f"SUM(CASE WHEN pred_{p} = label THEN 1 ELSE 0 END)"


# Each aggregate view reads ``predictions`` directly (not through prediction_outcomes), so
# that ``WHERE run_id = ...`` on it reaches the index on predictions(run_id, ...): SQLite
# pushes such a filter into the arms of a UNION ALL, but not through a view of a view.

# One row per scored image and predictor; ``correct`` is 1/0, NULL for unlabelled images.
PREDICTION_OUTCOMES = "CREATE VIEW prediction_outcomes AS\n" + _union(
    "SELECT run_id, '{p}' AS predictor, path, label, pred_{p} AS predicted,\n"
    "       CASE WHEN label IS NULL THEN NULL WHEN pred_{p} = label THEN 1 ELSE 0 END"
    " AS correct\n" + SCORED
)

RUN_ACCURACY = "CREATE VIEW run_accuracy AS\n" + _union(
    "SELECT run_id, '{p}' AS predictor, COUNT(*) AS n_images,\n"
    f"       {_right()} AS n_correct,\n"
    f"       CAST({_right()} AS DOUBLE PRECISION) / COUNT(*) AS accuracy\n"
    f"{LABELLED} GROUP BY run_id"
)

RUN_CLASS_ACCURACY = "CREATE VIEW run_class_accuracy AS\n" + _union(
    "SELECT run_id, '{p}' AS predictor, label, COUNT(*) AS n_images,\n"
    f"       {_right()} AS n_correct,\n"
    f"       CAST({_right()} AS DOUBLE PRECISION) / COUNT(*) AS accuracy\n"
    f"{LABELLED} GROUP BY run_id, label"
)

RUN_CONFUSION = "CREATE VIEW run_confusion AS\n" + _union(
    "SELECT run_id, '{p}' AS predictor, label, pred_{p} AS predicted, COUNT(*) AS n\n"
    f"{LABELLED} GROUP BY run_id, label, pred_{{p}}"
)

VIEWS = ("run_confusion", "run_class_accuracy", "run_accuracy", "prediction_outcomes")


def upgrade() -> None:
    op.execute(PREDICTION_OUTCOMES)
    op.execute(RUN_ACCURACY)
    op.execute(RUN_CLASS_ACCURACY)
    op.execute(RUN_CONFUSION)


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
