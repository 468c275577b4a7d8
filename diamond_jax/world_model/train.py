"""Trains a world model on a recorded dataset: the denoiser, and the upsampler beside it when enabled.

Each update of each model draws its batch of segments from the training episodes with a generator seeded by
(seed, model, update), and its noise from a key folded the same way: a run stopped and resumed on the same
devices computes what it would have computed without the stop. Every `training.test_every` updates, the loss on
fixed batches of test episodes and a video of open-loop rollouts from test episodes go to TensorBoard.
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

from diamond_jax.data.batch import Batch
from diamond_jax.data.recorded import RecordedDataset
from diamond_jax.training import parallel, steps
from diamond_jax.training.checkpoint import RunCheckpointer
from diamond_jax.training.latent_agent import is_latent
from diamond_jax.training.logger import RunLogger
from diamond_jax.training.loop import NonFiniteLoss, Preempted
from diamond_jax.training.workdir import open_workdir
from diamond_jax.world_model import latent
from diamond_jax.world_model.config import check_dataset, denoiser_segment_length
from diamond_jax.world_model.model import WorldModel, frames_window
from diamond_jax.world_model.run import CHECKPOINTS, DATASET_FILE, fresh_state, model_names

# Streams of random numbers, each derived from the seed by folding in its id (run.KEY_INIT: initialisation).
KEY_TEST, KEY_VIDEO = 1, 2
KEY_MODEL = {"denoiser": 10, "upsampler": 11}
RESULTS_FILE = "results.json"


def segment_length(config: config_dict.ConfigDict, name: str) -> int:
    if name == "denoiser":
        return denoiser_segment_length(config)
    return config.upsampler.inner_model.num_steps_conditioning + 1


def make_loss(model: WorldModel, name: str) -> Callable:
    """loss(params, buffers, segments, key) of one model on recorded segments {"obs": uint8, "act"}."""

    def denoiser_loss(params, buffers, seg, key):
        obs = model.denoiser_obs(seg["obs"])
        b, t = obs.shape[:2]
        zeros = jnp.zeros((b, t), jnp.int32)
        batch = Batch(obs, seg["act"], zeros.astype(jnp.float32), zeros, zeros, jnp.ones((b, t), bool))
        return model.denoiser.loss(params, buffers, batch, key)

    def upsampler_loss(params, buffers, seg, key):
        return model.upsampler.loss(params, buffers, model.full_res(seg["obs"]), model.low_res(seg["obs"]), key)

    return denoiser_loss if name == "denoiser" else upsampler_loss


def dataset_record(dataset: RecordedDataset) -> Dict[str, Any]:
    return {"path": os.path.abspath(dataset.path), "frame_shape": list(dataset.frame_shape),
            "action": dataset.action.to_json(), "train_episodes": len(dataset.episode_ids("train")),
            "test_episodes": len(dataset.episode_ids("test"))}


def check_same_dataset(workdir: str, dataset: RecordedDataset) -> None:
    """A resumed run must train on data of the same kind; the path may move."""
    path = os.path.join(workdir, DATASET_FILE)
    current = dataset_record(dataset)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        for field in ("frame_shape", "action"):
            if saved[field] != current[field]:
                raise ValueError(f"--workdir={workdir} holds a run trained on a dataset with {field} "
                                 f"{saved[field]}, but --dataset={dataset.path} has {current[field]}. Fix: resume "
                                 f"with {saved['path']}, or start a new --workdir.")
        if saved != current:
            logging.warning("Resuming on dataset %s; the run started on %s.", current, saved)
    with open(path + ".tmp", "w") as f:
        json.dump(current, f, indent=2)
    os.replace(path + ".tmp", path)


class WorldModelTrainer:
    def __init__(self, config: config_dict.ConfigDict, dataset_path: str, workdir: str, mesh=None):
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.dataset = RecordedDataset.open(dataset_path)
        self.names = model_names(config)
        check_dataset(config, self.dataset.action.kind, self.dataset.frame_shape,
                      int(max(self.dataset.lengths("train"), default=0)), self.dataset.path)
        if not self.dataset.episode_ids("test"):
            raise ValueError(f"{self.dataset.path} has no test episodes. Fix: import it again with "
                             "--test_fraction > 0 and at least 2 episodes.")
        self.mesh = mesh or parallel.make_mesh(config.num_devices)
        for name in self.names:
            parallel.check_batch_size(config[name].training.batch_size, self.mesh, f"{name}.training.batch_size")
        self.is_writer = jax.process_index() == 0
        self.lock = open_workdir(self.workdir, config, lock=self.is_writer)
        try:
            if self.is_writer:
                check_same_dataset(self.workdir, self.dataset)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        self.data_source, self.autoencoder_variables = self.dataset, None
        try:
            if is_latent(config):
                autoencoder, self.autoencoder_variables, self.data_source, sigma_data = latent.prepare(
                    config, self.dataset, self.workdir, write=self.is_writer)
                self.model = WorldModel.from_config(config, self.dataset.action.size, self.dataset.frame_shape,
                                                    autoencoder, sigma_data)
            else:
                self.model = WorldModel.from_config(config, self.dataset.action.size, self.dataset.frame_shape)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        self.key = jax.random.key(config.seed)
        self.rep, self.data = parallel.replicated(self.mesh), parallel.data_sharded(self.mesh)
        self.optimizers = {n: steps.optimizer_from_config(config[n]) for n in self.names}
        self.updates = {n: steps.jit_update(steps.make_update(make_loss(self.model, n), self.optimizers[n]),
                                            self.mesh) for n in self.names}
        self.test_losses = {n: jax.jit(lambda state, seg, key, n=n: make_loss(self.model, n)(
            state.params, state.buffers, seg, key)[0]) for n in self.names}
        self.rollout = jax.jit(self.model.rollout, static_argnums=(4,))
        self._frames = jax.jit(self.model.frames)
        self.checkpointer = RunCheckpointer(os.path.join(self.workdir, CHECKPOINTS), config.checkpoint.keep)
        self.logger = RunLogger(self.workdir, enabled=self.is_writer)
        self._stop_requested = False
        self._restore_or_start()

    # ---- State.

    def _fresh_state(self) -> Dict[str, steps.TrainState]:
        return fresh_state(self.model, self.optimizers, self.config.seed)

    def _restore_or_start(self) -> None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.rep),
                                jax.eval_shape(self._fresh_state))
        restored = self.checkpointer.restore_latest(abstract)
        if restored is None:
            self.state = parallel.place(self._fresh_state(), self.rep)
            self.step = 0
            logging.info("Starting a world model in %s on %d %s device(s)", self.workdir, self.mesh.size,
                         self.mesh.devices.flat[0].platform)
        else:
            _, self.state, meta = restored
            self.step = meta["step"]
            # Summaries past the checkpoint are recomputed: drop them so that no step shows twice.
            self.logger.drop_after({**{f"{n}/": self.step for n in self.names}, "test/": self.step}, {})
            logging.info("Resumed %s at update %d", self.workdir, self.step)
        self._last_save = time.monotonic()
        self._last_test: Optional[Dict[str, float]] = None

    def save(self) -> None:
        self.checkpointer.save(self.step, self.state, {"step": self.step})
        self._last_save = time.monotonic()

    # ---- Data.

    def segments(self, name: str, split: str, rng: np.random.Generator, batch_size: int) -> Dict[str, Any]:
        seg = self.data_source.sample(rng, batch_size, segment_length(self.config, name), split)
        return parallel.place({"obs": seg.obs, "act": seg.act}, self.data)

    def train_segments(self, name: str) -> Dict[str, Any]:
        rng = np.random.default_rng([self.config.seed, KEY_MODEL[name], self.step])
        return self.segments(name, "train", rng, self.config[name].training.batch_size)

    # ---- The loop.

    def request_stop(self, signum=None, _frame=None) -> None:
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
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
        bar = tqdm(total=c.training.num_steps, initial=self.step, desc="World model", unit="update",
                   dynamic_ncols=True)
        started, losses = time.monotonic(), {n: [] for n in self.names}
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
            for name in self.names:
                key = jax.random.fold_in(jax.random.fold_in(self.key, KEY_MODEL[name]), self.step)
                self.state[name], metrics = self.updates[name](self.state[name], self.train_segments(name), key)
                losses[name].append(metrics)
            self.step += 1
            bar.update(1)
            if self.step % c.training.log_every == 0 or self.step == c.training.num_steps:
                self._log_training(losses, bar)
                losses = {n: [] for n in self.names}
            if self.step % c.training.test_every == 0 or self.step == c.training.num_steps:
                self._test()
            if self.step % c.checkpoint.every_steps == 0:
                self.save()
        bar.close()
        # The loop tests at its last update; a start that finds the run already trained tests once here.
        test = self._last_test if self._last_test is not None else self._test()
        if self.checkpointer.all_indices()[-1:] != [self.step]:
            self.save()
        results = {"steps": self.step, "test_loss": test, "wall_s_this_start": round(time.monotonic() - started, 1)}
        if self.is_writer:
            with open(os.path.join(self.workdir, RESULTS_FILE + ".tmp"), "w") as f:
                json.dump(results, f, indent=2)
            os.replace(os.path.join(self.workdir, RESULTS_FILE + ".tmp"), os.path.join(self.workdir, RESULTS_FILE))
        return results

    def _log_training(self, losses: Dict[str, list], bar: tqdm) -> None:
        postfix = {}
        for name, metrics in losses.items():
            if not metrics:
                continue
            means = {k: float(np.mean([float(m[k]) for m in metrics])) for k in metrics[0]}
            if not np.isfinite(means["loss_denoising"]):
                raise NonFiniteLoss(
                    f"The {name} loss became {means['loss_denoising']} by update {self.step}. The run stopped "
                    f"without saving; the last good checkpoint is in {self.checkpointer.directory}. Fix: lower "
                    f"--config.{name}.optimizer.lr or check the dataset, then resume.")
            self.logger.scalars(self.step, means, prefix=f"{name}/train/")
            postfix[name] = f"{means['loss_denoising']:.4f}"
        bar.set_postfix(postfix, refresh=False)

    def _test(self) -> Dict[str, float]:
        """Losses on fixed batches of test episodes (the same at every test), and rollout videos."""
        c, test = self.config, {}
        # Between progress-bar updates this takes minutes on a CPU: say what the run is doing.
        logging.info("Update %d: test losses on %d batches and %d-frame videos (the bar resumes after them)",
                     self.step, c.training.test_batches, c.training.video_steps)
        for name in self.names:
            values = []
            for j in range(c.training.test_batches):
                rng = np.random.default_rng([c.seed, KEY_TEST, KEY_MODEL[name], j])
                seg = self.segments(name, "test", rng, c[name].training.batch_size)
                key = jax.random.fold_in(jax.random.fold_in(self.key, KEY_TEST), j)
                values.append(float(self.test_losses[name](self.state[name], seg, key)))
            test[name] = float(np.mean(values))
            self.logger.scalars(self.step, {"loss_denoising": test[name]}, prefix=f"test/{name}/")
        self._video()
        self._last_test = test
        return test

    def _video(self) -> None:
        """Open-loop rollouts from test segments, the real frames beside the drawn ones."""
        c, n = self.config, self.model.num_steps_conditioning
        steps_ = c.training.video_steps
        try:
            seg = self.dataset.sample(np.random.default_rng([c.seed, KEY_VIDEO]), c.training.video_rows,
                                      n + steps_, "test")
        except ValueError:  # test episodes shorter than a video: the losses say enough
            return
        variables = self.variables()
        real = self._frames(jnp.asarray(seg.obs), variables)
        context = frames_window(real, slice(None), 0, n)
        drawn = self.rollout(variables, jax.random.fold_in(self.key, KEY_VIDEO), context,
                             jnp.asarray(seg.act[:, :n + steps_ - 1]), steps_)
        for level, tag in (("low", "test/rollout"), ("full", "test/rollout_full_resolution")):
            frames = getattr(drawn, level)
            if frames is None:
                continue
            both = jnp.concatenate([getattr(real, level)[:, n:], frames], axis=3)  # real | drawn, side by side
            self.logger.video(self.step, tag, np.asarray(both))

    def variables(self) -> Dict[str, Any]:
        """The models' variables, with a latent world model's autoencoder."""
        variables = {k: v.variables() for k, v in self.state.items()}
        if self.autoencoder_variables is not None:
            variables["autoencoder"] = self.autoencoder_variables
        return variables

    def close(self) -> None:
        self.logger.close()
        self.checkpointer.close()
        if self.lock is not None:
            self.lock.release()
