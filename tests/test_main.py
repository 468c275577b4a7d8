"""The main entry point rejects bad input before any compute, naming the problem and the fix."""

import importlib.metadata
import os
import subprocess
import sys

import pytest
from tqdm import tqdm

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


@pytest.mark.parametrize("flag", ["--help", "--helpshort", "--helpfull"])
def test_help_describes_the_flags_and_exits_0(flag):
    result = run_main(flag)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--workdir" in result.stdout and "--platform" in result.stdout


def test_a_stray_argument_is_named_first(tmp_path):
    result = run_main("--config=configs/atari100k.py:debug", f"--workdir={tmp_path / 'run'}", "debug")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == ("error: unexpected argument(s) debug. Flags take the form --name=value; "
                                             "pass --help to see them.")
    assert not (tmp_path / "run").exists()


def _installed(distribution):
    try:
        return bool(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(_installed("jax-cuda12-plugin") or _installed("jax-cuda13-plugin"), reason="JAX has CUDA here")
def test_a_platform_jax_was_not_installed_for_says_what_to_install(tmp_path):
    result = run_main("--config=configs/atari100k.py:debug", f"--workdir={tmp_path / 'run'}", "--platform=cuda")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: --platform=cuda: JAX cannot use it" in result.stderr
    assert 'Fix: install JAX\'s cuda build, pip install -e ".[cuda12]"' in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_log_lines_go_above_an_open_progress_bar(capsys):
    from diamond_jax import cli

    bar = tqdm(total=8, desc="Epoch 1/2 denoiser", file=sys.stderr, dynamic_ncols=False, ncols=80)
    bar.update(4)
    cli.AboveBars().write("W1201 loop.py:1] Stop requested\n")
    bar.close()
    err = capsys.readouterr().err
    before = err[:err.index("W1201")]
    # The bar's line is cleared first (back to its start) rather than the log line glued onto its end.
    assert before.endswith("\r") and "Epoch 1/2 denoiser" in before, repr(err)
    assert "Epoch 1/2 denoiser" in err[err.index("Stop requested"):]  # and the bar is drawn again below it
