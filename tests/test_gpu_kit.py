"""The GPU kit (bench/gpu_bundle.sh, bench/gpu_check.sh) dry-run on this machine's CPU, as on a
bare offline GPU host: a fresh Python with only its own torch and numpy, the bundle's wheels
installed with no index, and the bundle's Redis. Building the bundle needs the registries
(as CI has); the whole dry run takes minutes, so it is marked ``gpu_kit``
(``-m gpu_kit`` selects it, ``-m 'not gpu_kit'`` leaves it out)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without the test suite's settings (pytest-xdist's too): the kit sets
    its own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DIGITSCORE_", "PYTEST_"))
           and k not in ("CI", "PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


def _link_distributions(site: Path, *names: str) -> None:
    """Link into ``site`` the installed distributions ``names`` of this environment, and
    every distribution they require (recursively), and nothing else."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    todo, seen = list(names), set()
    while todo:
        dist = distribution(todo.pop())
        if dist.name.lower() in seen:
            continue
        seen.add(dist.name.lower())
        todo += [req.name for req in map(Requirement, dist.requires or [])
                 if req.marker is None or req.marker.evaluate({"extra": ""})]
        for top in {f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if not (site / top).exists():
                (site / top).symlink_to(dist.locate_file(top))


@pytest.fixture(scope="session")
def host_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh Python with torch and numpy and nothing else, as a GPU host has its own: a
    virtual environment without pip whose site-packages links to this environment's torch
    and numpy and what they require (installing torch's wheel again would take a minute)."""
    venv = tmp_path_factory.mktemp("gpu-host") / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python3"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                           "'purelib'))"], capture_output=True, text=True, check=True)
    _link_distributions(Path(site.stdout.strip()), "torch", "numpy")
    return python


@pytest.fixture(scope="session")
def bundle(host_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bench/gpu_bundle.sh's folder for the host Python's version (once a session), made by
    this environment's Python, as on a machine that reaches the registries."""
    out = tmp_path_factory.mktemp("gpu-bundle")
    version = subprocess.run([str(host_python), "-c", "import sys; print('%d.%d' % "
                              "sys.version_info[:2])"], capture_output=True, text=True,
                             check=True).stdout.strip()
    made = subprocess.run(["bash", str(ROOT / "bench/gpu_bundle.sh"), str(out), "--python",
                           version], capture_output=True, text=True,
                          env=_clean_env(PYTHON=sys.executable))
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    assert "MiB" in made.stdout.splitlines()[-1]
    return out


@pytest.mark.gpu_kit
@pytest.mark.timeout(1800)
def test_the_gpu_kit_dry_runs_offline_on_the_cpu(host_python, bundle, tmp_path):
    assert (bundle / "redis" / "redis-server").exists()
    assert not list((bundle / "wheels").glob("torch-*")) + list((bundle / "wheels").glob("numpy-*"))
    run = subprocess.run(
        ["bash", str(ROOT / "bench/gpu_check.sh"), "--bundle", str(bundle), "--dry-run-cpu",
         "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, env=_clean_env(PYTHON=str(host_python)), timeout=1500,
    )
    out = run.stdout
    assert run.returncode == 0, out[-5000:] + run.stderr[-2000:]
    assert out.rstrip().splitlines()[-1].startswith("verdict: dry run passed")
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows.pop("step") == "result"
    assert rows == {
        "install": "ok", "environment": "ok", "redis": "ok", "gpu-tests": "ok",
        "cuda-state-tests": "ok", "cpu-gpu-compare": "skipped: dry run", "split-cpu": "ok",
        "worker-cuda0": "skipped: dry run", "worker-cpu": "ok",
    }
    assert "images/s, one worker" in out and "us an image" in out
    # the dry run's GPU tests step ran the tests about GPUs and CUDA that need none
    tests_line = (tmp_path / "logs" / "gpu-tests.log").read_text().strip().splitlines()[-1]
    assert " passed" in tests_line and " deselected" in tests_line, tests_line
    # torch came from the host, not from any index: the check's environment has none of its own
    venv_site = list((tmp_path / "logs" / "venv" / "lib").glob("python3*/site-packages"))
    assert venv_site and not (venv_site[0] / "torch").exists()
    assert (venv_site[0] / "host-torch.pth").exists()


def test_a_bundle_for_another_python_is_refused_naming_the_fix(tmp_path):
    fake = tmp_path / "bundle"
    (fake / "wheels").mkdir(parents=True)
    (fake / "BUNDLE").write_text("python=2.7\n")
    run = subprocess.run(
        ["bash", str(ROOT / "bench/gpu_check.sh"), "--bundle", str(fake), "--dry-run-cpu",
         "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, env=_clean_env(PYTHON=sys.executable), timeout=120,
    )
    assert run.returncode == 1
    assert "the bundle's wheels are for Python 2.7" in run.stdout
    assert "bench/gpu_bundle.sh DIR --python 3." in run.stdout
    assert run.stdout.rstrip().splitlines()[-1].startswith("verdict: FAILED at the install")
