"""The epoch schedule of DIAMOND with checkpoints, resume and evaluation.

Epoch 0 is the initial collection. Each later epoch collects `steps_per_epoch` steps (while the budget
lasts), then trains the denoiser, the reward/end model and the actor-critic, and every `evaluation.every`
epochs plays test episodes. After the last epoch, `num_final_episodes` test episodes give results.json.

Where the run stands is a small record (epoch, phase, updates done in the phase): checkpoints can be taken
between any two compiled calls, and every random draw is a function of the seed and of that record, so a
run stopped and resumed on the same number of devices computes exactly what it would have computed without
the stop. The device count changes the order of float sums over the data-parallel batch, so results depend
on it to float rounding: a run resumed on another count goes on from the same state, not bit-exactly.
"""

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict
from tqdm import tqdm

from diamond_jax import envs, imagination, scores
from diamond_jax.agent import AUTOENCODER, MODEL_NAMES, Agent, LatentSpace
from diamond_jax.data.replay import ReplayDataset
from diamond_jax.envs.collect import Interrupted, TrainCollector, collect_initial, collect_test_episodes
from diamond_jax.training import latent_agent, paper, parallel, phases, steps
from diamond_jax.training.agent_checkpoint import save_agent
from diamond_jax.training.autoencoder_export import autoencoder_of_run
from diamond_jax.training.checkpoint import RunCheckpointer
from diamond_jax.training.logger import RunLogger
from diamond_jax.training.workdir import open_workdir

PHASES = ("collect", "denoiser", "rew_end_model", "actor_critic", "evaluate")
# Streams of random numbers, each derived from the seed by folding in its id.
KEY_INIT, KEY_COLLECT, KEY_EVAL, KEY_IMAGINE = 0, 1, 2, 3
KEY_MODEL = {"denoiser": 10, "rew_end_model": 11, "actor_critic": 12}
LOSS = {"denoiser": "loss_denoising", "rew_end_model": "loss_total", "actor_critic": "loss_total"}
# TensorBoard tag of the normalised test score, by suite (scores.normalized_score).
_SCORE_TAG = {"atari100k": "test/human_normalized_score", "minatar": "test/return_above_random"}


class Preempted(Exception):
    """The run saved a checkpoint and stopped because it was asked to (SIGTERM); resuming continues it."""


class NonFiniteLoss(Exception):
    pass


@dataclasses.dataclass
class Progress:
    """Where the run stands; saved as JSON with every checkpoint."""

    epoch: int = 0  # the epoch in progress; 0 is the initial collection
    phase: str = "collect"  # the next phase of that epoch
    phase_step: int = 0  # updates already done in that phase
    num_epochs_collect: Optional[int] = None  # epochs that collect, known after the initial collection
    num_evaluations: int = 0
    imagination_started: bool = False
    finished: bool = False


