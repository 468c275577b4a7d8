"""configs/minatar.py and a whole debug run on Catch through the gymnax backend: the training loop, test
episodes and results.json as for Atari, scores normalised by the measured random policy."""

import json
import os

import numpy as np
import pytest

from configs import atari100k, minatar
from diamond_jax import scores
from diamond_jax.config import ConfigError
from diamond_jax.training import loop


@pytest.mark.parametrize("game", ["Catch", "Asterix", "Breakout", "Freeway", "Seaquest", "SpaceInvaders"])
def test_every_game_preset(game):
    c = minatar.get_config(f"game={game}")
    assert c.game == game and c.env.backend == "gymnax"
    assert minatar.get_config(f"game={game},debug").game == game


def test_defaults_keep_the_papers_algorithm_numbers():
    c, paper = minatar.get_config(), atari100k.get_config()
    assert c.game == "Breakout" and c.env.size == 10
    for field in ("denoiser.sigma_data", "denoiser.sigma_offset_noise", "denoiser.inner_model.num_steps_conditioning",
                  "world_model_env.horizon", "world_model_env.sampler.num_steps_denoising",
                  "actor_critic.loss.gamma", "actor_critic.loss.lambda_", "collection.train.epsilon",
                  "denoiser.training.batch_size", "actor_critic.training.batch_size"):
        a, b = c, paper
        for part in field.split("."):
            a, b = a[part], b[part]
        assert a == b, field
    assert minatar.get_config("game=Catch").collection.train.num_steps_total == 3_000


def test_bad_presets_list_the_games():
    with pytest.raises(ConfigError, match="'Pong' is not a gymnax game.*Catch, Asterix, Breakout"):
        minatar.get_config("game=Pong")
    with pytest.raises(ConfigError, match="'Catch' is not an Atari 100k game"):
        atari100k.get_config("game=Catch")


def test_random_scores_are_stored_with_their_command():
    path = os.path.join(os.path.dirname(scores.__file__), "reference_data", "minatar_random.json")
    with open(path) as f:
        stored = json.load(f)
    assert stored["command"].startswith("python -m diamond_jax.baselines")
    assert set(stored["games"]) == {"Catch", "Asterix", "Breakout", "Freeway", "Seaquest", "SpaceInvaders"}
    assert scores.normalized_score("minatar", "Catch", 1.0) == pytest.approx(1.0 - stored["games"]["Catch"]["mean_return"])


@pytest.fixture(scope="module")
def catch_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("catch"))
    return workdir, loop.Trainer(minatar.get_config("game=Catch,debug"), workdir).run()


def test_a_catch_run_trains_evaluates_and_writes_results(catch_run):
    workdir, results = catch_run
    config = minatar.get_config("game=Catch,debug")
    with open(os.path.join(workdir, "results.json")) as f:
        on_disk = json.load(f)
    assert on_disk == results and on_disk["suite"] == "minatar" and on_disk["game"] == "Catch"
    assert len(on_disk["returns"]) == config.collection.test.num_final_episodes
    assert set(on_disk["returns"]) <= {-1.0, 1.0} and set(on_disk["lengths"]) == {9}  # Catch: 9 steps, +-1
    assert on_disk["normalized_score"] == pytest.approx(np.mean(on_disk["returns"]) + 0.608)
    assert "human_normalized_score" not in on_disk and on_disk["paper_config"] is False
    with open(os.path.join(workdir, "evaluations.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["final"] for r in records][-1] and all(len(r["returns"]) > 0 for r in records)


def test_a_minatar_run_directory_resumes(tmp_path):
    """Its config has no Atari-only field (the life-loss rule): the fields added since the first release must not
    turn into changes when a MinAtar run is resumed."""
    from diamond_jax.training import workdir

    config = minatar.get_config("game=Catch,debug")
    workdir.open_workdir(str(tmp_path), config, lock=False)
    workdir.open_workdir(str(tmp_path), config, lock=False)  # resuming: the same config, accepted


@pytest.mark.parametrize("config_file", ["minatar", "world_model"])
def test_a_run_saved_before_the_conditioning_variants_resumes_but_not_with_one(tmp_path, config_file):
    """A config.json written before the conditioning fields existed holds a frame-stack denoiser without
    dropout or guidance: it resumes under today's defaults, and is refused with cross-attention."""
    from configs import world_model
    from diamond_jax.training import workdir

    config = (minatar.get_config("game=Catch,debug") if config_file == "minatar"
              else world_model.get_config("debug"))
    saved = json.loads(config.to_json_best_effort())
    for key in ("conditioning", "condition_dropout", "condition_dropout_target", "cross_attention"):
        del saved["denoiser"][key]
    del (saved["world_model_env"] if config_file == "minatar" else saved)["sampler"]["guidance_scale"]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(saved, f)
    workdir.open_workdir(str(tmp_path), config, lock=False)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(saved, f)
    other = config.unlock()
    other.denoiser.conditioning = "cross_attention"
    with pytest.raises(ValueError, match="denoiser.conditioning: 'frame_stack' -> 'cross_attention'"):
        workdir.open_workdir(str(tmp_path), other.lock(), lock=False)
