import pytest
from ml_collections import config_dict

from configs import atari100k
from diamond_jax import config as config_lib
from diamond_jax import envs
from diamond_jax.envs.games import ATARI_100K_GAMES


def test_defaults_are_the_papers_numbers():
    c = atari100k.get_config()
    assert c.game == "Breakout" and c.env.size == 64 and c.env.frame_skip == 4 and c.env.noop_max == 30
    assert c.env.repeat_action_probability == 0.0 and not c.env.full_action_space
    assert c.env.max_episode_steps == 27_000
    assert c.env.train_done_on_life_loss and not c.env.test_done_on_life_loss
    assert c.collection.train.num_steps_total == 100_000 and c.collection.train.steps_per_epoch == 100
    assert (c.collection.train.first_epoch.min, c.collection.train.first_epoch.max) == (5_000, 10_000)
    assert c.collection.train.first_epoch.threshold_rew == 10 and c.collection.train.epsilon == 0.01
    assert c.collection.test.num_episodes == 4 and c.collection.test.num_final_episodes == 100
    assert c.training.num_final_epochs == 50 and c.evaluation.every == 10
    d = c.denoiser
    assert (d.sigma_data, d.sigma_offset_noise) == (0.5, 0.3)
    assert (d.sigma_distribution.loc, d.sigma_distribution.scale) == (-0.4, 1.2)
    assert (d.sigma_distribution.sigma_min, d.sigma_distribution.sigma_max) == (2e-3, 20.0)
    assert d.inner_model.channels == (64,) * 4 and d.inner_model.depths == (2,) * 4
    assert d.inner_model.cond_channels == 256 and d.inner_model.num_steps_conditioning == 4
    assert d.training.num_autoregressive_steps == 1 and d.training.batch_size == 32
    assert (d.optimizer.lr, d.optimizer.weight_decay, d.optimizer.eps) == (1e-4, 1e-2, 1e-8)
    assert d.training.max_grad_norm == 1.0 and d.training.lr_warmup_steps == 100
    assert (d.training.steps_first_epoch, d.training.steps_per_epoch) == (10_000, 400)
    r = c.rew_end_model
    assert r.lstm_dim == 512 and r.cond_channels == 128 and r.channels == (32,) * 4
    assert r.training.seq_length == 19 and r.training.max_grad_norm == 100.0
    a = c.actor_critic
    assert a.channels == (32, 32, 64, 64) and a.lstm_dim == 512 and a.optimizer.weight_decay == 0.0
    assert (a.loss.gamma, a.loss.lambda_, a.loss.weight_value_loss, a.loss.weight_entropy_loss) == (
        0.985, 0.95, 1.0, 0.001)
    assert (a.training.steps_first_epoch, a.training.steps_per_epoch) == (5_000, 400)
    s = c.world_model_env.sampler
    assert c.world_model_env.horizon == 15
    assert (s.num_steps_denoising, s.sigma_min, s.sigma_max, s.rho, s.order) == (3, 2e-3, 5.0, 7.0, 1)
    assert (s.s_churn, s.s_tmin, s.s_tmax, s.s_noise) == (0.0, 0.0, float("inf"), 1.0)
    for name in ("denoiser", "rew_end_model", "actor_critic"):
        assert c[name].training.sample_weights == (0.1, 0.1, 0.1, 0.7)


@pytest.mark.parametrize("game", ATARI_100K_GAMES)
def test_every_game_preset(game):
    assert atari100k.get_config(f"game={game}").game == game


def test_presets_combine():
    c = atari100k.get_config("game=Pong,debug")
    assert c.game == "Pong" and c.env.size == 16 and c.denoiser.training.batch_size == 4
    assert atari100k.get_config("debug,game=Pong").to_dict() == c.to_dict()


def test_shared_numbers_follow_an_override():
    c = atari100k.get_config()
    c.world_model_env.horizon = 10
    assert c.rew_end_model.training.seq_length == 14
    c.actor_critic.training.sample_weights = (0.25,) * 4
    assert c.denoiser.training.sample_weights == (0.25,) * 4


@pytest.mark.parametrize("arg, match", [
    ("game=Tetris", "not an Atari 100k game.*Alien"),
    ("game=pong", "case-sensitive"),
    ("gaem=Pong", "Unknown config preset 'gaem=Pong'"),
    ("fast", "Unknown config preset 'fast'"),
])
def test_bad_presets_fail_with_the_fix(arg, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        atari100k.get_config(arg)


def test_unknown_key_fails():
    c = atari100k.get_config()
    with pytest.raises(AttributeError, match="horizn"):
        c.world_model_env.horizn = 3


def test_an_unknown_game_is_the_environments_to_refuse():
    """config.validate knows no games (config.py is below envs/); envs.check_env_config, which main calls right
    after it, names the game and the valid ones."""
    c = atari100k.get_config()
    c.game = "Tetris"
    config_lib.validate(c)
    with pytest.raises(config_lib.ConfigError, match="config.game='Tetris' is not an Atari 100k game.*Fix:"):
        envs.check_env_config(c)


@pytest.mark.parametrize("field, value, match", [
    ("env.size", -64, "config.env.size=-64: must be a positive integer"),
    ("denoiser.training.batch_size", 0, "config.denoiser.training.batch_size=0"),
    ("world_model_env.sampler.num_steps_denoising", 0, "num_steps_denoising=0: must be a positive integer"),
    ("world_model_env.sampler.sigma_min", 5.0, "sigma_min=5.0: must be < sigma_max"),
    ("denoiser.sigma_distribution.sigma_max", 1e-3, "sigma_min=0.002: must be < sigma_max"),
    ("denoiser.training.sample_weights", (0.2, 0.2, 0.2, 0.2), "summing to 1"),
    ("world_model_env.sampler.order", 3, "must be 1 \\(Euler\\) or 2 \\(Heun\\)"),
    ("collection.train.epsilon", 1.5, "must lie in \\[0, 1\\]"),
    ("actor_critic.loss.gamma", -0.1, "actor_critic.loss.gamma=-0.1"),
    ("denoiser.optimizer.lr", 0.0, "lr=0.0: must be a finite number > 0"),
    ("denoiser.inner_model.channels", (64, 64, 64), "need one entry per level"),
    ("denoiser.inner_model.channels", (64, 65, 64, 64), "channels\\[1\\]=65: must be divisible by its 2 GroupNorm"),
    ("env.size", 60, "env.size=60: must be divisible by 2\\^3"),
    ("denoiser.inner_model.cond_channels", 254, "divisible by num_steps_conditioning.*use e.g. 256"),
    # 256 does not split into 10 action embeddings: the fix is the next multiple of 10 (and of 2), 260.
    ("denoiser.inner_model.num_steps_conditioning", 10, "cond_channels=256: .*use e.g. 260"),
    ("collection.train.first_epoch.min", 20_000, "min <= max <= num_steps_total"),
    ("collection.train.num_steps_total", 100_050, "multiple of collection.train.steps_per_epoch"),
])
def test_impossible_values_name_the_field_and_fix(field, value, match):
    c = atari100k.get_config()
    *parents, leaf = field.split(".")
    section = c
    for p in parents:
        section = section[p]
    section[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=match) as info:
        config_lib.validate(c)
    assert "Fix:" in str(info.value)


def test_config_is_locked_and_complete():
    c = atari100k.get_config()
    assert isinstance(c, config_dict.ConfigDict) and c.is_locked
