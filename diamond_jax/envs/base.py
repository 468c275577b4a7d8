"""What every environment backend gives: a batch of `num_envs` environments stepped together on uint8 RGB
frames. `diamond_jax.envs.make_env(config, ...)` picks the backend; nothing else constructs one."""

from typing import NamedTuple, Protocol, Tuple

import numpy as np


class EnvStep(NamedTuple):
    """The outcome of one agent step of every env."""

    obs: np.ndarray  # uint8 [n, h, w, 3]: the frame to act on next (a new episode's first frame after a reset)
    final_obs: np.ndarray  # uint8 [n, h, w, 3]: the frame reached by this step (the episode's last when it ended)
    rew: np.ndarray  # float32 [n], raw
    end: np.ndarray  # bool [n]: the episode ended (game over, or a life loss in an env with done_on_life_loss)
    trunc: np.ndarray  # bool [n]: the episode reached max_episode_steps
    lives: np.ndarray  # int32 [n], after this step (before any reset); 0 in games without lives


class Env(Protocol):
    """A batch of environments. Every `step` is one agent step of every env: an env whose episode ends is
    reset within the same call, `EnvStep.final_obs` keeping the finished episode's last frame."""

    num_envs: int
    num_actions: int
    action_names: Tuple[str, ...]

    def reset(self) -> np.ndarray:
        """Starts a new episode in every env; returns their first frames, uint8 [n, h, w, 3]."""

    def step(self, act: np.ndarray) -> EnvStep:
        """One action per env, int [n]."""


def check_actions(act: np.ndarray, num_envs: int) -> np.ndarray:
    act = np.asarray(act, dtype=np.int32)
    if act.shape != (num_envs,):
        raise ValueError(f"expected one action per env, shape ({num_envs},), got {act.shape}")
    return act
