"""The main entry point rejects bad input before any compute, naming the problem and the fix."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "diamond_jax.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/atari100k.py:game=Tetris", "--workdir=W"], "'Tetris' is not an Atari 100k game. Fix: use one of"),
    (["--config=configs/atari100k.py", "--config.env.size=-64", "--workdir=W"],
     "config.env.size=-64: must be a positive integer. Fix:"),
    (["--config=configs/atari100k.py", "--config.env.sise=64", "--workdir=W"],
     'unknown config field in --config.env.sise (did you mean "size"?). Fix:'),
    (["--config=configs/atari100k.py", "--config.world_model_env.sampler.sigma_min=9", "--workdir=W"],
     "sigma_min=9.0: must be < sigma_max"),
    (["--config=configs/atari100k.py"], "--workdir must have a value"),
    (["--config=configs/atari100k.py:debug", "--workdir=W", "--cpu_devices=0"], "--cpu_devices=0: 0 is not a positive"),
    (["--config=configs/atari100k.py:debug", "--workdir=/proc/diamond"], "is not writable"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, args, message):
    args = [a.replace("--workdir=W", f"--workdir={tmp_path / 'run'}") for a in args]
    result = run_main(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_help_describes_the_flags():
    result = run_main("--helpshort")
    assert "--workdir" in result.stdout + result.stderr and "--platform" in result.stdout + result.stderr
