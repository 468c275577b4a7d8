"""Watching a world model of recorded play (a --workdir of python -m diamond_jax.world_model): what the dream
and play tools (diamond_jax/dream.py, play.py) do for such a run.

- Starts: every rollout starts from a real context, num_steps_conditioning consecutive frames of a test episode
  of the run's dataset (the episode and the window drawn with the seed) and the actions recorded on all of them
  but the last; the action taken on the last context frame is the first one played.
- Actions played (--actions): `episode`, those recorded after the context, so that the real frames that followed
  can be shown beside the drawn ones; `random`, drawn for the action kind (dream only); or an actions file,
  PATH.npy or PATH.csv in the layout the dataset importer reads (data/importers.py), one row per step.
- Keyboard (play): a discrete action set of at most len(NUMBERED_KEYS) actions is played with keys, Atari
  action names with the RL play tool's (w a s d, space), others with NUMBERED_KEYS; a multi-hot action's
  components (as many) are toggled by NUMBERED_KEYS; continuous actions come from --actions only.
- What is shown: the upsampler's full-resolution frames when the run has one, else the denoiser's.
- Recovery (--recovery, a denoiser trained with interpolation): drift is detected as frames are drawn and
  recovered from by interpolating toward the nearest frame of a buffer of training frames (world_model/drift.py,
  its DriftConfig's thresholds); dream then also writes drift.json, the detections and recovered frames per row.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from diamond_jax.comparison import Comparison, comparison_video, write_psnr
from diamond_jax.world_model.metrics import psnr
from diamond_jax.data import importers
from diamond_jax.data.recorded import ActionSpec, DatasetError, RecordedDataset
from diamond_jax.envs.games import ATARI_ACTION_NAMES
from diamond_jax.play_env import (
    HeldKeys, ImaginedPlayEnv, PlayControls, PlaySession, Transition, UsageError, action_keys, key_table, keymap,
    noop_action, to_frame)
from diamond_jax.video import grid, upscale, write_video
from diamond_jax.world_model import drift
from diamond_jax.world_model.model import Frames, advance
from diamond_jax.world_model.run import DATASET_FILE, LoadedRun, load_run

EPISODE, RANDOM = "episode", "random"  # the --actions that are not files
# Keys of numbered actions and components: none is an Atari action key or a control of the play tool (its 0
# is the unlimited horizon, hence 1..9 then letters).
NUMBERED_KEYS = tuple("123456789") + tuple("fghjklzxc")


def is_world_model_run(workdir: str) -> bool:
    """Whether the dream and play tools take --workdir as a world model of recorded play: only its training
    writes dataset.json there, an RL run never does."""
    return os.path.isfile(os.path.join(workdir, DATASET_FILE))


class Watched(NamedTuple):
    run: LoadedRun
    dataset: RecordedDataset


class Sampling(NamedTuple):
    """How the tools sample a world model: its config's guidance weight or this one, or unconditionally."""

    guidance_scale: Optional[float] = None
    unconditional: bool = False


# Options of the dream and play tools that only a world model of recorded play takes.
WORLD_MODEL_FLAGS = ("actions", "dataset", "guidance_scale", "unconditional", "recovery")


def add_sampling_flags(parser, recovery_writes: str = "") -> None:
    """The dream and play tools' flags for how a world model of recorded play is sampled (argparse)."""
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="world-model runs: classifier-free guidance weight w of the sampler (default: the run's "
                             "sampler.guidance_scale); w > 0 needs a model trained with denoiser.condition_dropout > 0")
    parser.add_argument("--unconditional", action="store_true",
                        help="world-model runs: draw every frame on the denoiser's null inputs (a model trained with "
                             "condition_dropout > 0): with condition_dropout_target=actions an action-free video "
                             "model, with 'all' frames drawn from no context")
    parser.add_argument("--recovery", action="store_true", default=None,
                        help="world-model runs trained with interpolation: detect drift and recover by "
                             f"interpolating toward a dataset frame (README 'Long rollouts'){recovery_writes}")


def sampling(args) -> Sampling:
    return Sampling(args.guidance_scale, args.unconditional)


def refuse_world_model_flags(args) -> None:
    """UsageError naming the first world-model-only flag given for an RL run (args.workdir)."""
    for name in WORLD_MODEL_FLAGS:
        if getattr(args, name) not in (None, False):
            raise UsageError(f"--{name} is for world models of recorded play, and {args.workdir} holds an RL run "
                             f"(no {DATASET_FILE}). Fix: drop --{name}.")


