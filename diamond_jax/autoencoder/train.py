"""Trains the autoencoder of latent world models on the frames of a recorded dataset.

Each update draws its frames from the training episodes with a generator seeded by (seed, update), and the
posterior's noise from a key folded the same way: a run stopped and resumed on the same devices computes what it
would have computed without the stop. Every `training.test_every` updates: the loss, PSNR and SSIM of the
reconstructions (the posterior's mean, decoded) of fixed test-episode frames, and an image of them, go to
TensorBoard. At every checkpoint the autoencoder is exported to <workdir>/export
(training/autoencoder_export.py), with its scaling factor measured when the config leaves it at 0.
"""

import json
import logging
import os
import signal
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict
from tqdm import tqdm

from diamond_jax.training.autoencoder_export import EXPORT_DIR, save_export
from diamond_jax.data.batch import obs_from_frames
from diamond_jax.data.recorded import RecordedDataset
from diamond_jax.models.autoencoder import Autoencoder, kl_divergence
from diamond_jax.models.upsampler import resize_frames
from diamond_jax.training import parallel, steps
from diamond_jax.training.checkpoint import RunCheckpointer
from diamond_jax.training.logger import RunLogger
from diamond_jax.training.loop import NonFiniteLoss, Preempted
from diamond_jax.training.workdir import open_workdir
from diamond_jax.world_model import metrics
from diamond_jax.world_model.evaluate import to_uint8

CHECKPOINTS = "checkpoints"
RESULTS_FILE = "results.json"
# Streams of random numbers, each the seed's key with its id folded in.
KEY_INIT, KEY_TRAIN, KEY_TEST, KEY_SCALING = 0, 1, 2, 3
IMAGE_ROWS = 4  # test frames in the reconstruction image


def autoencoder_from_config(config: config_dict.ConfigDict, scaling_factor: float = 1.0) -> Autoencoder:
    m = config.model
    return Autoencoder(tuple(m.block_out_channels), m.layers_per_block, m.latent_channels, m.norm_num_groups,
                       m.scaling_factor or scaling_factor, 0.0, m.mid_block_add_attention)


def frames_in(frames: jax.Array, resolution) -> jax.Array:
    """uint8 frames at the dataset's size -> [-1, 1] at the autoencoder's resolution (as the world model's)."""
    return resize_frames(obs_from_frames(frames), tuple(resolution))


