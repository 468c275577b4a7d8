"""Atari environments over envpool with DIAMOND's preprocessing.

Every preprocessing option of envpool is set explicitly from `config.env`, because envpool's defaults
(84x84 grayscale, a stack of 4 frames, fire reset) are not DIAMOND's. Options with no config field are
fixed to DIAMOND's choice: RGB, no frame stack, raw rewards, no fire reset. envpool always max-pools the
last two emulator frames of each agent step (it has no option to turn this off), and
`use_inter_area_resize=True` selects OpenCV's area interpolation.

envpool behaviours this wrapper relies on or works around (pinned by tests/test_atari.py):

- Auto-reset. When an env reports done, envpool resets it on the next call that steps it: that call
  ignores the action, returns the new episode's first frame (elapsed_step 0, full lives) and is not an
  agent step. So that every `AtariEnv.step` is one agent step for every env (as with gymnasium's
  same-step auto-reset in the official code), the wrapper resets finished envs itself, right away, with
  `reset(env_id)`, which envpool accepts for a subset of envs in sync mode; `EnvStep.final_obs` keeps the
  finished episode's real last frame and `EnvStep.obs` is the new episode's first frame.
- Life loss. envpool's `episodic_life=True` reports done on a life loss and then, on the next call, does
  a "soft reset": the game goes on with one fewer life, but the agent's action is ignored and 1 to
  noop_max NOOP frames are played. The official code instead ends only the training episode and lets the
  agent act at once from the frame after the life loss. We never use envpool's episodic_life: the wrapper
  compares `info["lives"]` across steps and, when `done_on_life_loss` (training envs), sets `end` on a life
  loss while the emulator keeps running, so the next training episode starts from that same frame.
- noop_max = 0 crashes envpool (a uniform draw over an empty range): envpool always plays 1 to noop_max
  no-ops at reset, like the official wrapper does for noop_max >= 1.
- envpool gives no action names, only the size of the (minimal) action set.
"""

from typing import Optional, Tuple

import envpool
import numpy as np
from ml_collections import config_dict

from diamond_jax.envs.base import EnvStep, check_actions
from diamond_jax.envs.games import ATARI_100K_GAMES, action_names


# How a life loss is told (env.life_loss_rule): "official" measures it against the count at the last loss (or
# reset), so the loss of a bonus life ends no episode; "every_decrease" ends one at every decrease.
LIFE_LOSS_RULES = ("official", "every_decrease")
ATARI_FRAME_SHAPE = (210, 160)  # (h, w) of the emulator's screen


class AtariEnv:
    """A batch of `num_envs` Atari games stepped together (envpool sync mode); an `envs.base.Env`."""

    def __init__(self, pool, num_envs: int, num_actions: int, done_on_life_loss: bool,
                 action_names: Tuple[str, ...] = (), life_loss_rule: str = "official"):
        self._pool = pool
        self.num_envs = num_envs
        self.num_actions = num_actions
        self.action_names = tuple(action_names)  # empty for an env built by hand
        self.done_on_life_loss = done_on_life_loss
        if life_loss_rule not in LIFE_LOSS_RULES:
            raise ValueError(f"life_loss_rule={life_loss_rule!r}: use one of {', '.join(LIFE_LOSS_RULES)}")
        self.life_loss_rule = life_loss_rule
        self._lives: Optional[np.ndarray] = None  # the life count a loss is measured against

    def reset(self) -> np.ndarray:
        """Starts a new episode in every env; returns their first frames, uint8 [n, h, w, 3]."""
        obs, info = self._pool.reset()
        self._lives = info["lives"].astype(np.int32)
        return _to_hwc(obs)

    def step(self, act: np.ndarray) -> EnvStep:
        if self._lives is None:
            raise RuntimeError("AtariEnv.step called before reset(). Fix: call env.reset() first.")
        act = check_actions(act, self.num_envs)
        obs, rew, terminated, truncated, info = self._pool.step(act)
        final_obs = _to_hwc(obs)
        lives = info["lives"].astype(np.int32)
        end = terminated.astype(bool)
        lost = lives < self._lives
        if self.done_on_life_loss:
            end |= lost
        if self.life_loss_rule == "official":
            # The official wrapper updates its count only when lives go down: after a bonus life, the next
            # loss only brings the counter back to the count and ends nothing.
            self._lives = np.where(lost, lives, self._lives)
        else:
            self._lives = lives
        obs = final_obs
        done = terminated | truncated  # what envpool itself considers finished: it must reset these
        if done.any():
            env_id = np.flatnonzero(done).astype(np.int32)
            new_obs, new_info = self._pool.reset(env_id)
            obs = final_obs.copy()
            obs[new_info["env_id"]] = _to_hwc(new_obs)
            self._lives = self._lives.copy()
            self._lives[new_info["env_id"]] = new_info["lives"]
        return EnvStep(obs=obs, final_obs=final_obs, rew=rew.astype(np.float32), end=end,
                       trunc=truncated.astype(bool), lives=lives)


def _to_hwc(frames_chw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(frames_chw.transpose(0, 2, 3, 1))


def _check_game(game: str) -> None:
    if game not in ATARI_100K_GAMES:
        raise ValueError(f"Unknown game {game!r}. The Atari 100k games are: {', '.join(ATARI_100K_GAMES)} "
                         "(case-sensitive).")


def num_actions(game: str, env_config: config_dict.ConfigDict) -> int:
    """The size of the game's action set (minimal unless env_config.full_action_space), without making envs."""
    _check_game(game)
    return int(envpool.make_spec(f"{game}-v5", full_action_space=env_config.full_action_space).action_space.n)


def make_atari_env(game: str, env_config: config_dict.ConfigDict, num_envs: int, train: bool,
                   seed: int, frame_shape: Optional[Tuple[int, int]] = None) -> AtariEnv:
    """Envs of `game` with the preprocessing of `env_config` (config.env); env i is seeded seed + i.

    `train` picks done-on-life-loss from env_config.train_done_on_life_loss or test_done_on_life_loss.
    frame_shape: (h, w) of the frames, env_config.size squared by default; ATARI_FRAME_SHAPE gives the
    emulator's own frames unresized (play recorded at full resolution, envs/record.py).
    """
    _check_game(game)
    c = env_config
    height, width = (c.size, c.size) if frame_shape is None else frame_shape
    if c.noop_max < 1:
        raise ValueError(f"config.env.noop_max={c.noop_max}: envpool always plays 1 to noop_max no-ops at "
                         "reset and crashes with 0. Fix: use noop_max >= 1 (30 in the paper; 1 = a single no-op).")
    pool = envpool.make(
        f"{game}-v5",
        env_type="gymnasium",
        num_envs=num_envs,
        batch_size=num_envs,  # sync mode: every call steps all envs, in env-id order
        seed=seed,
        img_height=height,
        img_width=width,
        gray_scale=False,
        stack_num=1,
        frame_skip=c.frame_skip,
        noop_max=c.noop_max,
        repeat_action_probability=c.repeat_action_probability,
        full_action_space=c.full_action_space,
        max_episode_steps=c.max_episode_steps,
        reward_clip=False,
        use_fire_reset=False,
        episodic_life=False,  # life losses are handled by AtariEnv.step, see the module docstring
        zero_discount_on_life_loss=False,
        use_inter_area_resize=True,
    )
    done_on_life_loss = c.train_done_on_life_loss if train else c.test_done_on_life_loss
    return AtariEnv(pool, num_envs, int(pool.action_space.n), bool(done_on_life_loss),
                    action_names(game, c.full_action_space), c.get("life_loss_rule", "official"))