def open_run(workdir: str, dataset_path: Optional[str] = None, sampling: Sampling = Sampling()) -> Watched:
    """The run's newest checkpoint and its dataset (at dataset_path, where it moved), checked to match."""
    try:
        run = load_run(workdir, *sampling)
    except ValueError as error:
        raise UsageError(str(error)) from error
    path = dataset_path or run.dataset["path"]
    try:
        dataset = RecordedDataset.open(path)
    except DatasetError as error:
        moved = "" if dataset_path else " If the dataset moved, pass its new path with --dataset=PATH."
        raise UsageError(f"cannot open the dataset of the world model in {workdir}: {error}{moved}") from error
    trained = (run.dataset["frame_shape"], run.dataset["action"])
    found = (list(dataset.frame_shape), dataset.action.to_json())
    if found != trained:
        raise UsageError(f"the dataset {dataset.path} has frames {found[0]} and actions {found[1]}, but the world "
                         f"model in {workdir} was trained on frames {trained[0]} and actions {trained[1]}. Fix: "
                         f"pass --dataset=<the dataset it was trained on>.")
    return Watched(run, dataset)


def draw_starts(dataset: RecordedDataset, rng: np.random.Generator, count: int, length: int,
                fix: str) -> List[Tuple[int, int]]:
    """`count` windows of `length` frames in test episodes, as (episode, first frame): an episode drawn uniformly
    among those long enough, then its first frame."""
    ids, lengths = np.array(dataset.episode_ids("test"), np.int64), dataset.lengths("test")
    eligible = np.flatnonzero(lengths >= length)
    if not len(eligible):
        raise UsageError(f"no test episode of {dataset.path} has {length} frames (the longest has "
                         f"{int(lengths.max(initial=0))}). Fix: {fix}")
    chosen = rng.choice(eligible, size=count)
    starts = rng.integers(0, lengths[chosen] - length + 1)
    return list(zip(ids[chosen].tolist(), starts.tolist()))


def random_actions(dataset: RecordedDataset, rng: np.random.Generator, shape: Tuple[int, ...]) -> np.ndarray:
    """Actions [*shape(, size)] drawn uniformly for the dataset's kind: discrete indices, multi-hot components
    each 0 or 1, or continuous components between the least and greatest the training episodes recorded (the
    only range of them known)."""
    spec = dataset.action
    if spec.kind == "discrete":
        return rng.integers(0, spec.size, shape).astype(np.int32)
    if spec.kind == "multi_hot":
        return rng.integers(0, 2, shape + (spec.size,)).astype(np.float32)
    recorded = np.concatenate([dataset.episode(e).act for e in dataset.episode_ids("train")])
    return rng.uniform(recorded.min(axis=0), recorded.max(axis=0), shape + (spec.size,)).astype(np.float32)


def _layout(spec: ActionSpec) -> str:
    names = f" ({', '.join(spec.names)})" if spec.names else ""
    if spec.kind == "discrete":
        return f"an action index in [0, {spec.size}){names}: a column 'action' (.csv) or int [T] (.npy)"
    columns = "key_<name>" if spec.kind == "multi_hot" else "axis_<name>"
    values = "0 or 1" if spec.kind == "multi_hot" else "a number"
    return f"{spec.size} components{names}, each {values}: columns {columns} (.csv) or [T, {spec.size}] (.npy)"


