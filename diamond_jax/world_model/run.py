"""A world-model run on disk: its config, what it trains on, and its checkpoints' state, read back for the
tools that use a trained world model (evaluation, dream, play)."""

import json
import os
from typing import Any, Dict, NamedTuple, Optional

import jax
from ml_collections import config_dict

from diamond_jax.training import parallel, steps
from diamond_jax.training.checkpoint import RunCheckpointer
from diamond_jax.world_model.model import Variables, WorldModel

CONFIG_FILE = "config.json"
DATASET_FILE = "dataset.json"  # what the run trains on, checked when it resumes
CHECKPOINTS = "checkpoints"
KEY_INIT = 0  # the stream of the models' initialisation (train.py folds the others)


def model_names(config: config_dict.ConfigDict):
    return ("denoiser", "upsampler") if config.upsampler.enabled else ("denoiser",)


def fresh_state(model: WorldModel, optimizers: Dict[str, Any], seed: int) -> Dict[str, steps.TrainState]:
    variables = model.init(jax.random.fold_in(jax.random.key(seed), KEY_INIT))
    return {n: steps.TrainState.create(variables[n], optimizers[n]) for n in optimizers}


class LoadedRun(NamedTuple):
    config: config_dict.ConfigDict
    model: WorldModel
    variables: Variables  # {"denoiser": {"params", "buffers"}, "upsampler": ..., a latent run's "autoencoder"}
    dataset: Dict[str, Any]  # the record of dataset.json: path, frame_shape, action, episode counts
    step: int  # updates done when the checkpoint was taken


def load_run(workdir: str, guidance_scale: Optional[float] = None, unconditional: bool = False) -> LoadedRun:
    """The newest checkpoint of a world-model run; ValueError naming what is missing. guidance_scale and
    unconditional: how its model samples (WorldModel.with_sampling; None: as the run's config says)."""
    paths = {name: os.path.join(workdir, name) for name in (CONFIG_FILE, DATASET_FILE, CHECKPOINTS)}
    for name, path in paths.items():
        if not os.path.exists(path):
            raise ValueError(f"--workdir={workdir} holds no world-model run: {path} is missing. Fix: pass the "
                             "--workdir of `python -m diamond_jax.world_model`, after its first checkpoint.")
    with open(paths[CONFIG_FILE]) as f:
        config = config_dict.ConfigDict(json.load(f))
    if "upsampler" not in config or "resolution" not in config:
        raise ValueError(f"--workdir={workdir} holds a reinforcement-learning run, not a world model of recorded "
                         "play. Fix: use the tools of RL runs (python -m diamond_jax.dream --workdir=...), or "
                         "pass the --workdir of `python -m diamond_jax.world_model`.")
    with open(paths[DATASET_FILE]) as f:
        dataset = json.load(f)
    autoencoder = autoencoder_variables = sigma_data = None
    if config.denoiser.get("space", "pixel") == "latent":
        from diamond_jax.world_model.latent import read_latent_run

        autoencoder, autoencoder_variables, sigma_data = read_latent_run(workdir)
    model = WorldModel.from_config(config, dataset["action"]["size"], tuple(dataset["frame_shape"]), autoencoder,
                                   sigma_data)
    model = model.with_sampling(guidance_scale, unconditional)
    optimizers = {n: steps.optimizer_from_config(config[n]) for n in model_names(config)}
    # Onto this process's devices, whichever devices the run saved from (orbax needs the target's shardings then).
    replicated = parallel.replicated(parallel.make_mesh())
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                            jax.eval_shape(lambda: fresh_state(model, optimizers, config.seed)))
    checkpointer = RunCheckpointer(paths[CHECKPOINTS], keep=config.checkpoint.keep)
    try:
        restored = checkpointer.restore_latest(abstract)
    finally:
        checkpointer.close()
    if restored is None:
        raise ValueError(f"{paths[CHECKPOINTS]} holds no checkpoint yet. Fix: wait for the run's first checkpoint "
                         f"(every {config.checkpoint.every_steps} updates or {config.checkpoint.every_minutes} "
                         "minutes).")
    _, state, meta = restored
    variables = {n: s.variables() for n, s in state.items()}
    if autoencoder_variables is not None:
        variables["autoencoder"] = autoencoder_variables
    return LoadedRun(config, model, variables, dataset, meta["step"])