def make_loss(autoencoder: Autoencoder, config: config_dict.ConfigDict,
              lpips: Optional[metrics.LPIPS] = None) -> Callable:
    """loss(params, buffers, frames uint8 [b, H, W, 3], key) -> (loss, metrics): the pixel loss of a reconstruction
    from a posterior sample, + kl_weight * KL (per pixel value, SD's weighting) + lpips_weight * LPIPS."""
    c = config.loss

    def loss_fn(params, buffers, frames, key):
        x = frames_in(frames, config.resolution)
        variables = {"params": params}
        mean, logvar = autoencoder.moments(variables, x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        recon = autoencoder.decode_unscaled(variables, z)
        error = jnp.abs(recon - x) if c.pixel == "l1" else (recon - x) ** 2
        pixel = jnp.mean(error)
        kl = jnp.mean(kl_divergence(mean, logvar)) / np.prod(x.shape[1:])
        total = pixel + c.kl_weight * kl
        out = {"loss_pixel": pixel, "kl_per_pixel_value": kl}
        if c.lpips_weight > 0:
            # On [0, 255] floats (LPIPS's input), unrounded so that gradients flow.
            distance = jnp.mean(lpips.network.apply({"params": lpips.params}, (x + 1) * 127.5,
                                                    (recon + 1) * 127.5))
            total = total + c.lpips_weight * distance
            out["loss_lpips"] = distance
        out["loss"] = total
        return total, out

    return loss_fn


class AutoencoderTrainer:
    def __init__(self, config: config_dict.ConfigDict, dataset_path: str, workdir: str,
                 lpips_weights: Optional[str] = None, mesh=None):
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.dataset = RecordedDataset.open(dataset_path)
        if not self.dataset.episode_ids("test"):
            raise ValueError(f"{self.dataset.path} has no test episodes. Fix: import it again with "
                             "--test_fraction > 0 and at least 2 episodes.")
        self.lpips = None
        if config.loss.lpips_weight > 0:
            if not lpips_weights:
                raise ValueError(f"config.loss.lpips_weight={config.loss.lpips_weight} needs LPIPS weights. Fix: "
                                 "pass --lpips_weights=<lpips .npz> (README: Metrics), or set "
                                 "--config.loss.lpips_weight=0.")
            if min(config.resolution) < metrics.LPIPS_MIN_SIZE:
                raise ValueError(f"LPIPS needs frames of at least {metrics.LPIPS_MIN_SIZE} pixels; config.resolution "
                                 f"is {tuple(config.resolution)}. Fix: a larger resolution, or lpips_weight 0.")
            self.lpips = metrics.LPIPS.load(lpips_weights)
        self.mesh = mesh or parallel.make_mesh(config.num_devices)
        parallel.check_batch_size(config.training.batch_size, self.mesh, "training.batch_size")
        self.is_writer = jax.process_index() == 0
        self.lock = open_workdir(self.workdir, config, lock=self.is_writer)
        self.autoencoder = autoencoder_from_config(config)
        self.key = jax.random.key(config.seed)
        self.rep, self.data = parallel.replicated(self.mesh), parallel.data_sharded(self.mesh)
        self.optimizer = steps.optimizer_from_config(config)
        self.loss = make_loss(self.autoencoder, config, self.lpips)
        self.update = steps.jit_update(steps.make_update(self.loss, self.optimizer), self.mesh)
        ae, res = self.autoencoder, tuple(config.resolution)
        self._reconstruct = jax.jit(lambda v, f: ae.decode_frames(v, ae.encode(v, frames_in(f, res))))
        self._test_loss = jax.jit(lambda s, f, k: self.loss(s.params, s.buffers, f, k)[0])
        self._means = jax.jit(lambda v, f: ae.moments(v, frames_in(f, res))[0])
        self.checkpointer = RunCheckpointer(os.path.join(self.workdir, CHECKPOINTS), config.checkpoint.keep)
        self.logger = RunLogger(self.workdir, enabled=self.is_writer)
        self._stop_requested = False
        self._restore_or_start()

    def _fresh_state(self) -> steps.TrainState:
        variables = self.autoencoder.init(jax.random.fold_in(self.key, KEY_INIT), tuple(self.config.resolution))
        return steps.TrainState.create(variables, self.optimizer)

    def _restore_or_start(self) -> None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.rep),
                                jax.eval_shape(self._fresh_state))
        restored = self.checkpointer.restore_latest(abstract)
        if restored is None:
            self.state, self.step = parallel.place(self._fresh_state(), self.rep), 0
            logging.info("Starting an autoencoder in %s on %d device(s)", self.workdir, self.mesh.size)
        else:
            _, self.state, meta = restored
            self.step = meta["step"]
            self.logger.drop_after({"train/": self.step, "test/": self.step}, {})
            logging.info("Resumed %s at update %d", self.workdir, self.step)
        self._last_save = time.monotonic()
        self._last_test: Optional[Dict[str, float]] = None

    # ---- Data.

    def frames(self, split: str, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.dataset.sample(rng, n, 1, split).obs[:, 0]

    def test_frames(self) -> np.ndarray:
        return self.frames("test", np.random.default_rng([self.config.seed, KEY_TEST]),
                           self.config.training.test_frames)

    # ---- Saving.

    def measured_scaling_factor(self) -> float:
        """1 / the std of the posterior means of fixed training frames (SD's recipe), or the config's value."""
        if self.config.model.scaling_factor > 0:
            return float(self.config.model.scaling_factor)
        frames = self.frames("train", np.random.default_rng([self.config.seed, KEY_SCALING]),
                             self.config.training.scaling_frames)
        batch = self.config.training.batch_size
        means = [np.asarray(self._means(self.state.variables(), frames[i:i + batch]))
                 for i in range(0, len(frames), batch)]
        return float(1.0 / max(np.std(np.concatenate(means)), 1e-8))

    def save(self) -> None:
        self.checkpointer.save(self.step, self.state, {"step": self.step})
        if self.is_writer:
            self.scaling_factor = self.measured_scaling_factor()
            save_export(os.path.join(self.workdir, EXPORT_DIR), autoencoder_from_config(
                self.config, self.scaling_factor), jax.device_get(self.state.params))
        self._last_save = time.monotonic()

    # ---- The loop.

    def request_stop(self, signum=None, _frame=None) -> None:
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logging.warning("%s received: the run saves after the update in progress and exits (status 75); run the "
                        "same command to resume.", signal.Signals(signum).name if signum else "A stop")
        self._stop_requested = True

    def run(self) -> Dict[str, Any]:
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()

    def _run(self) -> Dict[str, Any]:
        c = self.config
        bar = tqdm(total=c.training.num_steps, initial=self.step, desc="Autoencoder", unit="update",
                   dynamic_ncols=True)
        started, losses = time.monotonic(), []
        while self.step < c.training.num_steps:
            stop, due = parallel.any_process([
                self._stop_requested,
                c.checkpoint.every_minutes > 0 and time.monotonic() - self._last_save > 60 * c.checkpoint.every_minutes])
            if stop:
                self.save()
                bar.close()
                raise Preempted(f"saved checkpoint {self.step} in {self.checkpointer.directory}")
            if due:
                self.save()
            rng = np.random.default_rng([c.seed, KEY_TRAIN, self.step])
            frames = parallel.place(self.frames("train", rng, c.training.batch_size), self.data)
            key = jax.random.fold_in(jax.random.fold_in(self.key, KEY_TRAIN), self.step)
            self.state, out = self.update(self.state, frames, key)
            losses.append(out)
            self.step += 1
            bar.update(1)
            if self.step % c.training.log_every == 0 or self.step == c.training.num_steps:
                self._log_training(losses, bar)
                losses = []
            if self.step % c.training.test_every == 0 or self.step == c.training.num_steps:
                self._test()
            if self.step % c.checkpoint.every_steps == 0:
                self.save()
        bar.close()
        test = self._last_test if self._last_test is not None else self._test()
        if self.checkpointer.all_indices()[-1:] != [self.step]:
            self.save()
        results = {"steps": self.step, "test": test, "scaling_factor": self.measured_scaling_factor(),
                   "latent_shape": list(self.autoencoder.latent_shape(tuple(c.resolution))),
                   "wall_s_this_start": round(time.monotonic() - started, 1)}
        if self.is_writer:
            path = os.path.join(self.workdir, RESULTS_FILE)
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=2)
            os.replace(path + ".tmp", path)
        return results

    def _log_training(self, losses, bar: tqdm) -> None:
        if not losses:
            return
        means = {k: float(np.mean([float(m[k]) for m in losses])) for k in losses[0]}
        if not np.isfinite(means["loss"]):
            raise NonFiniteLoss(f"The autoencoder loss became {means['loss']} by update {self.step}. The run "
                                f"stopped without saving; the last good checkpoint is in "
                                f"{self.checkpointer.directory}. Fix: lower --config.optimizer.lr, then resume.")
        self.logger.scalars(self.step, means, prefix="train/")
        bar.set_postfix({"loss": f"{means['loss']:.4f}"}, refresh=False)

    def reconstruct(self, frames: np.ndarray) -> np.ndarray:
        """uint8 reconstructions (at the autoencoder's resolution) of uint8 frames, batch by batch."""
        batch, variables = self.config.training.batch_size, self.state.variables()
        return np.concatenate([to_uint8(self._reconstruct(variables, frames[i:i + batch]))
                               for i in range(0, len(frames), batch)])

    def _test(self) -> Dict[str, float]:
        c = self.config
        frames = self.test_frames()
        real = to_uint8(frames_in(jnp.asarray(frames), c.resolution))
        recon = self.reconstruct(frames)
        psnr = metrics.psnr_summary(metrics.psnr(real, recon))
        test = {"psnr_db": psnr.mean_db, "psnr_identical_fraction": psnr.fraction_identical}
        if min(c.resolution) >= metrics.SSIM_WINDOW:
            test["ssim"] = float(np.mean(metrics.ssim(real, recon)))
        test["loss"] = float(self._test_loss(self.state, frames, jax.random.fold_in(self.key, KEY_TEST)))
        self.logger.scalars(self.step, {k: v for k, v in test.items() if v is not None}, prefix="test/")
        both = np.concatenate([real[:IMAGE_ROWS], recon[:IMAGE_ROWS]], axis=2)[:, None] / 127.5 - 1  # real | recon
        self.logger.video(self.step, "test/reconstruction", both)
        self._last_test = test
        return test

    def close(self) -> None:
        self.logger.close()
        self.checkpointer.close()
        if self.lock is not None:
            self.lock.release()
