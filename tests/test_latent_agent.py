"""The RL loop with a latent denoiser (denoiser.space "latent"): the denoiser trains on the encoded frames of the
replay and draws latents in imagination, which the reward/end model and the actor-critic see decoded; sigma_data
is measured on the encoded replay; a whole debug run on Catch, its saved agent and its resume.

The autoencoder is a tiny one with random weights (factor 2: Catch's 10 x 10 frames give 5 x 5 latents); what is
checked is where its latents go, not how good they are."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import minatar
from diamond_jax import imagination
from diamond_jax.agent import AUTOENCODER, Agent, LatentSpace
from diamond_jax.config import ConfigError, validate
from diamond_jax.data.replay import ReplayDataset
from diamond_jax.imagination import InitialConditions
from diamond_jax.models.autoencoder import Autoencoder
from diamond_jax.training import autoencoder_export, latent_agent, loop, phases
from diamond_jax.training.agent_checkpoint import load_agent

TINY = Autoencoder(block_out_channels=(4, 8), layers_per_block=1, latent_channels=2, norm_num_groups=4,
                   scaling_factor=0.5, mid_block_add_attention=False)
SIZE = 10


@pytest.fixture(scope="module")
def tiny_autoencoder(tmp_path_factory):
    """(folder, variables) of the tiny autoencoder, saved as the autoencoder trainer exports one."""
    variables = TINY.init(jax.random.key(0), (SIZE, SIZE))
    folder = str(tmp_path_factory.mktemp("autoencoder"))
    autoencoder_export.save_export(folder, TINY, variables["params"])
    return folder, autoencoder_export.load_export(folder)[1]


def latent_config(path: str, **fields):
    config = minatar.get_config("game=Catch,debug").unlock()
    config.denoiser.space = "latent"
    config.autoencoder.path = path
    for name, value in fields.items():
        config.autoencoder[name] = value
    validate(config)  # as main validates a config after its command-line overrides
    return config.lock()


def hand_replay(rng, lengths=(3, 7, 5)):
    replay = ReplayDataset(1, (SIZE, SIZE, 3))
    for k in lengths:
        obs = rng.integers(0, 256, (k, SIZE, SIZE, 3), dtype=np.uint8)
        end = np.zeros(k, bool)
        end[-1] = True
        replay.append(0, obs, rng.integers(0, 3, k).astype(np.int32), np.zeros(k, np.float32), end,
                      np.zeros(k, bool), rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    return replay


def encode_one(variables, frame_uint8):
    """A frame's latent, one frame at a time through the model's own encoder."""
    x = jnp.asarray(frame_uint8, jnp.float32)[None] / 127.5 - 1
    return np.asarray(TINY.encode(variables, x))[0]


def test_a_latent_config_needs_its_autoencoder():
    with pytest.raises(ConfigError, match="autoencoder.path.*must name an autoencoder"):
        latent_config("")
    with pytest.raises(ConfigError, match="autoencoder.sigma_data"):
        latent_config("somewhere", sigma_data=-1.0)
    with pytest.raises(ConfigError, match="denoiser.space"):
        config = minatar.get_config("game=Catch,debug").unlock()
        config.denoiser.space = "voxels"
        validate(config)


def test_sigma_data_is_the_std_of_every_encoded_value_of_the_replay(tiny_autoencoder, tmp_path):
    folder, variables = tiny_autoencoder
    replay = hand_replay(np.random.default_rng(0))
    config = latent_config(folder, encode_batch=4)  # batches that cut episodes: the padding must not count
    sigma = latent_agent.measure_sigma_data(config, str(tmp_path), TINY, variables, replay)
    every = [encode_one(variables, f) for e in range(replay.num_episodes) for f in replay.episode(e)["obs"]]
    assert len(every) == 3 + 7 + 5 + 3  # each episode's frames and its final one
    assert sigma == pytest.approx(float(np.std(np.stack(every).astype(np.float64))), rel=1e-5)
    with open(tmp_path / latent_agent.LATENT_FILE) as f:
        record = json.load(f)
    assert record["sigma_data"] == sigma and record["sigma_data_measured"] and record["latent_shape"] == [5, 5, 2]
    assert latent_agent.known_sigma_data(config, str(tmp_path)) == sigma
    assert latent_agent.known_sigma_data(latent_config(folder, sigma_data=0.7), str(tmp_path)) == 0.7


def test_the_denoiser_trains_on_the_latents_of_the_sampled_frames(tiny_autoencoder):
    folder, variables = tiny_autoencoder
    config = latent_config(folder)
    agent = Agent.from_config(config, 3, LatentSpace(TINY, 1.0))
    replay = hand_replay(np.random.default_rng(1)).device_replay()
    key = jax.random.key(2)
    frames = phases.batch_sampler(config, "denoiser")(replay, key)  # the same draws, in pixel space
    latents = phases.batch_sampler(config, "denoiser", agent)(phases.LatentReplay(replay, {AUTOENCODER: variables}),
                                                               key)
    b, t = frames.act.shape
    assert latents.obs.shape == (b, t, 5, 5, 2)
    np.testing.assert_array_equal(latents.act, frames.act)
    np.testing.assert_array_equal(latents.mask_padding, frames.mask_padding)
    padding = 0
    for i in range(b):
        for k in range(t):
            frame = np.asarray(frames.obs[i, k])
            if not frame.any():  # padding before an episode's start: 0 in latent space too
                padding += 1
                np.testing.assert_array_equal(latents.obs[i, k], 0)
            else:
                uint8 = np.rint((frame + 1) * 127.5).astype(np.uint8)
                np.testing.assert_allclose(latents.obs[i, k], encode_one(variables, uint8), atol=1e-5)
    assert 0 < padding < b * t  # both kinds were checked


def test_imagination_draws_latents_and_shows_their_decoded_frames(tiny_autoencoder):
    folder, ae_variables = tiny_autoencoder
    config = latent_config(folder)
    agent = Agent.from_config(config, 3, LatentSpace(TINY, 0.8))
    assert agent.denoiser.img_channels == 2 and agent.denoiser.sigma_data == 0.8 and not agent.denoiser.quantize
    variables = {**agent.init(jax.random.key(0)), AUTOENCODER: ae_variables}
    rng = np.random.default_rng(3)
    b, n = 2, config.denoiser.inner_model.num_steps_conditioning
    frames = rng.integers(0, 256, (b, n, SIZE, SIZE, 3), dtype=np.uint8)
    init = InitialConditions(jnp.asarray(frames, jnp.float32) / 127.5 - 1, jnp.asarray(rng.integers(0, 3, (b, n)),
                                                                                         jnp.int32))
    state = imagination.initial_state(imagination.burn_in(agent, variables, init))
    assert state.lat.shape == (b, n, 5, 5, 2)
    np.testing.assert_allclose(state.lat[1, 2], encode_one(ae_variables, frames[1, 2]), atol=1e-5)
    ac_out = agent.actor_critic.predict_act_value(variables["actor_critic"], state.obs[:, -1], state.ac_hx_cx)
    out, continued = jax.jit(imagination.world_model_step, static_argnums=0)(
        agent, variables, state, jnp.array([0, 2]), ac_out.hx_cx, jax.random.key(4))
    drawn = continued.lat[:, -1]
    np.testing.assert_allclose(continued.lat[:, :-1], state.lat[:, 1:])
    # The frame the reward/end model and the actor-critic see: the drawn latent decoded, on the 256 levels.
    decoded = np.clip(np.asarray(TINY.decode(ae_variables, drawn)), -1, 1)
    np.testing.assert_allclose(out.next_obs, np.round((decoded + 1) * 127.5) / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(continued.obs[:, -1], out.next_obs)
    assert np.asarray(out.next_obs).shape == (b, SIZE, SIZE, 3)


@pytest.fixture(scope="module")
def latent_run(tiny_autoencoder, tmp_path_factory):
    folder, _ = tiny_autoencoder
    workdir = str(tmp_path_factory.mktemp("latent_catch"))
    config = latent_config(folder)
    return workdir, config, loop.Trainer(config, workdir).run()


def test_a_latent_catch_run_trains_evaluates_and_saves_its_agent(latent_run, tiny_autoencoder):
    workdir, config, results = latent_run
    assert len(results["returns"]) == config.collection.test.num_final_episodes
    with open(os.path.join(workdir, latent_agent.LATENT_FILE)) as f:
        sigma = json.load(f)["sigma_data"]
    assert sigma > 0
    # The saved agent carries its autoencoder (the run's copy, frozen: the pretrained weights) and sigma_data.
    _, agent, variables = load_agent(os.path.join(workdir, "agent"))
    assert agent.is_latent and agent.denoiser.sigma_data == pytest.approx(sigma)
    for saved, pretrained in zip(jax.tree.leaves(variables[AUTOENCODER]), jax.tree.leaves(tiny_autoencoder[1])):
        np.testing.assert_array_equal(saved, pretrained)
    assert os.path.isdir(os.path.join(workdir, autoencoder_export.AUTOENCODER_DIR))
    # Reopened (as on resume), the run reads sigma_data back instead of measuring it again.
    trainer = loop.Trainer(config, workdir)
    try:
        assert trainer.agent.denoiser.sigma_data == pytest.approx(sigma) and trainer.progress.finished
    finally:
        trainer.close()