class Trainer:
    def __init__(self, config: config_dict.ConfigDict, workdir: str, mesh=None, managed: bool = False):
        """managed: one seed of a seed group (training/group.py), which holds the lock, decides when to save
        and stop, and trains the models of all its seeds in one program; this trainer does the rest."""
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.managed = managed
        # With several processes (jax.distributed), every process computes the same run (collection is seeded
        # alike) and process 0 alone writes files; orbax coordinates the processes for checkpoints itself.
        self.is_writer = jax.process_index() == 0
        self.lock = open_workdir(self.workdir, config, lock=self.is_writer and not managed)
        self.mesh = mesh or parallel.make_mesh(config.num_devices)
        for name in MODEL_NAMES:
            parallel.check_batch_size(config[name].training.batch_size, self.mesh, f"{name}.training.batch_size")
        self.num_actions = envs.num_actions(config)
        # A latent agent's frozen autoencoder ({"autoencoder": variables}, replicated); {} for a pixel agent.
        self.frozen: Dict[str, Any] = {}
        latent = None
        if latent_agent.is_latent(config):
            autoencoder, variables = autoencoder_of_run(config.autoencoder.path, self.workdir)
            self.frozen = {AUTOENCODER: parallel.place(variables, parallel.replicated(self.mesh))}
            # Until sigma_data is measured after the initial collection, a placeholder: no shape depends on it.
            latent = LatentSpace(autoencoder, latent_agent.known_sigma_data(config, self.workdir) or 1.0)
        self.agent = Agent.from_config(config, self.num_actions, latent)
        self.optimizers = {name: steps.optimizer_from_config(config[name]) for name in MODEL_NAMES}
        self.key = jax.random.key(config.seed)
        self.rep, self.data = parallel.replicated(self.mesh), parallel.data_sharded(self.mesh)
        self.checkpointer = RunCheckpointer(os.path.join(self.workdir, "checkpoints"), config.checkpoint.keep)
        self.logger = RunLogger(self.workdir, enabled=self.is_writer)
        self._stop_requested = False
        self._last_save = time.monotonic()
        self._save_index = 0
        self._compiled: Dict[Any, Any] = {}
        self._scan = phases.use_scan(config.training.phase_loop, self.mesh.devices.flat[0].platform)
        self._started = time.monotonic()
        self._epochs_at_start: Optional[int] = None
        self._final_results: Optional[Dict[str, Any]] = None
        self._restore_or_start()

    # ---- State.

    def _fresh_state(self) -> Dict[str, Any]:
        variables = self.agent.init(jax.random.fold_in(self.key, KEY_INIT))
        models = {name: steps.TrainState.create(variables[name], self.optimizers[name]) for name in MODEL_NAMES}
        # Placeholder rows until the first actor-critic phase starts the imagined environments from real data.
        imagined = imagination.zero_state(self.agent, self.config.actor_critic.training.batch_size)
        return {"models": models, "imagined": imagined}

    def _place(self, state: Dict[str, Any]) -> Dict[str, Any]:
        return {"models": parallel.place(state["models"], self.rep),
                "imagined": parallel.place(state["imagined"], self.data)}

    def _restore_or_start(self) -> None:
        abstract = jax.eval_shape(self._fresh_state)
        shardings = {"models": jax.tree.map(lambda _: self.rep, abstract["models"]),
                     "imagined": jax.tree.map(lambda _: self.data, abstract["imagined"])}
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        restored = self.checkpointer.restore_latest(abstract)
        if restored is None:
            self.state = self._place(self._fresh_state())
            self.progress = Progress()
            self.replay = ReplayDataset.from_config(self.config, sharding=self.rep)
            self.collector = self._new_collector()
            logging.info("Starting a new run in %s on %d %s device(s)", self.workdir, self.mesh.size,
                         self.mesh.devices.flat[0].platform)
            return
        index, self.state, meta = restored
        # Numbers after an unreadable newer checkpoint, which stays where it is for inspection.
        self._save_index = max(self.checkpointer.all_indices())
        self.progress = Progress(**meta["progress"])
        self.replay = ReplayDataset.load(os.path.join(self.workdir, "replay"), up_to=meta["replay"],
                                         sharding=self.rep)
        self.collector = self._new_collector()
        self.collector.restore(_collector_from_json(meta["collector"]))
        if self.progress.epoch >= 1:
            self._check_sigma_data()  # a run stopped between its initial collection and the measure
        # Steps lost to damaged replay files were collected all the same: the envs are past them (load logged
        # which files, and the run goes on with the rest).
        if self.collector.num_steps != self.replay.num_steps + self.replay.num_lost_steps:
            raise RuntimeError(f"the checkpoint's collector has {self.collector.num_steps} steps but its dataset "
                               f"{self.replay.num_steps} (+ {self.replay.num_lost_steps} lost); the run directory "
                               f"{self.workdir} is inconsistent.")
        # Model summaries are at update steps, collections' at environment steps; evaluations are counted, as
        # several can share an environment step (the last epochs collect nothing).
        self.logger.drop_after({**{f"{m}/": int(self.state["models"][m].step) for m in MODEL_NAMES},
                                "train/": self.replay.num_steps, "counts/": self.replay.num_steps},
                               {"test/": self.progress.num_evaluations, "imagination/": self.progress.num_evaluations})
        logging.info("Resumed %s from checkpoint %d: epoch %d, phase %s, update %d", self.workdir,
                     index, self.progress.epoch, self.progress.phase, self.progress.phase_step)

    def _new_collector(self) -> TrainCollector:
        return TrainCollector(self.config, self.agent.actor_critic, self.replay,
                              jax.random.fold_in(self.key, KEY_COLLECT), self._env_seed(0))

    def _env_seed(self, stream: int) -> int:
        """Distinct envpool seeds for the training envs (stream 0) and each evaluation (stream 1, 2, ...)."""
        return (self.config.seed * 1_000_003 + stream * 10_007) % (2 ** 31 - 1)

    def save(self) -> None:
        if self.is_writer:
            self.replay.save(os.path.join(self.workdir, "replay"))
        self._save_index += 1
        meta = {"progress": dataclasses.asdict(self.progress),
                "replay": self.replay.summary(), "collector": _collector_to_json(self.collector.state_dict())}
        self.checkpointer.save(self._save_index, self.state, meta)
        self._last_save = time.monotonic()

    def request_stop(self, signum=None, _frame=None) -> None:
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        name = signal.Signals(signum).name if signum else "a stop"
        _log(logging.WARNING, f"{name} received: the run saves after the update in progress and exits (status "
             f"75); run the same command to resume." + (" Ctrl-C again to quit without saving."
                                                         if signum == signal.SIGINT else ""))
        self._stop_requested = True

    def _maybe_stop_or_save(self) -> None:
        """Between two compiled calls: honours a stop request, or saves when `every_minutes` have passed."""
        if self.managed:  # the group decides, for all its seeds at once
            return
        minutes = self.config.checkpoint.every_minutes
        due = bool(minutes) and time.monotonic() - self._last_save > 60 * minutes
        # With several processes, a signal or a clock seen by one stops or saves them all (a save is collective).
        stop, due = parallel.any_process([self._stop_requested, due])
        if stop:
            self.save()
            raise Preempted(f"saved checkpoint {self._save_index} in {self.checkpointer.directory}")
        if due:
            self.save()

    # ---- The schedule.

    def run(self) -> Dict[str, Any]:
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self.progress.finished:
                self._run_phase()
            return self._results()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()

    def close(self) -> None:
        """Closes the files and releases the run directory for the next run."""
        self.logger.close()
        self.checkpointer.close()
        if self.lock is not None:
            self.lock.release()

    @property
    def num_epochs(self) -> int:
        return self.progress.num_epochs_collect + self.config.training.num_final_epochs

    def _run_phase(self) -> None:
        p = self.progress
        self._maybe_stop_or_save()
        if p.epoch == 0:
            self._initial_collection()
            p.epoch, p.phase = 1, "collect"
            self.save()
        elif p.phase == "collect":
            if p.epoch <= p.num_epochs_collect:
                self._collect(self.config.collection.train.steps_per_epoch)
            p.phase = "denoiser"
        elif p.phase in MODEL_NAMES:
            self._train(p.phase)
            p.phase, p.phase_step = PHASES[PHASES.index(p.phase) + 1], 0
        else:
            final = p.epoch == self.num_epochs
            if final or p.epoch % self.config.evaluation.every == 0:
                self.save()  # test episodes are long: a stop during them resumes from here
            if p.epoch % self.config.evaluation.every == 0:
                self._evaluate()
            self._end_epoch()

    def _end_epoch(self) -> None:
        p = self.progress
        if p.epoch == self.num_epochs:
            self._final_evaluation()
            p.finished = True
            self.save()
            return
        p.epoch, p.phase = p.epoch + 1, "collect"
        if (p.epoch - 1) % self.config.checkpoint.every_epochs == 0:
            self.save()

    def _collect(self, num_steps: int, bar: Optional[tqdm] = None) -> None:
        logs = self.collector.collect(self.state["models"]["actor_critic"].variables(), num_steps,
                                      on_step=bar.update if bar is not None else None)
        for episode in logs["episodes"]:
            self.logger.scalars(self.replay.num_steps, {"train/episode_return": episode["return"],
                                                        "train/episode_length": episode["length"]})
        self.logger.scalars(self.replay.num_steps, {k: v for k, v in logs.items() if k.startswith("counts/")})

    def _initial_collection(self) -> None:
        t = self.config.collection.train
        # The total is first_epoch.min; more steps are collected (the bar grows) while rewards are too rare.
        bar = _bar(t.first_epoch.min, "Initial collection", "step")

        def collect(num_steps: int) -> None:
            if bar.n + num_steps > bar.total:
                bar.total = bar.n + num_steps
                bar.refresh()
            self._collect(num_steps, bar)

        collected = collect_initial(collect, lambda: self.replay.counts_rew, self.config)
        bar.close()
        self._check_sigma_data()
        self.progress.num_epochs_collect = (t.num_steps_total - collected) // t.steps_per_epoch
        _log(logging.INFO, f"Initial collection: {collected} steps, reward counts (-1, 0, +1) "
             f"{self.replay.counts_rew.tolist()}; {self.progress.num_epochs_collect} epochs will collect, "
             f"{self.num_epochs} in all.")

    def _check_sigma_data(self) -> None:
        """A latent agent's sigma_data, measured on the encoded replay if nothing fixed it yet; the agent and its
        compiled programs are then rebuilt around it."""
        if not self.agent.is_latent or latent_agent.known_sigma_data(self.config, self.workdir) is not None:
            return
        autoencoder = self.agent.autoencoder
        sigma_data = latent_agent.measure_sigma_data(self.config, self.workdir, autoencoder, self.frozen[AUTOENCODER],
                                                     self.replay, write=self.is_writer)
        self.agent = Agent.from_config(self.config, self.num_actions, LatentSpace(autoencoder, sigma_data))
        self._compiled.clear()
        _log(logging.INFO, f"Latent space: sigma_data {sigma_data:.4f}, measured on the encoded replay "
             f"({os.path.join(self.workdir, latent_agent.LATENT_FILE)})")

    def _phase_fn(self, name: str, num_steps: int):
        key = (name, num_steps)
        if key not in self._compiled:
            self._compiled[key] = phases.make_phase(self.agent, self.config, name, self.optimizers[name], self.mesh,
                                                    num_steps, self._scan)
        return self._compiled[key]

    def _train(self, name: str) -> None:
        p, t = self.progress, self.config[name].training
        total = t.steps_first_epoch if p.epoch == 1 else t.steps_per_epoch
        replay = self.replay.device_replay()
        key = jax.random.fold_in(jax.random.fold_in(self.key, KEY_MODEL[name]), p.epoch)
        if name == "actor_critic" and not p.imagination_started and total > 0:
            self._start_imagination(replay)
        bar = _bar(total, f"Epoch {p.epoch}/{self.num_epochs} {name}", "update", initial=p.phase_step)
        bar.set_postfix_str(self._run_eta(), refresh=False)
        losses, started = [], time.monotonic()
        while p.phase_step < total:
            # Without scan (CPU), each call is one update: stops, saves and the bar act after every update.
            n = min(self.config.training.steps_per_call, total - p.phase_step) if self._scan else 1
            fn = self._phase_fn(name, n)
            model = self.state["models"][name]
            first = jnp.int32(p.phase_step)
            if name == "actor_critic":
                world_model = {m: self.state["models"][m].variables() for m in ("denoiser", "rew_end_model")}
                model, imagined, metrics = fn(model, self.state["imagined"], {**world_model, **self.frozen}, replay,
                                              key, first)
            elif name == "denoiser" and self.agent.is_latent:
                model, metrics = fn(model, phases.LatentReplay(replay, self.frozen), key, first)
            else:
                model, metrics = fn(model, replay, key, first)
            finite, index = phases.first_non_finite(metrics[LOSS[name]])
            if not finite:
                raise NonFiniteLoss(
                    f"The {name} loss became {float(metrics[LOSS[name]][index])} at update {p.phase_step + index} "
                    f"of epoch {p.epoch} (its update {int(model.step) - n + index} overall). The run stopped "
                    f"without saving; the last good checkpoint is in {self.checkpointer.directory}. Fix: lower "
                    f"--config.{name}.optimizer.lr or check the data, then resume.")
            self.state["models"][name] = model
            if name == "actor_critic":
                self.state["imagined"] = imagined
            p.phase_step += n
            means = phases.mean_metrics(metrics)
            losses.append((n, means[LOSS[name]]))
            # Environment steps beside the losses: their x-axis is the model's updates, the returns' env steps.
            self.logger.scalars(int(model.step), {**means, "env_steps": self.replay.num_steps},
                                prefix=f"{name}/train/")
            bar.update(n)
            bar.set_postfix_str(f"{LOSS[name]}={means[LOSS[name]]:.4g}, {self._run_eta()}", refresh=False)
            if p.phase_step < total:
                self._maybe_stop_or_save()
        bar.close()
        if losses:
            done = sum(n for n, _ in losses)
            mean = sum(n * v for n, v in losses) / done
            _log(logging.INFO, f"Epoch {p.epoch}/{self.num_epochs} {name}: {done} updates in "
                 f"{time.monotonic() - started:.1f} s, mean {LOSS[name]} {mean:.5g}; {self._run_eta()}")

    def _run_eta(self) -> str:
        """Where the run stands and its time left, extrapolated from the epochs after the first (which trains
        far longer) that this process has finished."""
        p = self.progress
        if p.num_epochs_collect is None:
            return "run: initial collection"
        if self._epochs_at_start is None and p.epoch >= 2:
            self._epochs_at_start, self._started = p.epoch, time.monotonic()
        done = p.epoch - self._epochs_at_start if self._epochs_at_start is not None else 0
        if done < 1:
            return f"run: epoch {p.epoch}/{self.num_epochs}"
        per_epoch = (time.monotonic() - self._started) / done
        left = per_epoch * (self.num_epochs - p.epoch + 1)
        return f"run: epoch {p.epoch}/{self.num_epochs}, {_duration(left)} left"

    def _variables(self) -> Dict[str, Any]:
        """Every model's variables, with a latent agent's autoencoder."""
        return {**{name: self.state["models"][name].variables() for name in MODEL_NAMES}, **self.frozen}

    def _start_imagination(self, replay) -> None:
        variables = self._variables()
        start = phases.make_imagination_start(self.agent, self.config, self.mesh)
        self.state["imagined"] = start(variables, replay, jax.random.fold_in(self.key, KEY_IMAGINE))
        self.progress.imagination_started = True

    # ---- Evaluation and results.

    def _test_episodes(self, num_episodes: int) -> Dict[str, List]:
        p = self.progress
        p.num_evaluations += 1
        key = jax.random.fold_in(jax.random.fold_in(self.key, KEY_EVAL), p.num_evaluations)
        try:
            return collect_test_episodes(self.config, self.agent.actor_critic,
                                         self.state["models"]["actor_critic"].variables(), num_episodes, key,
                                         self._env_seed(p.num_evaluations),
                                         should_stop=lambda: parallel.any_process([self._stop_requested])[0])
        except Interrupted as stop:
            # The run was saved just before the evaluation, which starts over on resume.
            raise Preempted(f"evaluation {stop}; checkpoint {self._save_index} resumes before it") from stop

    def _save_agent(self) -> None:
        if self.is_writer:  # every process holds the same replicated variables
            save_agent(os.path.join(self.workdir, "agent"), self.config, self._variables(), step=self.progress.epoch,
                       latent=self.agent.latent)

    def _evaluate(self) -> None:
        self._save_agent()
        result = self._test_episodes(self.config.collection.test.num_episodes)
        self._record_evaluation(result, final=False)
        rollout = self._imagined_rollout()
        self.logger.video(self.replay.num_steps, "imagination/rollout", np.asarray(rollout.obs))

    def _imagined_rollout(self):
        if "rollout" not in self._compiled:
            rows = self.config.actor_critic.training.batch_size
            self._compiled["rollout"] = phases.make_imagined_rollout(self.agent, self.config, self.mesh, rows)
        key = jax.random.fold_in(jax.random.fold_in(self.key, KEY_IMAGINE), self.progress.epoch)
        return self._compiled["rollout"](self._variables(), self.replay.device_replay(), key)

    def _record_evaluation(self, result: Dict[str, List], final: bool) -> None:
        p = self.progress
        mean = float(np.mean(result["returns"]))
        suite = scores.suite_of(self.config.env)
        record = {"epoch": p.epoch, "env_steps": self.replay.num_steps, "returns": result["returns"],
                  "lengths": result["lengths"], "mean_return": mean, "final": final}
        if self.is_writer:
            _append_evaluation(os.path.join(self.workdir, "evaluations.jsonl"), record)
        self.logger.scalars(self.replay.num_steps, {
            "test/return_mean": mean, "test/return_std": float(np.std(result["returns"])),
            "test/length_mean": float(np.mean(result["lengths"])),
            _SCORE_TAG[suite]: scores.normalized_score(suite, self.config.game, mean)})
        _log(logging.INFO, f"{'Final evaluation' if final else 'Evaluation'} at epoch {p.epoch}: mean return "
             f"{mean:.2f} over {len(result['returns'])} episodes")

    def _final_evaluation(self) -> None:
        self._save_agent()
        result = self._test_episodes(self.config.collection.test.num_final_episodes)
        self._record_evaluation(result, final=True)
        mean = float(np.mean(result["returns"]))
        suite = scores.suite_of(self.config.env)
        results = {
            "suite": suite, "game": self.config.game, "seed": self.config.seed, "env_steps": self.replay.num_steps,
            "max_episode_steps": self.config.env.max_episode_steps, "returns": result["returns"],
            "lengths": result["lengths"], "mean_return": mean,
            "normalized_score": scores.normalized_score(suite, self.config.game, mean),
            **paper.marker(self.config),
        }
        if suite == "atari100k":
            results["human_normalized_score"] = results["normalized_score"]
        self._final_results = results
        if self.is_writer:
            tmp = os.path.join(self.workdir, "results.json.tmp")
            with open(tmp, "w") as f:
                json.dump(results, f, indent=2)
            os.replace(tmp, os.path.join(self.workdir, "results.json"))

    def _results(self) -> Dict[str, Any]:
        if self._final_results is None:  # the run had finished before this process started
            with open(os.path.join(self.workdir, "results.json")) as f:
                self._final_results = json.load(f)
        return self._final_results


def _bar(total: int, desc: str, unit: str, initial: int = 0) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False)


def _log(level: int, message: str) -> None:
    """A log line that does not glue onto a progress bar: tqdm clears and redraws its bars around it."""
    with tqdm.external_write_mode(file=sys.stderr):
        logging.log(level, message)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _append_evaluation(path: str, record: Dict[str, Any]) -> None:
    """Appends one evaluation, replacing a record of the same evaluation left by a run that was stopped and
    resumed (it computed the same numbers)."""
    lines = []
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.strip()]
    key = (record["epoch"], record["final"])
    lines = [line for line in lines if (json.loads(line)["epoch"], json.loads(line)["final"]) != key]
    lines.append(json.dumps(record) + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def _collector_to_json(state: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in state.items()}


def _collector_from_json(state: Dict[str, Any]) -> Dict[str, Any]:
    arrays = {"key": np.uint32, "acts": np.int32, "hx": np.float32, "cx": np.float32, "ep_return": np.float64,
              "ep_length": np.int64}
    return {k: np.asarray(v, arrays[k]) if k in arrays else v for k, v in state.items()}
