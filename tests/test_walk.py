"""Walking the submitted directory: loops, special files, unreadable files and directories,
empty directories and very large ones, through the real producer CLI where a run results."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import defaults
from core.files import DirectoryWalk, batches
from tests.support import (
    assert_run_complete,
    cli_command,
    copy_digits,
    digit_files,
    query,
    submit,
)


@pytest.mark.timeout(60)
def test_symlink_loops_end_and_no_file_gets_two_rows(run_cli, tmp_path, sample_dir, model_db):
    src = tmp_path / "images"
    good = set(copy_digits(sample_dir, src, per_class=4))
    (src / "3" / "up").symlink_to("..")  # src/3/up/3/up/3/... for ever, if followed
    (src / "loop.png").symlink_to(src)  # a directory link named like an image
    (src / "3" / "self.png").symlink_to("self.png")  # a link to itself
    (src / "7" / "dangling.png").symlink_to("gone.png")
    first = sorted(p for p in good if p.startswith("7/"))[0]
    (src / "7" / "alias.png").symlink_to(src / first)  # a file link: a file like any other

    r = submit(run_cli, src, model_db)
    assert r.exit_code == 0, r.output
    failed = {"3/self.png", "7/dangling.png"}
    rows = assert_run_complete(model_db, good | {"7/alias.png"}, failed, n_skipped=2)
    assert "Too many levels of symbolic links" in rows["3/self.png"]["error"]
    assert "No such file" in rows["7/dangling.png"]["error"]
    assert rows["7/alias.png"]["prob_sgd"] == rows[first]["prob_sgd"]


@pytest.mark.timeout(60)
def test_pipes_sockets_and_devices_named_like_images_get_error_rows_without_hanging(
    run_cli, tmp_path, sample_dir, model_db
):
    """A named pipe with no writer blocks a plain open() for ever; /dev/zero never ends;
    /proc/self/mem is a 'regular file' whose read fails with an I/O error."""
    src = tmp_path / "images"
    good = set(copy_digits(sample_dir, src, per_class=3))
    os.mkfifo(src / "pipe.png")
    (src / "zero.png").symlink_to("/dev/zero")
    (src / "null.jpg").symlink_to("/dev/null")
    (src / "memory.png").symlink_to("/proc/self/mem")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(src / "socket.png"))
        r = submit(run_cli, src, model_db)
    finally:
        sock.close()
    assert r.exit_code == 0, r.output
    special = {"pipe.png", "zero.png", "null.jpg", "memory.png", "socket.png"}
    rows = assert_run_complete(model_db, good, special, n_skipped=0)
    error = {name: rows[name]["error"] for name in special}
    assert "named pipe" in error["pipe.png"]
    assert "character device" in error["zero.png"] and "character device" in error["null.jpg"]
    assert "Input/output error" in error["memory.png"]
    assert "could not be read" in error["socket.png"]


def _unprivileged(command: list[str]) -> list[str]:
    """Root reads mode-000 files through its CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    capabilities: run as root without them (or as the ordinary user we already are)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, and setpriv is missing to drop read capabilities")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[list[Path]]:
    """Paths to chmod 000 for a test, given back their modes afterwards."""
    paths: list[Path] = []
    yield paths
    for p in paths:
        p.chmod(0o755)


