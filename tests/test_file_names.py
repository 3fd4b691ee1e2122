"""File names are data: stored verbatim through bound SQL parameters, shown escaped in the
terminal, valid in JSON, and found again by ``producer resume``, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.support import (
    PREDICTION_COLUMNS,
    assert_run_complete,
    bytes_name,
    cli_command,
    digit_files,
    drop_queue,
    query,
    run_row,
    save_model,
    submit,
    write_named,
)


def assert_terminal_safe(text: str) -> None:
    for line in text.splitlines():
        bad = [c for c in line if not c.isprintable()]
        assert not bad, (bad, line)


def test_strange_names_are_stored_verbatim_and_reported_safely(
    run_cli, tmp_path, sample_dir, any_model_db
):
    three, seven = digit_files(sample_dir, "3", 1)[0], digit_files(sample_dir, "7", 1)[0]
    src = tmp_path / "images"
    scored = write_named(src / "3", three.read_bytes(), seven.read_bytes())
    failed = write_named(src / "bad", b"not an image", b"not an image either")
    shutil.copyfile(three, src / "3" / "plain.png")
    shutil.copyfile(seven, src / "3" / "plain7.png")

    r = submit(run_cli, src, any_model_db)
    assert r.exit_code == 0, r.output
    rows = assert_run_complete(
        any_model_db,
        {f"3/{n}" for n in scored} | {"3/plain.png", "3/plain7.png"},
        {f"bad/{n}" for n in failed},
        n_skipped=0,
    )
    for name, data in scored.items():  # each row scored the file it names
        twin = "3/plain.png" if data == three.read_bytes() else "3/plain7.png"
        for col in PREDICTION_COLUMNS:
            assert rows[f"3/{name}"][col] == rows[twin][col], (name, col)
    # the injection attempt is a name like any other: every table is still there
    for table in ("models", "runs", "batches", "predictions"):
        assert query(any_model_db, f"SELECT COUNT(*) AS n FROM {table}")[0]["n"] > 0

    text = run_cli("report", "1", "--database-url", any_model_db)
    assert text.exit_code == 0, text.output
    assert_terminal_safe(text.stdout)
    for shown in ("bad/new\\nline.png", "bad/esc\\x1b[31mred\\x1b[0m.png", "\\u202e"):
        assert shown in text.stdout, shown
    assert "bad/x'); DROP TABLE runs; --.png" in text.stdout

    doc = run_cli("report", "1", "--json", "--database-url", any_model_db)
    assert doc.exit_code == 0, doc.output
    report = json.loads(doc.stdout)
    assert {f["path"] for f in report["failures"]} == {f"bad/{n}" for n in failed}

    for cmd in (["runs"], ["status", "1"]):
        out = run_cli(*cmd, "--database-url", any_model_db)
        assert out.exit_code == 0, out.output
        assert_terminal_safe(out.stdout)
    runs = json.loads(run_cli("runs", "--json", "--database-url", any_model_db).stdout)
    assert runs[0]["n_failed"] == len(failed)


def test_html_report_escapes_file_names(run_cli, tmp_path, sample_dir, any_model_db):
    src = tmp_path / "images"
    shutil.copytree(sample_dir / "valid" / "3", src / "3")
    (src / "bad").mkdir()
    (src / "bad" / "<script>alert(1)<").mkdir()
    (src / "bad" / "<script>alert(1)</script>.png").write_text("<b>not an image</b>")
    assert submit(run_cli, src, any_model_db).exit_code == 0
    page = tmp_path / "run.html"
    r = run_cli("report", "1", "--html", str(page), "--database-url", any_model_db)
    assert r.exit_code == 0, r.output
    html = page.read_text(encoding="utf-8")
    assert "<script>alert(1)" not in html
    assert "bad/&lt;script&gt;alert(1)&lt;/script&gt;.png" in html


def test_a_source_directory_with_control_characters_is_stored_and_shown_escaped(
    run_cli, tmp_path, sample_dir, any_model_db
):
    src = tmp_path / "run\n\x1b[2J dir"
    shutil.copytree(sample_dir / "valid" / "7", src / "7")
    r = submit(run_cli, src, any_model_db)
    assert r.exit_code == 0, r.output
    assert run_row(any_model_db)["source_dir"] == str(src.resolve())
    for cmd in (["runs"], ["report", "1"]):
        out = run_cli(*cmd, "--database-url", any_model_db)
        assert out.exit_code == 0, out.output
        assert_terminal_safe(out.stdout)
        assert "run\\n\\x1b[2J dir" in out.stdout


def test_a_source_directory_that_is_not_utf8_exits_2_and_creates_no_run(
    tmp_path, sample_dir, any_model_db
):
    """Its path must be stored to re-read its files (resume, thumbnails): refused, clearly."""
    src = bytes_name(tmp_path, b"images-\xff")
    shutil.copytree(sample_dir / "valid" / "7", os.fsdecode(os.path.join(src, b"7")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITSCORE_")}
    command = cli_command("submit", "DIR", "--database-url", any_model_db)
    command[command.index("DIR")] = src  # type: ignore[call-overload]  # argv as raw bytes
    proc = subprocess.run(command, env=env, capture_output=True, timeout=120)
    stderr = proc.stderr.decode("utf-8")
    assert proc.returncode == 2, stderr
    assert "images-\\xff" in stderr and "not valid UTF-8" in stderr
    assert query(any_model_db, "SELECT COUNT(*) AS n FROM runs")[0]["n"] == 0


@pytest.mark.integration
def test_resume_rereads_files_with_strange_and_undecodable_names(
    run_cli, tmp_path, sample_dir, sqlite_url, classifier, broker_env
):
    """The broker loses the queue before any worker runs (no worker here): `producer resume`,
    in this process, must find every file again from the name stored in its batch."""
    save_model(sqlite_url, classifier)
    three, seven = digit_files(sample_dir, "3", 1)[0], digit_files(sample_dir, "7", 1)[0]
    src = tmp_path / "images"
    expected = write_named(src / "3", three.read_bytes(), seven.read_bytes())
    shutil.copyfile(three, src / "3" / "plain.png")
    shutil.copyfile(seven, src / "3" / "plain7.png")

    r = submit(run_cli, src, sqlite_url, "--batch-size", "4")
    assert r.exit_code == 0, r.output
    assert "0/" in run_cli("status", "1", "--database-url", sqlite_url).stdout  # nothing scored
    import redis

    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    drop_queue(client, broker_env["DIGITSCORE_QUEUE"])

    r = run_cli("resume", "1", "--database-url", sqlite_url, env={"DIGITSCORE_BROKER_URL": None})
    assert r.exit_code == 0, r.output
    assert "re-sent 5 batches" in r.stdout
    rows = assert_run_complete(
        sqlite_url, {f"3/{n}" for n in expected} | {"3/plain.png", "3/plain7.png"}, set(), 0
    )
    for name, data in expected.items():  # the right file was re-read for each name
        twin = "3/plain.png" if data == three.read_bytes() else "3/plain7.png"
        assert rows[f"3/{name}"]["prob_sgd"] == rows[twin]["prob_sgd"], name
