"""The producer CLI end to end on temporary directories of real PNG files."""

from __future__ import annotations

import json
import shutil

from sqlalchemy import text

from db.session import get_engine


def test_cli_end_to_end_on_real_pngs(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run_cli("sample-data", "mnist")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "mnist/train/3").glob("*.png"))) == 400
    assert len(list((tmp_path / "mnist/valid/7").glob("*.png"))) == 100

    r = run_cli("train", "mnist/train", "--valid", "mnist/valid", "--epochs", "10")
    assert r.exit_code == 0, r.output
    assert "model 1" in r.stdout
    sgd = float(r.stdout.split("SGD ")[1].split()[0])
    assert sgd >= 0.95

    r = run_cli("submit", "mnist/valid", "--wait")
    assert r.exit_code == 0, r.output
    assert "scoring in this process" in r.stderr
    assert "run 1: 200 images" in r.stdout

    r = run_cli("report", "1", "--json")
    report = json.loads(r.stdout)
    assert report["run"]["status"] == "done"
    assert report["run"]["n_scored"] == 200
    assert {row["label"] for row in report["per_class"]} == {"3", "7"}
    assert report["accuracy"]["sgd"] == sgd  # the same 200 images as --valid

    # the default database is ./digitscore.db, and users can query it with SQL
    engine = get_engine("sqlite:///digitscore.db")
    with engine.connect() as conn:
        n = conn.execute(text("SELECT COUNT(*) FROM predictions WHERE run_id = 1")).scalar()
    assert n == 200

    for cmd in (["runs"], ["models"], ["status", "latest"], ["report", "latest"]):
        r = run_cli(*cmd)
        assert r.exit_code == 0, (cmd, r.output)
    assert "done" in run_cli("status", "1").stdout


def _runs(db_url: str) -> int:
    with get_engine(db_url).connect() as conn:
        return conn.execute(text("SELECT COUNT(*) FROM runs")).scalar()


def test_bad_directories_exit_2_and_create_no_run(run_cli, tmp_path, sample_dir, sqlite_url):
    db = ["--database-url", sqlite_url]
    assert run_cli("train", str(sample_dir / "train"), "--epochs", "1", *db).exit_code == 0
    missing = tmp_path / "nope"
    r = run_cli("submit", str(missing), *db)
    assert r.exit_code == 2 and "nope" in r.output and "does not exist" in r.output
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("hello")
    r = run_cli("submit", str(empty), *db)
    assert r.exit_code == 2 and "no images" in r.output and "empty" in r.output
    assert _runs(sqlite_url) == 0


def test_missing_model_says_to_train(run_cli, sample_dir, sqlite_url):
    db = ["--database-url", sqlite_url]
    r = run_cli("submit", str(sample_dir / "valid"), *db)
    assert r.exit_code == 2 and "producer train" in r.output
    assert run_cli("train", str(sample_dir / "train"), "--epochs", "1", *db).exit_code == 0
    r = run_cli("submit", str(sample_dir / "valid"), "--model", "99", *db)
    assert r.exit_code == 2 and "model 99 does not exist" in r.output
    assert "producer train" in r.output
    assert _runs(sqlite_url) == 0


def test_corrupt_image_gets_an_error_row_and_the_rest_are_scored(
    run_cli, tmp_path, sample_dir, sqlite_url
):
    db = ["--database-url", sqlite_url]
    assert run_cli("train", str(sample_dir / "train"), "--epochs", "3", *db).exit_code == 0
    src = tmp_path / "images"
    shutil.copytree(sample_dir / "valid", src)
    good = next((src / "3").glob("*.png"))
    (src / "3" / "truncated.png").write_bytes(good.read_bytes()[:60])
    (src / "7" / "text.png").write_text("this is not an image")
    (src / "readme.txt").write_text("skipped, not an image name")
    r = run_cli("submit", str(src), "--wait", *db)
    assert r.exit_code == 0, r.output
    with get_engine(sqlite_url).connect() as conn:
        rows = dict(conn.execute(text("SELECT path, error FROM predictions")).all())
        run = conn.execute(text("SELECT n_images, n_scored, n_failed, n_skipped FROM runs")).one()
    assert tuple(run) == (202, 200, 2, 1)
    assert "truncated" in rows["3/truncated.png"] or "corrupt" in rows["3/truncated.png"]
    assert rows["7/text.png"] == "not an image Pillow can read"
    assert sum(e is None for e in rows.values()) == 200


