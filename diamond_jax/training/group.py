"""Several seeds of one game in one process: a seed group (`--config.seeds=0,1,2,3,4`).

Each seed is a whole run of its own in `<workdir>/seed_<s>/` (config.json with that seed, replay, checkpoints,
evaluations.jsonl, results.json, TensorBoard, agent): a `Trainer` in managed mode collects its data, plays its
test episodes, writes its files and can even be resumed alone later as a single run. The group drives them
through the same schedule and trains the models of all its seeds in one compiled program per phase: parameters,
optimiser states, imagination states, replays and keys are stacked on a leading seed axis and every phase is
vmapped over it (training/phases.py), so that each kernel does the work of all the seeds at the cost of one
launch. On a CPU, where XLA runs vmapped convolutions of different weights about twice as slowly as the seeds
one by one (docs/benchmarks.md), `training.seed_loop = "auto"` calls each seed's own program instead, seed after
seed and call by call, so that the seeds still advance together.

Mesh: every device holds every seed (the seed axis is replicated), and each seed's batch axis is split over the
data axis exactly as a single run's is. Seed groups are meant to fill one accelerator; a data axis over several
devices still works as for one seed, and a seed axis over devices would need the seeds' replays on different
devices, which the sampling inside the phases cannot do.

Seeds whose initial collection was longer (it lasts until rewards are frequent enough) collect in fewer epochs
and finish earlier; the group goes on with the others, compiling its programs for the smaller group.

A group computes what its seeds' single runs compute: the same collections, keys and updates, vmapped. XLA may
sum a vmapped program's gradients in another order, so parameters agree to float32 rounding (a few units in
the last place per update), not bit for bit; tests/test_group.py checks a debug group against its single runs.
"""

import logging
import os
import signal
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from diamond_jax.agent import MODEL_NAMES
from diamond_jax.data.replay import DeviceReplay
from diamond_jax.training import parallel, phases
from diamond_jax.training.loop import KEY_MODEL, LOSS, PHASES, NonFiniteLoss, Preempted, Trainer, _bar, _log
from diamond_jax.training.workdir import open_workdir

SEED_DIR = "seed_{}"  # a seed's run directory inside the group's


def seed_config(config: config_dict.ConfigDict, seed: int) -> config_dict.ConfigDict:
    """The single-seed config of one seed of a group: what its run computes."""
    c = config.copy_and_resolve_references()
    c.seed, c.seeds = seed, ()
    return c


def stack(trees: List[Any]) -> Any:
    """Pytrees of the same structure stacked on a new leading axis."""
    return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def unstack(tree: Any, n: int) -> List[Any]:
    return [jax.tree.map(lambda x: x[i], tree) for i in range(n)]


def stack_replays(replays: List[DeviceReplay]) -> DeviceReplay:
    """The seeds' device replays on a leading axis, each padded to the largest capacities. Padding slots and
    episode rows are zeros, which sampling never reads (an episode row past num_episodes weighs 0), so a seed
    draws from the stacked replay exactly what it draws from its own."""
    cap = max(r.frames.shape[1] for r in replays)
    ep_cap = max(r.ep_length.shape[0] for r in replays)

    def pad(x: jax.Array, axis: int, size: int) -> jax.Array:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, size - x.shape[axis])
        return jnp.pad(x, widths)

    padded = [DeviceReplay(*(pad(x, 1, cap) for x in r[:5]), *(pad(x, 0, ep_cap) for x in r[5:8]), r.num_episodes)
              for r in replays]
    return stack(padded)


def use_vmap(seed_loop: str, platform: str) -> bool:
    """Whether a group trains its seeds in one vmapped program (config.training.seed_loop)."""
    if seed_loop == "auto":
        return platform != "cpu"
    return seed_loop == "vmap"


