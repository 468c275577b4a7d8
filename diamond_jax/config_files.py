"""Where the config files are: `configs/` at the root of a source checkout, which `pip install .` ships
inside the package as `diamond_jax.configs` (every file of the directory; see setup.py)."""

import importlib.util
import os


def config_file(name: str) -> str:
    """The path of configs/<name>.py, from an installed package or from the source checkout."""
    installed = importlib.util.find_spec("diamond_jax.configs")
    if installed is not None:
        directory = list(installed.submodule_search_locations)[0]
    else:
        directory = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    return os.path.join(directory, f"{name}.py")