def test_help_needs_no_database(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cmd in ([], ["submit"], ["train"], ["report"], ["resume"], ["wait"], ["sample-data"]):
        r = run_cli(*cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.output
    assert not (tmp_path / "digitscore.db").exists()


def test_wait_reports_a_done_run_and_times_out_on_one_that_does_not_move(
    run_cli, model_db, sample_dir
):
    from db.queries import create_run

    db = ["--database-url", model_db]
    r = run_cli("submit", str(sample_dir / "valid"), "--timeout", "5", *db)
    assert r.exit_code == 2 and "give --wait too" in r.output
    assert run_cli("submit", str(sample_dir / "valid"), *db).exit_code == 0
    r = run_cli("wait", "latest", *db)
    assert r.exit_code == 0, r.output
    assert "run 1" in r.stdout and "200" in r.stdout
    with get_engine(model_db).begin() as conn:  # a run whose producer never sent a batch
        run_id, _ = create_run(conn, 1, str(sample_dir / "valid"), "celery")
    r = run_cli("wait", str(run_id), "--timeout", "0.5", *db)
    assert r.exit_code == 1
    assert r.stderr.splitlines()[-1] == (
        f"Error: run {run_id} not done after --timeout 0.5 s (0/? images); it goes on: see "
        f"`producer status {run_id}`"
    )
    r = run_cli("status", str(run_id), *db)
    assert f"run `producer resume {run_id}` to send the rest" in r.stdout


def test_database_errors_name_their_cause_with_the_right_exit_code(run_cli, tmp_path):
    r = run_cli("runs", "--database-url", "mysql://root:pw@127.0.0.1/test")
    assert r.exit_code == 2
    assert "unsupported database 'mysql'" in r.output and "postgresql://" in r.output
    assert "pw" not in r.output
    r = run_cli("runs", "--database-url", f"sqlite:///{tmp_path}/no/such/dir/x.db")
    assert r.exit_code == 1
    assert "unable to open database file" in r.output and "server is up" not in r.output
def test_batch_size_above_what_a_worker_scores_exits_2_and_creates_no_run(
    run_cli, sample_dir, model_db, monkeypatch
):
    r = run_cli("submit", str(sample_dir / "valid"), "--batch-size", "65537",
                "--database-url", model_db)
    assert r.exit_code == 2
    assert "65537 is more than DIGITSCORE_MAX_BATCH_IMAGES=65536" in r.output
    monkeypatch.setenv("DIGITSCORE_MAX_BATCH_IMAGES", "10")
    r = run_cli("submit", str(sample_dir / "valid"), "--batch-size", "11",
                "--database-url", model_db)
    assert r.exit_code == 2 and "DIGITSCORE_MAX_BATCH_IMAGES=10" in r.output
    with get_engine(model_db).connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM runs")).scalar() == 0
    r = run_cli("submit", str(sample_dir / "valid"), "--batch-size", "10",
                "--database-url", model_db)
    assert r.exit_code == 0, r.output


def test_argument_errors_touch_no_database(run_cli, tmp_path):
    """Every argument is checked before any database is opened: no file is created."""
    db = tmp_path / "never.db"
    url = f"sqlite:///{db}"
    for args in (
        ["submit", str(tmp_path), "--timeout", "-1"],
        ["submit", str(tmp_path), "--timeout", "5"],  # --timeout without --wait
        ["submit", str(tmp_path), "--batch-size", "70000"],
        ["submit", str(tmp_path / "missing")],
        ["resume", "1", "--timeout", "5"],
        ["wait", "latest", "--timeout", "-1"],
        ["train", str(tmp_path), "--epochs", "0"],
    ):
        r = run_cli(*args, "--database-url", url)
        assert r.exit_code == 2, (args, r.output)
        assert not db.exists(), args