class GroupTrainer:
    """Trains config.seeds as one group; run() returns {seed: results}."""

    def __init__(self, config: config_dict.ConfigDict, workdir: str, mesh=None):
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.seeds = tuple(config.seeds)
        self.is_writer = jax.process_index() == 0
        self.lock = open_workdir(self.workdir, config, lock=self.is_writer)
        self.mesh = mesh or parallel.make_mesh(config.num_devices)
        self.members: List[Trainer] = []
        try:
            for seed in self.seeds:
                self.members.append(Trainer(seed_config(config, seed), os.path.join(self.workdir, SEED_DIR.format(seed)),
                                            mesh=self.mesh, managed=True))
            self._check_aligned()
        except BaseException:
            self.close()
            raise
        self._compiled: Dict[Any, Any] = {}
        self.vmap = use_vmap(config.training.seed_loop, self.mesh.devices.flat[0].platform)
        self._stop_requested = False
        self._last_save = time.monotonic()

    def _active(self) -> List[Trainer]:
        return [m for m in self.members if not m.progress.finished]

    def _check_aligned(self) -> None:
        """The unfinished seeds stand at the same point of the schedule (they are saved together)."""
        points = {m.config.seed: (m.progress.epoch, m.progress.phase, m.progress.phase_step) for m in self._active()}
        if len(set(points.values())) > 1:
            raise RuntimeError(
                f"The seeds of the group in {self.workdir} were saved at different points ({points}): the process "
                "was stopped while it saved them. Fix: resume each seed alone as a single run (python -m "
                f"diamond_jax.main --config=<the seed's config.json> --workdir={self.workdir}/seed_<s>).")

    # ---- Stops and saves, for all the seeds at once.

    def request_stop(self, signum=None, _frame=None) -> None:
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        _log(logging.WARNING, f"{signal.Signals(signum).name if signum else 'A stop'} received: the group saves its "
             "seeds after the update in progress and exits (status 75); run the same command to resume.")
        self._stop_requested = True

    def save(self) -> None:
        for m in self.members:
            if not m.progress.finished:
                m.save()
        self._last_save = time.monotonic()

    def _maybe_stop_or_save(self) -> bool:
        """Whether the caller must hand its stacked state back to the seeds and save (and then stop)."""
        minutes = self.config.checkpoint.every_minutes
        due = bool(minutes) and time.monotonic() - self._last_save > 60 * minutes
        stop, due = parallel.any_process([self._stop_requested, due])
        return stop or due

    def _save_or_stop(self) -> None:
        stop = parallel.any_process([self._stop_requested])[0]
        self.save()
        if stop:
            raise Preempted(f"saved the {len(self.seeds)} seeds of the group in {self.workdir}")

    # ---- The schedule.

    def run(self) -> Dict[int, Dict[str, Any]]:
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self._active():
                if self._maybe_stop_or_save():
                    self._save_or_stop()
                active = self._active()
                phase = active[0].progress.phase
                if active[0].progress.epoch >= 1 and phase in MODEL_NAMES:
                    self._train(active, phase)
                else:
                    for m in active:  # collection, test episodes and the epoch's end: each seed on its own
                        m._run_phase()
                self._check_aligned()
            return {m.config.seed: m._results() for m in self.members}
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()

    def close(self) -> None:
        for m in self.members:
            m.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _phase_fn(self, name: str, num_steps: int, num_seeds: Optional[int]):
        """The phase's program for num_seeds stacked seeds, or (None) for one seed."""
        key = (name, num_steps, num_seeds)
        if key not in self._compiled:
            m = self.members[0]
            self._compiled[key] = phases.make_phase(m.agent, m.config, name, m.optimizers[name], self.mesh, num_steps,
                                                    m._scan, num_seeds=num_seeds)
        return self._compiled[key]

    def _train(self, active: List[Trainer], name: str) -> None:
        """One model's phase of the epoch for every active seed: in one vmapped program, or seed after seed."""
        first = active[0]
        epoch, n_seeds, t = first.progress.epoch, len(active), self.config[name].training
        total = t.steps_first_epoch if epoch == 1 else t.steps_per_epoch
        replays = [m.replay.device_replay() for m in active]
        if name == "actor_critic" and not first.progress.imagination_started and total > 0:
            for m, replay in zip(active, replays):
                m._start_imagination(replay)
        keys = [jax.random.fold_in(jax.random.fold_in(m.key, KEY_MODEL[name]), epoch) for m in active]
        states = [m.state["models"][name] for m in active]
        imagined = [m.state["imagined"] for m in active]
        world_model = [{k: m.state["models"][k].variables() for k in ("denoiser", "rew_end_model")} for m in active]
        if self.vmap:
            rep, data = parallel.replicated(self.mesh), parallel.seeds_data_sharded(self.mesh)
            replay = parallel.place(stack_replays(replays), rep)
            keys, states = parallel.place(jnp.stack(keys), rep), parallel.place(stack(states), rep)
            if name == "actor_critic":
                imagined, world_model = parallel.place(stack(imagined), data), parallel.place(stack(world_model), rep)

        def call(fn, state, imagined_, world_model_, replay_, key, step):
            if name == "actor_critic":
                return fn(state, imagined_, world_model_, replay_, key, jnp.int32(step))
            state, metrics = fn(state, replay_, key, jnp.int32(step))
            return state, imagined_, metrics

        bar = _bar(total, f"Epoch {epoch}/{max(m.num_epochs for m in active)} {name} ({n_seeds} seeds)", "update",
                   initial=first.progress.phase_step)
        started, done = time.monotonic(), 0

        def hand_back():
            for i, m in enumerate(active):
                m.state["models"][name] = jax.tree.map(lambda x: x[i], states) if self.vmap else states[i]
                if name == "actor_critic":
                    m.state["imagined"] = jax.tree.map(lambda x: x[i], imagined) if self.vmap else imagined[i]

        while first.progress.phase_step < total:
            step = first.progress.phase_step
            n = min(self.config.training.steps_per_call, total - step) if first._scan else 1
            if self.vmap:
                states, imagined, metrics = call(self._phase_fn(name, n, n_seeds), states, imagined, world_model,
                                                 replay, keys, step)
            else:
                fn, outs = self._phase_fn(name, n, None), []
                for i in range(n_seeds):
                    outs.append(call(fn, states[i], imagined[i], world_model[i], replays[i], keys[i], step))
                states, imagined, metrics = [o[0] for o in outs], [o[1] for o in outs], stack([o[2] for o in outs])
            losses = np.asarray(jax.device_get(metrics[LOSS[name]]))  # [seeds, n]
            for i, m in enumerate(active):
                if not np.isfinite(losses[i]).all():
                    bad = int(np.argmin(np.isfinite(losses[i])))
                    raise NonFiniteLoss(
                        f"Seed {m.config.seed}: the {name} loss became {losses[i, bad]} at update {step + bad} of "
                        f"epoch {epoch}. The group stopped without saving; the last good checkpoints are in "
                        f"{self.workdir}/seed_*/checkpoints. Fix: lower --config.{name}.optimizer.lr or check the "
                        "data, then resume.")
            for i, (m, means) in enumerate(zip(active, unstack(metrics, n_seeds))):
                means = phases.mean_metrics(means)
                updates = int(states.step[i]) if self.vmap else int(states[i].step)
                m.logger.scalars(updates, {**means, "env_steps": m.replay.num_steps}, prefix=f"{name}/train/")
            for m in active:
                m.progress.phase_step += n
            done += n
            bar.update(n)
            bar.set_postfix_str(f"{LOSS[name]}={float(losses.mean()):.4g} (mean over seeds)", refresh=False)
            if first.progress.phase_step < total and self._maybe_stop_or_save():
                hand_back()
                self._save_or_stop()
        bar.close()
        hand_back()
        for m in active:
            m.progress.phase, m.progress.phase_step = PHASES[PHASES.index(name) + 1], 0
        if done:
            _log(logging.INFO, f"Epoch {epoch} {name}: {done} updates of {n_seeds} seeds in "
                 f"{time.monotonic() - started:.1f} s")
