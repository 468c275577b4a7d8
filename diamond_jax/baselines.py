"""The uniformly random policy's test return on each game of a config's backend: the 0 of normalised scores.

    python -m diamond_jax.baselines --config=configs/minatar.py --episodes=1000 \\
        --out=diamond_jax/reference_data/minatar_random.json

Episodes are played as the config's test episodes are (its environments, episode cap and test rules), each
action uniform over the game's action set. With several environments the episodes kept are the first N to
start, as in `collect.collect_test_episodes`, so that short episodes are not favoured.
"""

import argparse
import datetime
import importlib.util
import json
import os
import sys
from typing import Dict, List

import numpy as np
from tqdm import tqdm

from diamond_jax import envs


def random_policy_returns(config, game: str, num_episodes: int, num_envs: int, seed: int) -> List[float]:
    """Returns of the first num_episodes episodes started by uniformly random play."""
    config = config.unlock()
    config.game = game
    env = envs.make_env(config, num_envs, train=False, seed=seed)
    rng = np.random.default_rng(seed)
    env.reset()
    episode_of_env = np.arange(num_envs)  # the episode each env plays; -1 once num_episodes have started
    episode_of_env[episode_of_env >= num_episodes] = -1
    next_episode = num_envs
    ep_return = np.zeros(num_envs)
    returns: List[float] = [None] * num_episodes
    with tqdm(total=num_episodes, desc=f"{game}: random policy", unit="episode", leave=False) as bar:
        while any(r is None for r in returns):
            step = env.step(rng.integers(0, env.num_actions, num_envs))
            ep_return += step.rew
            for i in np.flatnonzero(step.end | step.trunc):
                if episode_of_env[i] >= 0:
                    returns[episode_of_env[i]] = float(ep_return[i])
                    bar.update(1)
                episode_of_env[i] = next_episode if next_episode < num_episodes else -1
                next_episode += 1
                ep_return[i] = 0.0
    return returns


def measure(config, games: List[str], num_episodes: int, num_envs: int, seed: int) -> Dict[str, Dict[str, float]]:
    out = {}
    for game in games:
        returns = np.asarray(random_policy_returns(config, game, num_episodes, num_envs, seed))
        out[game] = {"mean_return": float(returns.mean()), "std_return": float(returns.std()),
                     "stderr": float(returns.std() / np.sqrt(len(returns))), "episodes": len(returns)}
        print(f"{game}: {returns.mean():.3f} +- {out[game]['stderr']:.3f} (std {returns.std():.3f}, "
              f"{len(returns)} episodes)")
    return out


def _load_config(spec: str):
    """A config file's get_config(presets), from `path.py[:presets]`."""
    path, _, presets = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_baselines_config", path)
    if module_spec is None or not os.path.exists(path):
        raise SystemExit(f"error: --config={spec}: no config file at {path}. Fix: e.g. --config=configs/minatar.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(presets)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/minatar.py", help="a config file of configs/ (its "
                        "environment backend, episode cap and frame size are used)")
    parser.add_argument("--games", default="all", help="comma-separated, or all (the backend's games)")
    parser.add_argument("--episodes", type=int, default=1000, help="episodes per game")
    parser.add_argument("--num_envs", type=int, default=64, help="environments stepped together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the scores here as JSON (with this command)")
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.num_envs < 1:
        parser.error("--episodes and --num_envs must be >= 1")
    config = _load_config(args.config)
    backend = config.env.backend
    valid = envs.game_names(backend)
    games = list(valid) if args.games == "all" else args.games.split(",")
    unknown = [g for g in games if g not in valid]
    if unknown:
        parser.error(f"unknown game(s) {', '.join(unknown)} for backend {backend}; its games: {', '.join(valid)}")
    scores = measure(config, games, args.episodes, args.num_envs, args.seed)
    if args.out:
        record = {"command": "python -m diamond_jax.baselines " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "measured": datetime.date.today().isoformat(), "backend": backend,
                  "max_episode_steps": config.env.max_episode_steps,
                  "repeat_action_probability": config.env.repeat_action_probability, "seed": args.seed,
                  "games": scores}
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
