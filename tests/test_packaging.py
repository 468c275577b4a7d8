"""The installed package (`pip install .`, not editable) without the source tree: its configs, found through
the package, and an entry point that needs the default config."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = '''
import importlib.util, os, sys
import diamond_jax
from diamond_jax import config as config_lib
from diamond_jax.config_files import config_file
target = sys.argv[1]
assert diamond_jax.__file__.startswith(target), diamond_jax.__file__
path = config_file("atari100k")
assert path.startswith(target) and os.path.isfile(path), path
spec = importlib.util.spec_from_file_location("atari100k", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config("game=Pong,debug")
config_lib.validate(config)
print(config.game, sorted(os.path.basename(p) for p in os.listdir(os.path.dirname(path)) if p.endswith(".py")))
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package installed from a copy of the sources (so that the build leaves nothing in the checkout)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "tests", "docs", "runs", "build", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache"))
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", str(source), "--no-deps", "--no-build-isolation",
                    "--no-index", "--quiet", "--target", str(target)], check=True, capture_output=True, timeout=300)
    return target, tmp


def run_installed(target, cwd, args):
    """Python with the installed copy first on the path and the checkout nowhere on it."""
    env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_every_config_file_is_installed_and_loads_from_the_package(installed):
    target, tmp = installed
    proc = run_installed(target, tmp, ["-c", CHECK, str(target)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    shipped = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.py")))
    assert proc.stdout.strip() == f"Pong {shipped}"


def test_convert_finds_its_default_config_when_installed(installed):
    target, tmp = installed
    proc = run_installed(target, tmp, ["-m", "diamond_jax.convert", str(tmp / "missing.pt"), f"--workdir={tmp}/w"])
    # The checkpoint is missing, so convert stops: with its own message, after loading the default config.
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{tmp / 'missing.pt'} does not exist" in proc.stderr