def test_unreadable_file_and_directory_get_error_rows(tmp_path, sample_dir, model_db, locked):
    src = tmp_path / "images"
    good = set(copy_digits(sample_dir, src, per_class=4))
    secret = src / "3" / "secret.png"
    shutil.copyfile(digit_files(sample_dir, "3", 5)[-1], secret)
    (src / "private").mkdir()
    shutil.copyfile(digit_files(sample_dir, "7", 5)[-1], src / "private" / "hidden.png")
    for p in (secret, src / "private"):
        p.chmod(0)
        locked.append(p)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITSCORE_")}
    proc = subprocess.run(
        _unprivileged(cli_command("submit", str(src), "--database-url", model_db)),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # the hidden image cannot be known: its directory stands for it
    rows = assert_run_complete(model_db, good, {"3/secret.png", "private/"}, n_skipped=0)
    assert rows["3/secret.png"]["error"] == "file could not be read: Permission denied"
    assert rows["private/"]["error"] == "directory could not be listed: Permission denied"

    (src / "private").chmod(0o755)
    src.chmod(0)
    locked.append(src)
    proc = subprocess.run(
        _unprivileged(cli_command("submit", str(src), "--database-url", model_db)),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr  # Click's own check, or check_directory's
    assert str(src) in proc.stderr
    assert "not readable" in proc.stderr or "cannot be listed: Permission denied" in proc.stderr
    assert query(model_db, "SELECT COUNT(*) AS n FROM runs")[0]["n"] == 1


def test_directories_without_images_exit_2_and_create_no_run(run_cli, tmp_path, model_db):
    empty = tmp_path / "empty"
    empty.mkdir()
    only_others = tmp_path / "others"
    (only_others / "a" / "b").mkdir(parents=True)
    (only_others / "notes.txt").write_text("no images here")
    (only_others / "a" / "data.csv").write_text("1,2,3")
    (only_others / "link.png").symlink_to(only_others / "a")  # a directory, though named .png
    for directory in (empty, only_others):
        r = submit(run_cli, directory, model_db)
        assert r.exit_code == 2, r.output
        assert "no images" in r.output and directory.name in r.output
    assert query(model_db, "SELECT COUNT(*) AS n FROM runs")[0]["n"] == 0


# ---------------------------------------------------------------- memory stays flat


def _many_files(root: Path, n: int, original: Path) -> Path:
    """n hard links to copies of one real digit PNG (a new copy every 50,000 links, under
    ext4's limit of 65,000 per inode): as many directory entries and file reads as n separate
    files, made in seconds."""
    for label in ("3", "7"):
        (root / label).mkdir(parents=True)
    for i in range(n):
        if i % 50_000 == 0:
            source = root / f"source-{i}.bin"  # not an image name: skipped by the walk
            shutil.copyfile(original, source)
        os.link(source, root / ("3", "7")[i % 2] / f"{i:06d}.png")
    return root


def _peak_of_walking_and_batching(root: Path) -> tuple[int, int, int]:
    """(images, bytes read, peak traced Python memory) of the producer's walk + batching."""
    n_images = n_bytes = 0
    tracemalloc.start()
    try:
        for batch in batches(DirectoryWalk(root)):
            n_images += len(batch.paths)
            n_bytes += batch.n_bytes
            assert None not in batch.blobs
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return n_images, n_bytes, peak


@pytest.mark.slow
def test_walking_200k_files_keeps_memory_flat(tmp_path, sample_dir):
    original = digit_files(sample_dir, "3", 1)[0]
    size = original.stat().st_size
    start = time.perf_counter()
    small = _many_files(tmp_path / "10k", 10_000, original)
    large = _many_files(tmp_path / "200k", 200_000, original)
    made = time.perf_counter() - start
    peaks = {}
    for n, root in ((10_000, small), (200_000, large)):
        start = time.perf_counter()
        n_images, n_bytes, peak = _peak_of_walking_and_batching(root)
        assert (n_images, n_bytes) == (n, n * size)  # every file was read
        peaks[n] = peak
        print(f"{n} files: peak {peak / 1024:.0f} KiB, {time.perf_counter() - start:.1f} s")
    print(f"made 210,000 links in {made:.1f} s")
    assert peaks[200_000] <= 1.3 * peaks[10_000], peaks
    # A batch of the default 4,096 such files (~300 bytes each) peaks at ~3.4 MB with its
    # paths and lists; a read that reserved MAX_FILE_BYTES (4 MiB) for a file, whatever its
    # size and even for a moment, would show here.
    assert peaks[200_000] < defaults.BATCH_SIZE * 1024, peaks


def test_read_file_returns_whole_files_and_refuses_those_over_the_limit(tmp_path):
    """The byte-exact read: a file whose size fstat gives, an empty file, a file that
    reports size 0 but has content (as /proc files do), and the size limit."""
    from core.files import read_file

    data = os.urandom(5000)
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "empty.png").write_bytes(b"")
    assert read_file(str(tmp_path / "a.png")) == (data, None)
    assert read_file(str(tmp_path / "empty.png")) == (b"", None)
    assert read_file(str(tmp_path / "a.png"), max_bytes=5000) == (data, None)
    blob, error = read_file(str(tmp_path / "a.png"), max_bytes=4999)
    assert blob is None and error == "file is larger than 4999 bytes"
    status = Path("/proc/self/status")  # st_size 0, content of a few hundred bytes
    assert status.stat().st_size == 0
    blob, error = read_file(str(status))
    assert error is None and blob is not None and blob.startswith(b"Name:")
    blob, error = read_file(str(status), max_bytes=10)
    assert blob is None and error == "file is larger than 10 bytes"


def test_image_names_are_told_as_splitext_tells_suffixes():
    from core.files import is_image_name

    names = ["a.png", "x.PNG", "a.b.jpg", ".hidden.png", "a..png", "...a.png", "caf\xe9.jpeg",
             ".png", "..png", "png", "a.", "a.png.bak", "digit.png.bak", ".a.b", "", "."]
    for name in names:
        expected = os.path.splitext(name)[1].lower() in defaults.IMAGE_SUFFIXES
        assert is_image_name(name) == expected, name
    assert sum(map(is_image_name, names)) == 7
