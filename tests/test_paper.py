"""Whether a config is the paper's: the fields that differ from configs/atari100k.py for the game."""

from configs import atari100k
from conftest import with_fields
from diamond_jax.training import paper


def changed(preset="game=Pong", **fields):
    return with_fields(atari100k.get_config(preset), **fields)


def test_the_paper_config_of_any_game_with_any_seed_and_bookkeeping_is_the_papers():
    config = changed(**{"seed": 4, "num_devices": 2, "checkpoint.keep": 1, "checkpoint.every_minutes": 5.0,
                        "training.steps_per_call": 10, "evaluation.every": 5, "collection.test.num_episodes": 8})
    assert paper.marker(config) == {"paper_config": True, "differs_from_paper": []}


def test_a_changed_field_or_the_debug_preset_is_not_the_papers():
    assert paper.marker(changed(**{"denoiser.optimizer.lr": 3e-4, "env.max_episode_steps": 100})) == {
        "paper_config": False, "differs_from_paper": ["denoiser.optimizer.lr", "env.max_episode_steps"]}
    differ = paper.differences(atari100k.get_config("game=Pong,debug"))
    # Among them, what makes the debug preset's scores meaningless: tiny models, episodes cut at 100 steps.
    assert {"env.max_episode_steps", "env.size", "denoiser.inner_model.channels",
            "collection.train.num_steps_total"} <= set(differ)
    assert "seed" not in differ and "game" not in differ


def test_a_config_of_another_benchmark_is_not_the_papers_without_failing():
    config = changed().unlock()
    config.game = "Catch"  # e.g. a MinAtar game: no Atari paper config to compare with
    assert paper.marker(config) == {"paper_config": False, "differs_from_paper": ["game"]}
