"""Whether a run's config is the paper's: the fields in which it differs from configs/atari100k.py for its
game. Numbers of a run with another config (the debug preset cuts episodes at 100 steps) are no results to
set beside the paper's; results.json and the report say so."""

import importlib.util
import os
from typing import Any, Dict, List

from ml_collections import config_dict

from diamond_jax.config_files import config_file
from diamond_jax.envs.games import ATARI_100K_GAMES
from diamond_jax.training.workdir import config_as_flat_dict, config_changes, matches

PAPER_CONFIG_FILE = config_file("atari100k")
# Fields the paper leaves free: the seed, and how a run is spread over devices, saved and watched during
# training. None changes what the final test episodes measure.
FREE_FIELDS = ("seed", "num_devices", "checkpoint.", "training.steps_per_call", "training.phase_loop",
               "evaluation.every", "collection.test.num_episodes")


def paper_config(game: str) -> config_dict.ConfigDict:
    spec = importlib.util.spec_from_file_location("paper_atari100k", PAPER_CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(f"game={game}")


def differences(config: config_dict.ConfigDict) -> List[str]:
    """The fields in which `config` differs from the paper's config for its game, sorted; ["env.backend"] for
    another environment backend (MinAtar's Breakout is not Atari's) and ["game"] for a game outside Atari 100k:
    configs of other benchmarks, where the comparison means nothing."""
    if config.env.get("backend", "envpool") != "envpool":
        return ["env.backend"]
    if config.get("game") not in ATARI_100K_GAMES:
        return ["game"]
    if not os.path.exists(PAPER_CONFIG_FILE):  # an installed copy without the repository's configs/
        return [f"(unknown: no {PAPER_CONFIG_FILE} to compare with)"]
    changes = config_changes(config_as_flat_dict(paper_config(config.game)), config_as_flat_dict(config))
    return [k for k in changes if not any(matches(k, p) for p in FREE_FIELDS)]


def marker(config: config_dict.ConfigDict) -> Dict[str, Any]:
    """The fields results.json carries about it."""
    differ = differences(config)
    return {"paper_config": not differ, "differs_from_paper": differ}
