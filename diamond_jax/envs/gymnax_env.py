"""JAX-native pixel environments over gymnax: bsuite's Catch and the five MinAtar games.

Their observations are binary grids, one channel per kind of object (Catch: one channel, 10 rows x 5 columns;
MinAtar: 10 x 10 with 4 to 10 channels). They are drawn as RGB frames: black background, each cell the
colour of its highest-indexed active channel in `PALETTE` (MinAtar's own display draws overlapping objects
the same way; `env.player_on_top` draws channel 0, the player, above them instead), and upscaled by nearest
neighbour to `config.env.size` square (each grid row and column becomes a block of size / rows by size / columns
pixels, so size must be a multiple of both).

Reset and step are jitted and vectorised over `num_envs`; env i draws its randomness from
`jax.random.key(seed + i)`. An episode that ends is reset within the same step (`EnvStep.final_obs` keeps
its last frame); `max_episode_steps` truncates. Sticky actions (`repeat_action_probability`: the previous
action is played instead of the chosen one, as MinAtar's `sticky_action_prob` does) are drawn per env and step.
These games have no lives: `EnvStep.lives` is 0 and no life loss ends an episode.
"""

import functools
import importlib.util
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from diamond_jax.config import ConfigError
from diamond_jax.envs.base import EnvStep, check_actions

# Our game name -> gymnax's environment id.
GAMES: Dict[str, str] = {
    "Catch": "Catch-bsuite",
    "Asterix": "Asterix-MinAtar",
    "Breakout": "Breakout-MinAtar",
    "Freeway": "Freeway-MinAtar",
    "Seaquest": "Seaquest-MinAtar",
    "SpaceInvaders": "SpaceInvaders-MinAtar",
}
# MinAtar's full action set, by index; each game plays a subset of it (its minimal action set).
MINATAR_ACTION_NAMES = ("NOOP", "LEFT", "UP", "RIGHT", "DOWN", "FIRE")
CATCH_ACTION_NAMES = ("LEFT", "NOOP", "RIGHT")  # bsuite's Catch moves the paddle by action - 1

# Colour of channel c (RGB), 10 well-separated colours: MinAtar's games have at most 10 channels (Seaquest).
PALETTE = np.array([
    (255, 255, 255),  # 0: white (Catch's ball and paddle; MinAtar's player: paddle, chicken, cannon, sub...)
    (230, 25, 75),  # 1: red
    (60, 180, 75),  # 2: green
    (255, 225, 25),  # 3: yellow
    (0, 130, 200),  # 4: blue
    (245, 130, 48),  # 5: orange
    (145, 30, 180),  # 6: purple
    (70, 240, 240),  # 7: cyan
    (240, 50, 230),  # 8: magenta
    (170, 110, 40),  # 9: brown
], dtype=np.uint8)


# Each game's grid (rows, columns), as gymnax draws it; known here without making an environment, which would
# start JAX's backend while the config is read, before --cpu_devices or jax.distributed can set it up.
GRIDS: Dict[str, Tuple[int, int]] = {"Catch": (10, 5), "Asterix": (10, 10), "Breakout": (10, 10),
                                     "Freeway": (10, 10), "Seaquest": (10, 10), "SpaceInvaders": (10, 10)}


def check_game(game: Any) -> None:
    if game not in GAMES:
        raise ConfigError(f"Unknown game {game!r} for the gymnax backend. Its games are: {', '.join(GAMES)} "
                         "(case-sensitive), e.g. --config=configs/minatar.py:game=Catch.")
    if importlib.util.find_spec("gymnax") is None:  # looked up, not imported: importing it would start JAX
        raise ConfigError("config.env.backend='gymnax' needs gymnax, which is not installed. Fix: "
                          "pip install -e '.[gymnax]'")


@functools.lru_cache(maxsize=None)
def _gymnax_env(game: str):
    check_game(game)
    try:
        import gymnax  # an optional dependency
    except ImportError as error:
        raise ConfigError(f"config.env.backend='gymnax' needs gymnax, which cannot be imported ({error}). Fix: "
                          "pip install -e '.[gymnax]'") from error
    env, params = gymnax.make(GAMES[game])
    return env, params


def action_names(game: str) -> Tuple[str, ...]:
    env, _ = _gymnax_env(game)
    if game == "Catch":
        return CATCH_ACTION_NAMES
    return tuple(MINATAR_ACTION_NAMES[int(i)] for i in np.asarray(env.action_set))


def num_actions(game: str) -> int:
    return len(action_names(game))


def check_size(game: str, size: int) -> None:
    """Frames are upscaled by whole pixels per grid cell: size must be a multiple of the grid's sides."""
    rows, cols = GRIDS[game]
    if size % rows or size % cols:
        raise ConfigError(f"config.env.size={size}: {game}'s grid is {rows} x {cols} cells, drawn with whole "
                         f"pixels per cell, so the size must be a multiple of {int(np.lcm(rows, cols))}. Fix: "
                         f"e.g. --config.env.size={2 * int(np.lcm(rows, cols))}.")


