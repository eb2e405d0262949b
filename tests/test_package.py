"""A real package (issue 28): a wheel built from the repository installs in a fresh virtual
environment and runs the main job and its help there, outside the repository."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import user_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow     # builds a wheel, makes a venv, runs the default job in it
def test_a_wheel_runs_the_main_job_outside_the_repository(tmp_path):
    env = {k: v for k, v in user_env().items() if k != "PYTHONPATH"}     # nothing of the repository
    run = lambda *command, **kw: subprocess.run(command, capture_output=True, text=True, timeout=600,
                                               env=env, **kw)
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", str(ROOT),      # an isolated build
                "-w", str(tmp_path / "dist"))
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("tfmbgd-*.whl")
    # the venv sees this machine's TensorFlow (no download), not the repository
    assert run(sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")).returncode == 0
    python = tmp_path / "venv" / "bin" / "python"
    installed = run(str(python), "-m", "pip", "install", "--no-deps", str(wheel))
    assert installed.returncode == 0, installed.stderr[-3000:]
    where = run(str(python), "-c", "import tfmbgd; print(tfmbgd.__file__)", cwd=tmp_path)
    assert where.stdout.startswith(str(tmp_path / "venv")), where.stdout + where.stderr
    shown = run(str(python), "-m", "tfmbgd", "--help", cwd=tmp_path)
    assert shown.returncode == 0 and "python -m tfmbgd --batch_size=1" in shown.stdout
    job = run(str(python), "-m", "tfmbgd", "--epochs=1", f"--logdir={tmp_path / 'logs'}", cwd=tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "Run written to" in job.stdout
    (run_dir,) = (tmp_path / "logs").iterdir()
    assert (run_dir / "final.weights.h5").exists()
    script = run(str(tmp_path / "venv" / "bin" / "tfmbgd"), "--version", cwd=tmp_path)
    assert script.stdout.startswith("tfmbgd ")
    # the wheel ships the library and its licence, not the tests
    listing = run(sys.executable, "-m", "zipfile", "-l", str(wheel)).stdout
    assert "LICENSE" in listing and "tests/" not in listing and "zoo" not in listing