def read_actions(path: str, spec: ActionSpec) -> np.ndarray:
    """An actions file as the dataset stores actions, int32 [T] or float32 [T, size]; UsageError where it does
    not fit the spec."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".csv", ".npy"):
        raise UsageError(f"--actions={path} is neither {EPISODE}, {RANDOM} nor an actions file (.csv or .npy). "
                         f"Fix: one of those, e.g. --actions=steps.csv.")
    try:
        # An .npy file of vectors does not say their kind: take the dataset's (a discrete dataset refuses them).
        log = (importers.read_actions_csv(path) if extension == ".csv" else
               importers.read_actions_npy(path, "continuous" if spec.kind == "discrete" else spec.kind))
    except DatasetError as error:
        raise UsageError(f"--actions={path}: {error}") from error
    if not len(log.values):
        raise UsageError(f"--actions={path} holds no step. Fix: one row per step.")
    kind = "multi_hot" if log.layout == "discrete_keys" else log.layout
    values, components = log.values, log.columns
    if log.layout == "discrete_keys":
        # Several discrete keys, each one-hot over the values the dataset named <key>=<value>.
        sizes = np.array([sum(n.startswith(f"{c}=") for n in spec.names) for c in log.columns])
        components = tuple(f"{c}={v}" for c, size in zip(log.columns, sizes) for v in range(size))
    what = f"the components {', '.join(log.columns)}" if log.columns else f"actions of shape {values.shape}"
    if kind != spec.kind or (components and spec.names and components != spec.names) or (
            kind != "discrete" and len(components or values[0]) != spec.size):
        raise UsageError(f"--actions={path} holds {what}, but the world model plays {spec.kind} actions. Fix: one "
                         f"row per step of {_layout(spec)}.")
    if log.layout == "discrete_keys":
        wrong = np.flatnonzero((values >= sizes).any(axis=1))
        if len(wrong):
            raise UsageError(f"--actions={path}: step {wrong[0]} is {values[wrong[0]].tolist()}, beyond the values "
                             f"of the keys {', '.join(spec.names)}. Fix: correct it.")
        values = importers.actions_of(log, sizes)
    if spec.kind == "discrete":
        bad, allowed = (values < 0) | (values >= spec.size), f"an index in [0, {spec.size})"
    elif spec.kind == "multi_hot":
        bad, allowed = ~np.isin(values, (0, 1)).all(axis=1), "components of 0 or 1"
    else:
        bad, allowed = ~np.isfinite(values).all(axis=1), "finite numbers"
    rows = np.flatnonzero(bad)
    if len(rows):
        raise UsageError(f"--actions={path}: step {rows[0]} (row {rows[0] + 1} after any header) is "
                         f"{values[rows[0]].tolist()}, not {allowed}. Fix: correct it.")
    return values.astype(np.int32 if spec.kind == "discrete" else np.float32)


def shown(frames: Frames) -> jax.Array:
    """The frames a person sees: full resolution where the run has an upsampler."""
    return frames.low if frames.full is None else frames.full


# ---- python -m diamond_jax.dream


def recovery_config(recovery: bool) -> drift.DriftConfig:
    return dataclasses.replace(drift.DriftConfig(), recovery=recovery)


def dream(workdir: str, num_steps: int, out: Optional[str] = None, fmt: str = "mp4", seed: int = 0, rows: int = 4,
          fps: float = 15.0, scale: int = 4, actions: str = EPISODE, dataset_path: Optional[str] = None,
          sampling: Sampling = Sampling(), recovery: bool = False) -> Dict[str, Any]:
    """Open-loop rollouts of num_steps steps from `rows` real contexts: imagination.<fmt> (the rows side by
    side), and with the episodes' own actions real_vs_imagined.<fmt> and the PSNR files. Returns the paths, the
    frames and the actions played (and the PSNR [rows, steps]). recovery: drift detection and recovery (module
    docstring), and drift.json."""
    run, dataset = open_run(workdir, dataset_path, sampling)
    model, n = run.model, run.model.num_steps_conditioning
    rng = np.random.default_rng(seed)
    compare = actions == EPISODE
    if actions == RANDOM:
        played = random_actions(dataset, rng, (rows, num_steps))
    elif not compare:
        script = read_actions(actions, dataset.action)
        if len(script) != num_steps:
            raise UsageError(f"--actions={actions} has {len(script)} steps but --steps={num_steps}. Fix: "
                             f"--steps={len(script)}, or one row per step in the file.")
        played = np.broadcast_to(script, (rows,) + script.shape)
    # With the episode's actions, its next num_steps frames are the real ones to compare with.
    length = n + num_steps if compare else n
    fix = (f"--steps={max(int(dataset.lengths('test').max(initial=0)) - n, 1)} or fewer" if compare
           else "record longer test episodes")
    starts = draw_starts(dataset, rng, rows, length, fix)
    obs = np.stack([dataset.episode(e).obs[s:s + length] for e, s in starts])
    act = np.stack([dataset.episode(e).act[s:s + length - 1] for e, s in starts])
    if not compare:
        act = np.concatenate([act, played], axis=1)
    context = jax.jit(model.frames)(jnp.asarray(obs[:, :n]), run.variables)
    scores = None
    if recovery:
        cfg = recovery_config(True)
        buffer = drift.sample_buffer(dataset, model, cfg.buffer_size, seed)
        try:
            drift.recovery_inputs(model, buffer, cfg)
        except ValueError as error:
            raise UsageError(f"--recovery: {error}") from error
        rollout = jax.jit(lambda v, k, c, a: drift.rollout(model, v, k, c, a, num_steps, buffer, cfg))
        drawn, scores = rollout(run.variables, jax.random.key(seed), context, jnp.asarray(act))
    else:
        rollout = jax.jit(model.rollout, static_argnums=(4,))
        drawn = rollout(run.variables, jax.random.key(seed), context, jnp.asarray(act), num_steps)
    # Every video starts with the last context frame, then shows one frame per step: num_steps + 1 frames.
    imagined = np.concatenate([to_frame(shown(context)[:, -1:]), to_frame(shown(drawn))], axis=1)
    out_dir = Path(out) if out else Path(workdir) / "dream"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"imagination": write_video(out_dir / f"imagination.{fmt}",
                                        grid([upscale(row, scale) for row in imagined]), fps)}
    result = {"paths": paths, "imagined": imagined, "act": act[:, n - 1:], "starts": starts}
    if scores is not None:
        summary = {"detections_per_row": np.asarray(scores.fired).sum(axis=1).tolist(),
                   "recovered_frames_per_row": np.asarray(scores.recovering).sum(axis=1).tolist(),
                   "config": dataclasses.asdict(recovery_config(True))}
        paths["drift"] = out_dir / "drift.json"
        paths["drift"].write_text(json.dumps(summary, indent=2))
        result["drift"] = summary
    if compare:
        real = to_frame(shown(jax.jit(model.frames)(jnp.asarray(obs[:, n - 1:]), run.variables)))
        comparison = Comparison(real, imagined, act[:, n - 1:])
        values = psnr(real[:, 1:], imagined[:, 1:])
        paths["real_vs_imagined"] = write_video(out_dir / f"real_vs_imagined.{fmt}",
                                                comparison_video(comparison, scale), fps)
        info = {"dataset": dataset.path, "episodes": [dataset.episode_name(e) for e, _ in starts],
                "first_frames": [s for _, s in starts], "seed": seed, "rows": rows, "steps": num_steps}
        paths.update(write_psnr(out_dir, values, info, os.path.basename(dataset.path)))
        result.update(comparison=comparison, psnr=values)
    return result


# ---- python -m diamond_jax.play


def logged(act: np.ndarray) -> Any:
    """An action as the session logs it: an int, or a tuple of floats."""
    return int(act) if act.ndim == 0 else tuple(float(x) for x in act)


class RecordedPlayEnv(ImaginedPlayEnv):
    """The world model as the play tool's env. Each episode starts from a real context and lasts `horizon`
    steps (0: no limit) or until the actions to play run out: those recorded after the context, or the rows of
    `script`. A human's action replaces the one to play; a reward or an end are never drawn (no such model)."""

    def __init__(self, run: LoadedRun, dataset: RecordedDataset, horizon: int, script: Optional[np.ndarray] = None,
                 recovery: bool = False):
        self.run, self.dataset, self.horizon, self.script = run, dataset, horizon, script
        self._step = jax.jit(run.model.step)
        self.drift_state: Optional[drift.DriftState] = None
        self._drift_step = None
        if recovery:  # drift detection and recovery (world_model/drift.py), the state carried across steps
            cfg = recovery_config(True)
            inputs = drift.recovery_inputs(run.model, drift.sample_buffer(dataset, run.model, cfg.buffer_size, 0),
                                           cfg)
            self.drift_config = cfg
            self._drift_step = jax.jit(lambda v, state, window, key: drift.step(run.model, v, cfg, inputs, state,
                                                                              window, key))
        self._frames = jax.jit(run.model.frames)
        self.context: Optional[Frames] = None
        self.past: Optional[np.ndarray] = None  # the actions on the context's frames but the last
        self.to_play: Optional[np.ndarray] = None
        self.t = 0

    def reset(self, key: jax.Array) -> None:
        n = self.run.model.num_steps_conditioning
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
        ((e, s),) = draw_starts(self.dataset, rng, 1, n, "record longer test episodes")
        episode = self.dataset.episode(e)
        self.context = self._frames(jnp.asarray(episode.obs[s:s + n])[None], self.run.variables)
        self.past = episode.act[s:s + n - 1]
        self.to_play = episode.act[s + n - 1:] if self.script is None else self.script
        self.t = 0
        if self._drift_step is not None:
            self.drift_state = drift.init_state(self.context, self.drift_config)

    @property
    def frame(self) -> np.ndarray:
        return to_frame(shown(self.context)[0, -1])

    def draw(self, key: jax.Array, window: np.ndarray) -> Frames:
        """The world model's frame after the context and its n actions, `window` (recovered, with recovery)."""
        if self._drift_step is None:
            return self._step(self.run.variables, key, self.context, jnp.asarray(window)[None])
        self.drift_state, (frame, _) = self._drift_step(self.run.variables, self.drift_state,
                                                        jnp.asarray(window)[None], key)
        return frame

    def step(self, human_act: Any, key: jax.Array) -> Transition:
        act = self.to_play[self.t] if human_act is None else np.asarray(human_act, self.to_play.dtype)
        window = np.concatenate([self.past, act[None]])
        self.context = advance(self.context, self.draw(key, window))
        self.past = window[1:]
        self.t += 1
        return Transition(logged(act), 0.0, False, self.at_horizon() or self.t >= len(self.to_play))