def render(grid: jax.Array, size: int, player_on_top: bool = False) -> jax.Array:
    """Binary grids [..., rows, cols, channels] -> uint8 RGB frames [..., size, size, 3]: each cell the colour
    of its highest-indexed active channel, black where none is; with player_on_top, channel 0 (the player in
    every MinAtar game) is drawn above the others instead of under them."""
    channels = grid.shape[-1]
    if channels > len(PALETTE):
        raise ConfigError(f"{channels} channels but the palette has {len(PALETTE)} colours")
    active = grid > 0.5
    # Each channel's rank in the drawing order (1 + its index; channel 0 last when it goes on top), and 0 for an
    # empty cell: a cell shows the colour of its highest-ranked active channel.
    rank = np.arange(1, channels + 1)
    colours = [np.zeros((1, 3), np.uint8), PALETTE[:channels]]
    if player_on_top:
        rank[0] = channels + 1
        colours.append(PALETTE[:1])
    top = jnp.max(jnp.where(active, jnp.asarray(rank), 0), axis=-1)
    rgb = jnp.asarray(np.concatenate(colours))[top]
    rows, cols = grid.shape[-3], grid.shape[-2]
    return jnp.repeat(jnp.repeat(rgb, size // rows, axis=-3), size // cols, axis=-2)


class GymnaxEnv:
    """A batch of `num_envs` gymnax games stepped together on the default JAX device; an `envs.base.Env`."""

    def __init__(self, game: str, num_envs: int, size: int, max_episode_steps: int,
                 repeat_action_probability: float, seed: int, player_on_top: bool = False):
        check_game(game)
        check_size(game, size)
        env, params = _gymnax_env(game)
        # Truncation at max_episode_steps is gymnax's own time limit (state.time counts agent steps).
        params = params.replace(max_steps_in_episode=int(max_episode_steps))
        self.game = game
        self.num_envs = num_envs
        self.action_names = action_names(game)
        self.num_actions = len(self.action_names)
        catch = game == "Catch"

        def frame(obs):
            return render(obs[..., None] if catch else obs, size, player_on_top)

        def reset_one(key):
            key, key_reset = jax.random.split(key)
            obs, state = env.reset(key_reset, params)
            return key, state, frame(obs)

        def step_one(key, state, prev_act, act):
            key, key_sticky, key_step = jax.random.split(key, 3)
            act = jnp.where(jax.random.uniform(key_sticky) < repeat_action_probability, prev_act, act)
            # env.step resets an env whose episode ended (terminated or truncated) and returns the new
            # episode's first observation; info["final_observation"] is the frame the step reached.
            obs, state, rew, terminated, truncated, info = env.step(key_step, state, act, params)
            # A new episode starts with no action to repeat (MinAtar resets its last action to 0).
            played = jnp.where(terminated | truncated, 0, act)
            return key, state, played, (frame(obs), frame(info["final_observation"]), rew.astype(jnp.float32),
                                     terminated, truncated & ~terminated)

        self._reset = jax.jit(jax.vmap(reset_one))
        self._step = jax.jit(jax.vmap(step_one))
        self._keys = jax.vmap(jax.random.key)(jnp.arange(num_envs, dtype=jnp.uint32) + np.uint32(seed))
        self._state = None
        self._prev_act = jnp.zeros(num_envs, jnp.int32)

    def reset(self) -> np.ndarray:
        self._keys, self._state, obs = self._reset(self._keys)
        self._prev_act = jnp.zeros(self.num_envs, jnp.int32)
        return np.asarray(obs)

    def step(self, act: np.ndarray) -> EnvStep:
        if self._state is None:
            raise RuntimeError("GymnaxEnv.step called before reset(). Fix: call env.reset() first.")
        act = check_actions(act, self.num_envs)
        if act.min() < 0 or act.max() >= self.num_actions:
            raise ConfigError(f"actions must lie in [0, {self.num_actions}), got {act.tolist()}")
        self._keys, self._state, self._prev_act, out = self._step(self._keys, self._state, self._prev_act,
                                                                  jnp.asarray(act))
        obs, final_obs, rew, end, trunc = jax.device_get(out)
        return EnvStep(obs=obs, final_obs=final_obs, rew=rew, end=end.astype(bool), trunc=trunc.astype(bool),
                       lives=np.zeros(self.num_envs, np.int32))


def make_gymnax_env(game: str, env_config: config_dict.ConfigDict, num_envs: int, seed: int) -> GymnaxEnv:
    c = env_config
    # Configs saved before env.player_on_top existed drew the player under the other objects.
    return GymnaxEnv(game, num_envs, c.size, c.max_episode_steps, c.repeat_action_probability, seed,
                     c.get("player_on_top", False))
