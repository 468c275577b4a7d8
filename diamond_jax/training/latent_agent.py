"""A latent agent's run (`denoiser.space = "latent"`): the denoiser draws the latents of a pretrained, frozen
autoencoder; the reward/end model and the actor-critic see frames, decoded from the drawn latents in imagination
and real in the replay and the environments.

The replay keeps frames, and the denoiser phase encodes the segments it samples on the fly (training/phases.py):
(num_steps_conditioning + 1 + num_autoregressive_steps) x batch_size frames per update, 192 with the paper's
numbers. A latent copy of the replay, encoded once per collected frame, would hold a second dataset on the device
that grows every epoch, to save an encoder pass that costs a fraction of the denoiser's update (README
"Latent world models"). The latents are the posterior's means, so the same frame always encodes alike.

EDM's sigma_data in latent units is measured once, after the initial collection: the standard deviation of every
value of every encoded frame of the replay (unless config.autoencoder.sigma_data fixes it). It is written to
<workdir>/latent.json and read back on resume; the autoencoder is copied into <workdir>/autoencoder at the first
start (training/autoencoder_export.py).
"""

import json
import os
import time
from typing import Any, Dict, Optional

import jax
import numpy as np
from tqdm import tqdm

from diamond_jax.data.batch import obs_from_frames
from diamond_jax.data.replay import ReplayDataset
from diamond_jax.models.autoencoder import Autoencoder, Variables

LATENT_FILE = "latent.json"  # sigma_data and the statistics it was measured from


def is_latent(config) -> bool:
    return config.denoiser.get("space", "pixel") == "latent"


def known_sigma_data(config, workdir: str) -> Optional[float]:
    """sigma_data fixed by the config, or measured by an earlier start of this run; None before the measure."""
    if config.autoencoder.sigma_data:
        return float(config.autoencoder.sigma_data)
    path = os.path.join(workdir, LATENT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return float(json.load(f)["sigma_data"])


def latent_statistics(autoencoder: Autoencoder, variables: Variables, replay: ReplayDataset,
                      batch_size: int) -> Dict[str, Any]:
    """Mean and standard deviation (float64 sums) of every value of the latents of every frame of the replay,
    encoded batch_size frames per call, with a progress bar."""
    encode = jax.jit(lambda v, f: autoencoder.encode(v, obs_from_frames(f)))
    total, total_sq, count, frames = 0.0, 0.0, 0, 0
    episodes = [replay.episode(e)["obs"] for e in range(replay.num_episodes)]
    with tqdm(total=sum(len(obs) for obs in episodes), desc="Encoding the replay (sigma_data)", unit="frame",
              dynamic_ncols=True, leave=False) as bar:
        for obs in episodes:
            for i in range(0, len(obs), batch_size):
                chunk = obs[i:i + batch_size]
                # Padded to a whole batch so that one program encodes every chunk.
                padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
                z = np.asarray(encode(variables, padded), np.float64)[:len(chunk)]
                total, total_sq, count = total + z.sum(), total_sq + np.square(z).sum(), count + z.size
                frames += len(chunk)
                bar.update(len(chunk))
    mean = total / count
    return {"mean": mean, "std": float(np.sqrt(max(total_sq / count - mean ** 2, 0.0))), "num_values": count,
            "num_frames": frames}


def measure_sigma_data(config, workdir: str, autoencoder: Autoencoder, variables: Variables,
                       replay: ReplayDataset, write: bool = True) -> float:
    """sigma_data of a latent agent's run, measured on the replay (or the config's), recorded in latent.json."""
    started = time.monotonic()
    stats = latent_statistics(autoencoder, variables, replay, config.autoencoder.encode_batch)
    sigma_data = float(config.autoencoder.sigma_data) or stats["std"]
    record = {"sigma_data": sigma_data, "sigma_data_measured": not config.autoencoder.sigma_data,
              "replay_latents": stats,
              "latent_shape": list(autoencoder.latent_shape((config.env.size, config.env.size))),
              "scaling_factor": autoencoder.scaling_factor, "encode_s": round(time.monotonic() - started, 1)}
    if write:
        path = os.path.join(workdir, LATENT_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=2)
        os.replace(path + ".tmp", path)
    return sigma_data