class ToggledKeys:
    """A multi-hot action under the human's keys: pressing a component's key flips it, until pressed again."""

    def __init__(self, keys: Sequence[str]):
        self.keys = list(keys)
        self.on = np.zeros(len(self.keys), np.float32)

    def __call__(self, held: Set[str], pressed: Set[str]) -> Tuple[float, ...]:
        del held  # a toggle needs no holding
        for i, key in enumerate(self.keys):
            if key in pressed:
                self.on[i] = 1.0 - self.on[i]
        return logged(self.on)


def controls(spec: ActionSpec, frame_shape: Tuple[int, int], title: str, source: str) -> PlayControls:
    """The keys of the dataset's actions, where the keyboard can play them."""
    names = spec.names or tuple(f"{'action' if spec.kind == 'discrete' else 'component'} {i}"
                                for i in range(spec.size))
    if spec.kind == "discrete":
        act_name = lambda act: names[act]  # noqa: E731
    elif spec.kind == "multi_hot":
        act_name = lambda act: "+".join(n for n, on in zip(names, act) if on) or "none"  # noqa: E731
    else:
        act_name = lambda act: " ".join(f"{x:+.2f}" for x in act)  # noqa: E731
    if spec.kind == "discrete" and set(spec.names) and set(spec.names) <= set(ATARI_ACTION_NAMES):
        return PlayControls(frame_shape, HeldKeys(keymap(names), noop_action(names)), act_name, key_table(
            f"{title}: {spec.size} actions, the keys to hold under human control (m):",
            [(name, action_keys(name)) for name in names]))
    if spec.kind != "continuous" and spec.size <= len(NUMBERED_KEYS):
        keys = NUMBERED_KEYS[:spec.size]
        if spec.kind == "discrete":
            key_action = HeldKeys({(key,): i for i, key in enumerate(keys)}, noop_action(names))
            text = (f"{title}: {spec.size} actions, the keys to hold under human control (m); with none held, "
                    f"{names[noop_action(names)]}:")
        else:
            key_action = ToggledKeys(keys)
            text = f"{title}: a multi-hot action of {spec.size} components, a key toggles each under human control (m):"
        return PlayControls(frame_shape, key_action, act_name, key_table(text, list(zip(names, zip(keys)))))
    return PlayControls(frame_shape, None, act_name, no_keyboard(spec, title, source) + " The controls below work, "
                        "but m (human control).")


