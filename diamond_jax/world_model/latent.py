"""The data of a latent world model: the dataset's frames encoded once, at the run's first start, and EDM's
sigma_data measured on them.

Trade-off (README "Latent world models"): encoding every frame once costs one encoder pass per frame at the
run's first start, and 4 bytes per latent value in host memory and on disk (`<workdir>/latents.npz`, read back
on resume; Breakout's 7,067 frames at 128x128 with a 4x autoencoder: 7,067 x 32 x 32 x 4 x 4 B = 116 MB); each
update then reads latents and never runs the encoder. Encoding on the fly would hold nothing but run the encoder
on every frame of every batch, at every update: (n + 1) x batch frames per update instead of once per frame per
run. The latents are the posterior's means, so they do not depend on when they are encoded.

The autoencoder is copied into the run's workdir (`autoencoder/`) at its first start, and read from there on
resume and by the tools (load_run): the run cannot change under it when the autoencoder's own run goes on.
sigma_data in latent units is, unless the config fixes it (autoencoder.sigma_data > 0), the standard deviation
of all the training latents (every value of every frame, about their mean), written to `latent.json` and read
back from there.
"""

import json
import logging
import os
import time
from typing import Any, Dict, Tuple

import jax
import numpy as np
from tqdm import tqdm

from diamond_jax.training.autoencoder_export import AUTOENCODER_DIR, autoencoder_of_run, load_export
from diamond_jax.data.batch import obs_from_frames
from diamond_jax.data.recorded import RecordedDataset, Segments
from diamond_jax.models.autoencoder import Autoencoder, Variables
from diamond_jax.models.upsampler import resize_frames

LATENT_FILE = "latent.json"  # sigma_data and the latents' statistics
LATENTS_FILE = "latents.npz"  # the encoded dataset, one array per episode ("episode_<id>")


def encode_episodes(autoencoder: Autoencoder, variables: Variables, dataset: RecordedDataset,
                    resolution: Tuple[int, int], batch_size: int) -> Dict[int, np.ndarray]:
    """float32 latents [T, h, w, c] of every episode, keyed by episode id, with a progress bar."""
    encode = jax.jit(lambda v, f: autoencoder.encode(v, resize_frames(obs_from_frames(f), resolution)))
    ids = dataset.episode_ids("train") + dataset.episode_ids("test")
    bar = tqdm(total=sum(dataset.num_frames(s) for s in ("train", "test")), desc="Encoding frames", unit="frame",
               dynamic_ncols=True)
    latents = {}
    for e in sorted(ids):
        obs = dataset.episode(e).obs
        parts = []
        for i in range(0, len(obs), batch_size):
            chunk = np.asarray(obs[i:i + batch_size])
            # Padded to a whole batch so that one program encodes every chunk.
            padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            parts.append(np.asarray(encode(variables, padded))[:len(chunk)])
            bar.update(len(chunk))
        latents[e] = np.concatenate(parts)
    bar.close()
    return latents


class LatentDataset:
    """A recorded dataset whose frames are replaced by their latents; sampled like the dataset itself (the same
    windows for the same generator)."""

    def __init__(self, dataset: RecordedDataset, latents: Dict[int, np.ndarray]):
        self.dataset, self.latents = dataset, latents

    def sample(self, rng: np.random.Generator, batch_size: int, seq_length: int, split: str = "train") -> Segments:
        """Segments whose obs are float32 latents [b, L, h, w, c]."""
        obs, act, rew, end = [], [], [], []
        for e, s in self.dataset.sample_windows(rng, batch_size, seq_length, split):
            episode = self.dataset.episode(e)
            at = slice(s, s + seq_length)
            obs.append(self.latents[e][at])
            act.append(episode.act[at])
            rew.append(episode.rew[at] if episode.rew is not None else np.zeros(seq_length, np.float32))
            end.append(episode.end[at] if episode.end is not None else np.zeros(seq_length, bool))
        return Segments(np.stack(obs), np.stack(act), np.stack(rew), np.stack(end))

    def statistics(self) -> Dict[str, float]:
        """Mean and standard deviation of every value of the training latents, in float64."""
        values = [self.latents[e].astype(np.float64).ravel() for e in self.dataset.episode_ids("train")]
        flat = np.concatenate(values)
        return {"mean": float(flat.mean()), "std": float(flat.std()), "num_values": int(flat.size)}


def prepare(config, dataset: RecordedDataset, workdir: str, write: bool = True
            ) -> Tuple[Autoencoder, Variables, LatentDataset, float]:
    """The autoencoder, its variables, the encoded dataset and sigma_data (measured, or the config's) of a latent
    world-model run; latent.json records them at the first start and gives sigma_data back on resume."""
    autoencoder, variables = autoencoder_of_run(config.autoencoder.path, workdir)
    autoencoder.check_size(tuple(config.resolution))  # before any encoding
    started = time.monotonic()
    cache = os.path.join(workdir, LATENTS_FILE)
    if os.path.exists(cache):
        with np.load(cache) as npz:
            encoded = {int(k.split("_")[1]): npz[k] for k in npz.files}
    else:
        encoded = encode_episodes(autoencoder, variables, dataset, tuple(config.resolution),
                                  config.autoencoder.encode_batch)
        if write:
            with open(cache + ".tmp", "wb") as f:
                np.savez(f, **{f"episode_{e}": v for e, v in encoded.items()})
            os.replace(cache + ".tmp", cache)
    latents = LatentDataset(dataset, encoded)
    encode_s = time.monotonic() - started
    path = os.path.join(workdir, LATENT_FILE)
    if os.path.exists(path):
        with open(path) as f:
            sigma_data = json.load(f)["sigma_data"]
    else:
        stats = latents.statistics()
        sigma_data = float(config.autoencoder.sigma_data) or stats["std"]
        record: Dict[str, Any] = {
            "sigma_data": sigma_data, "sigma_data_measured": not config.autoencoder.sigma_data,
            "train_latents": stats, "latent_shape": list(autoencoder.latent_shape(tuple(config.resolution))),
            "scaling_factor": autoencoder.scaling_factor, "encode_s": round(encode_s, 1)}
        if write:
            with open(path + ".tmp", "w") as f:
                json.dump(record, f, indent=2)
            os.replace(path + ".tmp", path)
        logging.info("Latent space: latents %s, training latents' mean %.4f and std %.4f; sigma_data %.4f (%s); "
                     "%.1f s to encode the dataset", record["latent_shape"], stats["mean"], stats["std"],
                     sigma_data, "measured" if record["sigma_data_measured"] else "config.autoencoder.sigma_data",
                     encode_s)
    return autoencoder, variables, latents, sigma_data


def read_latent_run(workdir: str) -> Tuple[Autoencoder, Variables, float]:
    """A latent run's autoencoder, its variables and sigma_data, for the tools that load a trained run."""
    path = os.path.join(workdir, LATENT_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{path} is missing: the latent world-model run never started. Fix: start it with "
                         "python -m diamond_jax.world_model.")
    with open(path) as f:
        sigma_data = json.load(f)["sigma_data"]
    autoencoder, variables = load_export(os.path.join(workdir, AUTOENCODER_DIR))
    return autoencoder, variables, sigma_data

