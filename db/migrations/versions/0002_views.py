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


def _outcome(predictor: str) -> str:
    column = f"pred_{predictor}"
    return (
        f"SELECT run_id, '{predictor}' AS predictor, path, label, {column} AS predicted,\n"
        f"       CASE WHEN label IS NULL THEN NULL\n"
        f"            WHEN {column} = label THEN 1 ELSE 0 END AS correct\n"
        f"FROM predictions WHERE error IS NULL"
    )


# One row per scored image and predictor; ``correct`` is 1/0, NULL for unlabelled images.
PREDICTION_OUTCOMES = (
    "CREATE VIEW prediction_outcomes AS\n"
    + "\nUNION ALL\n".join(_outcome(p) for p in ("l1", "l2", "sgd"))
)

RUN_ACCURACY = """
CREATE VIEW run_accuracy AS
SELECT run_id, predictor,
       COUNT(*) AS n_images,
       SUM(correct) AS n_correct,
       CAST(SUM(correct) AS DOUBLE PRECISION) / COUNT(*) AS accuracy
FROM prediction_outcomes
WHERE label IS NOT NULL
GROUP BY run_id, predictor
"""

RUN_CLASS_ACCURACY = """
CREATE VIEW run_class_accuracy AS
SELECT run_id, predictor, label,
       COUNT(*) AS n_images,
       SUM(correct) AS n_correct,
       CAST(SUM(correct) AS DOUBLE PRECISION) / COUNT(*) AS accuracy
FROM prediction_outcomes
WHERE label IS NOT NULL
GROUP BY run_id, predictor, label
"""

RUN_CONFUSION = """
CREATE VIEW run_confusion AS
SELECT run_id, predictor, label, predicted, COUNT(*) AS n
FROM prediction_outcomes
WHERE label IS NOT NULL
GROUP BY run_id, predictor, label, predicted
"""

VIEWS = ("run_confusion", "run_class_accuracy", "run_accuracy", "prediction_outcomes")


def upgrade() -> None:
    op.execute(PREDICTION_OUTCOMES)
    op.execute(RUN_ACCURACY)
    op.execute(RUN_CLASS_ACCURACY)
    op.execute(RUN_CONFUSION)


def downgrade() -> None:
    for name in VIEWS:  # dependants first
        op.execute(f"DROP VIEW IF EXISTS {name}")