def no_keyboard(spec: ActionSpec, title: str, source: str) -> str:
    return (f"{title}: {spec.kind} actions of size {spec.size}, which the keyboard cannot play (it plays discrete "
            f"actions and multi-hot components, at most {len(NUMBERED_KEYS)}): the actions played are --actions="
            f"{source}.")


def play_session(workdir: str, seed: int, horizon: int, human: bool, actions: str = EPISODE,
                 dataset_path: Optional[str] = None, sampling: Sampling = Sampling(),
                 recovery: bool = False) -> Tuple[PlaySession, PlayControls]:
    """The play tool's session inside a world model of recorded play: one env, the world model."""
    run, dataset = open_run(workdir, dataset_path, sampling)
    if actions == RANDOM:
        raise UsageError(f"--actions={RANDOM} is for python -m diamond_jax.dream. Fix: --actions={EPISODE} or an "
                         "actions file.")
    script = None if actions == EPISODE else read_actions(actions, dataset.action)
    title = os.path.basename(dataset.path)
    frame_shape = tuple(run.model.upsampler.size if run.model.upsampler else run.model.resolution)
    play_controls = controls(dataset.action, frame_shape, title, actions)
    if human and play_controls.key_action is None:
        raise UsageError(no_keyboard(dataset.action, title, actions) + " Fix: drop --human (use --script for the "
                         "controls, --actions for the actions).")
    try:
        env = RecordedPlayEnv(run, dataset, horizon, script, recovery)
    except ValueError as error:
        raise UsageError(f"--recovery: {error}") from error
    return PlaySession([env], jax.random.key(seed), human=human), play_controls
