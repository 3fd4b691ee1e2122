"""Initial schema: models, runs, batches, predictions.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("train_dir", sa.Text, nullable=False),
        sa.Column("classes", sa.Text, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("n_train", sa.Integer, nullable=False),
        sa.Column("n_valid", sa.Integer, nullable=False),
        sa.Column("loss", sa.String(40), nullable=False),
        sa.Column("epochs", sa.Integer, nullable=False),
        sa.Column("lr", sa.Float, nullable=False),
        sa.Column("batch_size", sa.Integer, nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("accuracy_l1", sa.Float),
        sa.Column("accuracy_l2", sa.Float),
        sa.Column("accuracy_sgd", sa.Float),
        sa.Column("ideal_images", sa.LargeBinary, nullable=False),
        sa.Column("sgd_weights", sa.LargeBinary, nullable=False),
        sa.Column("sgd_bias", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
        sa.Column("source_dir", sa.Text, nullable=False),
        sa.Column("backend", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("n_images", sa.Integer),
        sa.Column("n_skipped", sa.Integer, nullable=False),
        sa.Column("n_scored", sa.Integer, nullable=False),
        sa.Column("n_failed", sa.Integer, nullable=False),
        sa.Column("accuracy_l1", sa.Float),
        sa.Column("accuracy_l2", sa.Float),
        sa.Column("accuracy_sgd", sa.Float),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("submitted_at", TS),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
    )
    op.create_index("ix_runs_model_id", "runs", ["model_id"])
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("paths", sa.JSON, nullable=False),
        sa.Column("n_images", sa.Integer, nullable=False),
        sa.Column("n_bytes", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("deliveries", sa.Integer, nullable=False),
        sa.Column("enqueued_at", TS, nullable=False),
        sa.Column("finished_at", TS),
        sa.UniqueConstraint("run_id", "seq", name="uq_batches_run_seq"),
    )
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("batch_seq", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("label", sa.Text),
        sa.Column("pred_l1", sa.Text),
        sa.Column("pred_l2", sa.Text),
        sa.Column("pred_sgd", sa.Text),
        sa.Column("dist_l1", sa.Float),
        sa.Column("dist_l2", sa.Float),
        sa.Column("prob_sgd", sa.Float),
        sa.Column("error", sa.Text),
        sa.Column("scored_at", TS, nullable=False),
        sa.UniqueConstraint("run_id", "path", name="uq_predictions_run_path"),
    )
    op.create_index("ix_predictions_run_batch", "predictions", ["run_id", "batch_seq"])


def downgrade() -> None:
    op.drop_table("predictions")
    op.drop_table("batches")
    op.drop_table("runs")
    op.drop_table("models")
