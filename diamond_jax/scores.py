"""Reference scores shipped with the package: random and human scores, and DIAMOND's published returns."""

import functools
import json
from importlib import resources

from diamond_jax.envs.games import ATARI_100K_GAMES


@functools.lru_cache(maxsize=None)
def _load(name: str) -> dict:
    return json.loads(resources.files("diamond_jax").joinpath("reference_data", name).read_text())


def check_game(game: str) -> None:
    """Raises ValueError naming `game` and the valid games if it has no random/human reference scores."""
    if game not in _load("atari100k_random_human.json"):
        raise ValueError(
            f"{game!r} has no random/human reference scores: it is not an Atari 100k game. Use one of: "
            f"{', '.join(ATARI_100K_GAMES)} (names are case-sensitive)."
        )


def random_human_scores() -> dict[str, tuple[float, float]]:
    """Game -> (random score, human score), the reference points of the human-normalised score."""
    return {game: (s["random"], s["human"]) for game, s in _load("atari100k_random_human.json").items()}


def human_normalized_score(game: str, score: float) -> float:
    """HNS = (score - random) / (human - random): 0 plays like a random policy, 1 like a human."""
    check_game(game)
    random, human = random_human_scores()[game]
    return (score - random) / (human - random)


SUITES = {"envpool": "atari100k", "gymnax": "minatar"}  # config.env.backend -> the suite its games form


def suite_of(env_config) -> str:
    return SUITES[env_config.get("backend", "envpool")]


def random_scores(suite: str) -> dict[str, float]:
    """Game -> the mean return of the uniformly random policy (Atari: the published random scores; MinAtar and
    Catch: measured by this project, see reference_data/minatar_random.json for the command)."""
    if suite == "atari100k":
        return {game: r for game, (r, _) in random_human_scores().items()}
    return {game: g["mean_return"] for game, g in _load("minatar_random.json")["games"].items()}


def normalized_score(suite: str, game: str, score: float) -> float:
    """0 = the random policy. Atari: the human-normalised score (1 = human). MinAtar and Catch, which have no
    human reference: the return above the random policy's, in the game's own units."""
    if suite == "atari100k":
        return human_normalized_score(game, score)
    random = random_scores(suite)
    if game not in random:
        raise ValueError(f"{game!r} has no random-policy score in the {suite} suite; its games: "
                         f"{', '.join(random)}.")
    return score - random[game]


def diamond_published_returns() -> dict[str, list[float]]:
    """Game -> DIAMOND's 5 per-seed returns, each a mean over 100 test episodes (Alonso et al., 2024)."""
    return {game: list(returns) for game, returns in _load("DIAMOND_atari100k_returns.json").items()}
