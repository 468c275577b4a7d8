"""An autoencoder on disk, as the latent world model reads it: a folder with `autoencoder.json` (the architecture
and the latent scaling of models/autoencoder.py's `Autoencoder`) and `params.npz` (one float32 array per
parameter, named by its Flax path joined by "/"). The autoencoder trainer writes one into its workdir
(`<workdir>/export`) at every checkpoint; `python -m diamond_jax.convert_vae` writes one from a diffusers
checkpoint. A latent run (world model or agent) copies its autoencoder into its own workdir
(`autoencoder_of_run`)."""

import json
import logging
import os
import shutil
from typing import Any, Dict, Tuple

import jax
import numpy as np
from flax import traverse_util

from diamond_jax.models.autoencoder import Autoencoder, Variables

ARCH_FILE = "autoencoder.json"
PARAMS_FILE = "params.npz"
EXPORT_DIR = "export"  # inside an autoencoder run's workdir
AUTOENCODER_DIR = "autoencoder"  # a latent run's copy of its autoencoder, inside the run's workdir


class ExportError(ValueError):
    """An autoencoder folder that cannot be read; the message names the problem and the fix."""


def flat_params(params: Any) -> Dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}


def save_export(path: str, autoencoder: Autoencoder, params: Any) -> str:
    """Writes the folder atomically enough for readers: each file through a temporary name."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, PARAMS_FILE + ".tmp"), "wb") as f:
        np.savez(f, **flat_params(params))
    os.replace(os.path.join(path, PARAMS_FILE + ".tmp"), os.path.join(path, PARAMS_FILE))
    with open(os.path.join(path, ARCH_FILE + ".tmp"), "w") as f:
        json.dump(autoencoder.to_json(), f, indent=2)
    os.replace(os.path.join(path, ARCH_FILE + ".tmp"), os.path.join(path, ARCH_FILE))
    return path


def resolve(path: str) -> str:
    """The export folder of `path`: itself, or the `export` folder of an autoencoder run's workdir."""
    if os.path.isfile(os.path.join(path, ARCH_FILE)):
        return path
    if os.path.isfile(os.path.join(path, EXPORT_DIR, ARCH_FILE)):
        return os.path.join(path, EXPORT_DIR)
    raise ExportError(f"{path} holds no autoencoder ({ARCH_FILE} and {PARAMS_FILE}). Fix: pass the --workdir of "
                      "`python -m diamond_jax.autoencoder` (after its first checkpoint) or the --out of "
                      "`python -m diamond_jax.convert_vae`.")


def load_export(path: str) -> Tuple[Autoencoder, Variables]:
    """The autoencoder of a folder (or of an autoencoder run's workdir) and its variables, checked against the
    shapes its architecture needs: every missing, unexpected or misshapen array is named."""
    path = resolve(path)
    with open(os.path.join(path, ARCH_FILE)) as f:
        try:
            autoencoder = Autoencoder.from_json(json.load(f))
        except (ValueError, TypeError) as e:
            raise ExportError(f"{os.path.join(path, ARCH_FILE)}: {e}. Fix: write it again.") from e
    with np.load(os.path.join(path, PARAMS_FILE)) as npz:
        found = {k: npz[k] for k in npz.files}
    expected = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(
        jax.eval_shape(lambda: autoencoder.init(jax.random.key(0), (8 * autoencoder.downsampling,) * 2))
        ["params"]).items()}
    problems = [f"missing {k} {s}" for k, s in expected.items() if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [f"{k}: shape {found[k].shape}, expected {s}" for k, s in expected.items()
                 if k in found and found[k].shape != tuple(s)]
    if problems:
        raise ExportError(f"{path}/{PARAMS_FILE} does not fit {ARCH_FILE}: " + "; ".join(problems)
                          + ". Fix: export it again.")
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in found.items()})
    return autoencoder, {"params": jax.tree.map(jax.numpy.asarray, params)}


def autoencoder_of_run(path: str, workdir: str) -> Tuple[Autoencoder, Variables]:
    """A latent run's copy of its autoencoder, made from `path` (config.autoencoder.path) at the first start and
    read from the workdir afterwards: the run cannot change under it when the autoencoder's own run goes on."""
    copy = os.path.join(workdir, AUTOENCODER_DIR)
    if not os.path.isdir(copy):
        source = resolve(path)
        shutil.copytree(source, copy + ".tmp", dirs_exist_ok=True)
        os.replace(copy + ".tmp", copy)
        logging.info("Copied the autoencoder %s into %s", source, copy)
    return load_export(copy)
