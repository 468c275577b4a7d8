"""Real environments behind one interface (`envs.base.Env`), the backend chosen by `config.env.backend`:

- "envpool": the 26 Atari 100k games with DIAMOND's preprocessing (`envs.atari`);
- "gymnax": bsuite's Catch and the five MinAtar games, JAX-native, drawn as RGB frames (`envs.gymnax_env`).

Training collection, test episodes, `play`, `dream` and the benchmark all make their environments here.
"""

from typing import Optional, Tuple

from ml_collections import config_dict

from diamond_jax.config import ConfigError
from diamond_jax.envs import games as atari_games
from diamond_jax.envs.base import Env, EnvStep

BACKENDS = ("envpool", "gymnax")
ATARI_FPS = 60  # the Atari emulator's frames per second

__all__ = ["BACKENDS", "Env", "EnvStep", "action_names", "check_env_config", "game_names", "make_env",
           "num_actions", "steps_per_second"]


def _backend(env_config: config_dict.ConfigDict) -> str:
    backend = env_config.get("backend", "envpool")
    if backend not in BACKENDS:
        raise ConfigError(f"config.env.backend={backend!r} is not a backend. Fix: use one of {', '.join(BACKENDS)} "
                         "(envpool for Atari, e.g. configs/atari100k.py; gymnax for Catch and MinAtar, "
                         "configs/minatar.py).")
    return backend


def game_names(backend: str) -> Tuple[str, ...]:
    """The games a backend offers, by the names configs use."""
    if backend == "envpool":
        return atari_games.ATARI_100K_GAMES
    from diamond_jax.envs import gymnax_env

    return tuple(gymnax_env.GAMES)


def check_env_config(config: config_dict.ConfigDict) -> None:
    """Raises ValueError, naming the field and the fix, for a game its backend lacks or a frame size it cannot
    draw; makes no environment."""
    backend = _backend(config.env)
    if backend == "envpool":
        if config.game not in atari_games.ATARI_100K_GAMES:
            raise ConfigError(f"config.game={config.game!r} is not an Atari 100k game. Fix: use one of "
                             f"{', '.join(atari_games.ATARI_100K_GAMES)} (case-sensitive), e.g. "
                             "--config=configs/atari100k.py:game=Pong")
        return
    from diamond_jax.envs import gymnax_env

    gymnax_env.check_game(config.game)
    gymnax_env.check_size(config.game, config.env.size)


def num_actions(config: config_dict.ConfigDict) -> int:
    """The size of the game's action set, without making environments."""
    check_env_config(config)
    if _backend(config.env) == "envpool":
        from diamond_jax.envs import atari

        return atari.num_actions(config.game, config.env)
    from diamond_jax.envs import gymnax_env

    return gymnax_env.num_actions(config.game)


def action_names(config: config_dict.ConfigDict) -> Tuple[str, ...]:
    """The names of the game's actions, by action index."""
    check_env_config(config)
    if _backend(config.env) == "envpool":
        return atari_games.action_names(config.game, config.env.full_action_space)
    from diamond_jax.envs import gymnax_env

    return gymnax_env.action_names(config.game)


def steps_per_second(config: config_dict.ConfigDict) -> Optional[float]:
    """Agent steps per second of game time: Atari's emulator frames per second over its frame skip; None for
    the gymnax games, which have no clock."""
    return ATARI_FPS / config.env.frame_skip if _backend(config.env) == "envpool" else None


def make_env(config: config_dict.ConfigDict, num_envs: int, train: bool, seed: int,
             frame_shape: Optional[Tuple[int, int]] = None) -> Env:
    """`num_envs` environments of config.game, env i seeded from seed + i. `train` selects the training
    envs' episode rules (Atari: done on life loss) over the test envs'. frame_shape (h, w) replaces the
    config's frame size (Atari only: envpool renders at any size; the gymnax games draw their own grid)."""
    check_env_config(config)
    if _backend(config.env) == "envpool":
        from diamond_jax.envs import atari

        return atari.make_atari_env(config.game, config.env, num_envs, train, seed, frame_shape)
    if frame_shape is not None:
        raise ConfigError(f"frame_shape={frame_shape} is for Atari (config.env.backend='envpool'); the gymnax "
                          f"games draw frames of config.env.size. Fix: leave frame_shape out for {config.game}.")
    from diamond_jax.envs import gymnax_env

    return gymnax_env.make_gymnax_env(config.game, config.env, num_envs, seed)
