"""Datasets of recorded play (data/recorded.py) from the project's environments: a training run's replay, with
its game's action names (`import_replay`), and real play recorded now (`record`): whole episodes played through
`envs.make_env` by a policy, at full resolution for Atari (210x160 RGB, unresized), with the game's action
names, rewards and ends. The default policy plays uniformly random actions held for a while (`StickyRandom`),
which moves the game far more than switching every step does.

Episodes follow the config's test rules (no end at a life loss). An episode keeps the frames acted on and
their actions: the frame after the last step, which no action follows, is left out (data/recorded.py).
"""

import json
import os
from typing import Callable, Optional, Tuple

import numpy as np
from ml_collections import config_dict
from tqdm import tqdm

from diamond_jax.data.importers import progress
from diamond_jax.data.recorded import ActionSpec, DatasetError, DatasetWriter, RecordedDataset
from diamond_jax.data.replay import ReplayDataset
from diamond_jax.envs import action_names, make_env, num_actions, steps_per_second
from diamond_jax.envs.atari import ATARI_FRAME_SHAPE

Policy = Callable[[np.ndarray], int]  # a frame uint8 [h, w, 3] -> the action to take on it


class StickyRandom:
    """Uniformly random actions, each step repeating the previous action with probability `repeat`."""

    def __init__(self, num_actions: int, rng: np.random.Generator, repeat: float = 0.75):
        self.num_actions, self.rng, self.repeat = num_actions, rng, repeat
        self._previous: Optional[int] = None

    def __call__(self, obs: np.ndarray) -> int:
        if self._previous is None or self.rng.random() >= self.repeat:
            self._previous = int(self.rng.integers(self.num_actions))
        return self._previous


def play_episode(env, policy: Policy, max_steps: Optional[int]) -> Tuple[np.ndarray, ...]:
    """(obs, act, rew, end) of one episode from a fresh reset of a single env, cut after max_steps steps."""
    obs, act, rew, end = [env.reset()[0]], [], [], []
    while True:
        act.append(policy(obs[-1]))
        step = env.step(np.array([act[-1]], np.int32))
        rew.append(step.rew[0])
        end.append(step.end[0])
        if step.end[0] or step.trunc[0] or len(act) == max_steps:
            return np.stack(obs), np.array(act, np.int32), np.array(rew, np.float32), np.array(end, bool)
        obs.append(step.obs[0])


def record(config: config_dict.ConfigDict, out: str, episodes: int, max_steps: Optional[int] = None, seed: int = 0,
           policy: Optional[Policy] = None, test_fraction: float = 0.1, overwrite: bool = False) -> RecordedDataset:
    """Plays `episodes` episodes of config.game with `policy` (StickyRandom seeded by `seed` by default) and
    writes them to `out`. The env is seeded by `seed` too, so a seed gives the same dataset."""
    if episodes < 1 or (max_steps is not None and max_steps < 1):
        raise ValueError(f"episodes={episodes} and max_steps={max_steps} must be positive")
    atari = config.env.get("backend", "envpool") == "envpool"
    env = make_env(config, 1, train=False, seed=seed, frame_shape=ATARI_FRAME_SHAPE if atari else None)
    policy = policy or StickyRandom(env.num_actions, np.random.default_rng(seed))
    spec = ActionSpec("discrete", env.num_actions, env.action_names)
    source = f"{config.game} played by {type(policy).__name__} (seed {seed}) through diamond_jax.envs"
    with DatasetWriter(out, spec, steps_per_second(config), test_fraction, seed, source, overwrite) as writer:
        for e in tqdm(range(episodes), desc=f"recording {config.game}", unit="episode", dynamic_ncols=True,
                      leave=False):
            writer.add_episode(*play_episode(env, policy, max_steps), name=f"{config.game} episode {e}")
        return writer.commit()


def import_replay(workdir: str, out: str, test_fraction: float = 0.1, seed: int = 0,
                  overwrite: bool = False) -> RecordedDataset:
    """The episodes of a training run's replay dataset (read without changing it, also while the run goes on),
    with the game's action names. An episode of L steps has L + 1 frames in the replay; the last one, which no
    action follows, is left out (as a video's frame after its last action row would be). Episodes cut by a
    time limit or still in progress simply have no end."""
    config = _run_config(workdir)
    try:
        replay = ReplayDataset.load(os.path.join(workdir, "replay"), read_only=True)
    except (FileNotFoundError, ValueError) as error:
        raise DatasetError(f"{error}. --src must be a training run's directory (it holds replay/).") from error
    spec = ActionSpec("discrete", num_actions(config), action_names(config))
    if replay.num_steps == 0:
        raise DatasetError(f"the replay of {workdir} holds no step yet. Fix: run the training longer.")
    source = f"replay of {os.path.abspath(workdir)} ({config.game})"
    with DatasetWriter(out, spec, steps_per_second(config), test_fraction, seed, source, overwrite) as writer:
        for e in progress(range(replay.num_episodes), "importing the replay"):
            ep = replay.episode(e)
            steps = len(ep["act"])
            if steps:  # an episode just started has its first frame only, and no action yet
                writer.add_episode(ep["obs"][:steps], ep["act"], ep["rew"], ep["end"], name=f"replay episode {e}")
        return writer.commit()


def _run_config(workdir: str) -> config_dict.ConfigDict:
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            return config_dict.ConfigDict(json.load(f))
    except FileNotFoundError:
        raise DatasetError(f"{workdir} has no config.json. Fix: --src must be a training run's directory (it holds "
                           "config.json and replay/).") from None
    except ValueError as error:
        raise DatasetError(f"{path} is not readable JSON ({error}).") from error
