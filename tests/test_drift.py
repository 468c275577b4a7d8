"""Long rollouts: the denoiser's interpolation inputs and dual-purpose training (models/interpolation.py), the
drift detectors and recovery (world_model/drift.py)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import world_model as wm_configs
from conftest import with_fields
from diamond_jax.config import ConfigError
from diamond_jax.data.batch import Batch
from diamond_jax.models.denoiser import Denoiser
from diamond_jax.models.interpolation import Interpolation, motion_weights, seen_target, target_weight
from diamond_jax.models.sampler import SamplerConfig
from diamond_jax.world_model import drift
from diamond_jax.world_model.config import validate
from diamond_jax.world_model.model import Frames, WorldModel

N, M, SIZE = 2, 4, 8  # past frames, interpolation steps, frame size of the tiny models


def tiny(interpolation=None, num_actions=3):
    return Denoiser(num_actions=num_actions, num_steps_conditioning=N, cond_channels=16, depths=(1, 1),
                    channels=(8, 8), attn_depths=(0, 0), interpolation=interpolation)


def perturbed(variables):
    """Every parameter moved off its initial value (conv_out starts at zero), so that outputs depend on all."""
    return jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)),
                        variables)


# ---- The interpolation inputs.


def test_without_interpolation_the_denoiser_computes_what_it_computed_before():
    # Values printed by the denoiser of commit 4fa3003 (before interpolation existed) on these exact inputs.
    variables = perturbed(tiny().init(jax.random.key(0), SIZE))
    assert sorted(variables["params"]) == ["act_emb_0", "cond_proj_0", "cond_proj_2", "conv_in", "conv_out",
                                           "norm_out", "unet"]
    x = jnp.sin(jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32)).reshape(2, 8, 8, 3)
    obs = jnp.cos(jnp.arange(2 * 2 * 8 * 8 * 3, dtype=jnp.float32) * 0.7).reshape(2, 2, 8, 8, 3)
    d = tiny()
    out = np.asarray(d.model_output(variables, x, obs, jnp.array([[0, 1], [2, 0]]), d.conditioners(
        jnp.array([0.5, 2.0]))))
    np.testing.assert_allclose(out.sum(), -1.040561556816101, rtol=1e-5)
    np.testing.assert_allclose((out ** 2).sum(), 9.713621139526367, rtol=1e-5)
    np.testing.assert_allclose(out[0, 0, 0], [-0.0003796890377998352, 0.1258421689271927, 0.1214563176035881],
                               atol=1e-5)
    np.testing.assert_allclose(out[1, 7, 7], [0.17996764183044434, 0.15585607290267944, -0.026457827538251877],
                               atol=1e-5)
    # The config's default (steps 0) builds that same denoiser.
    assert Denoiser.from_config(wm_configs.get_config("debug"), 3).interpolation is None
    with pytest.raises(ValueError, match="trained with interpolation"):
        d.denoise(variables, x, jnp.float32(1.0), obs, jnp.zeros((2, 2), jnp.int32), target=x,
                  bucket=jnp.zeros((2,), jnp.int32))


def test_the_bucket_embedding_has_m_plus_one_entries_and_the_target_enters_beside_the_noised_frame():
    plain = tiny().init(jax.random.key(0), SIZE)["params"]
    params = tiny(Interpolation(steps=M)).init(jax.random.key(0), SIZE)["params"]
    assert params["interp_emb"]["embedding"].shape == (M + 1, 16)
    assert set(params) - set(plain) == {"interp_emb"}
    # conv_in sees the n past frames, the target and the noised frame: 3 more input channels.
    assert plain["conv_in"]["kernel"].shape[2] == 3 * N + 3
    assert params["conv_in"]["kernel"].shape[2] == 3 * N + 6


def test_intermediate_targets_blend_toward_the_target_with_a_growing_weight():
    ip = Interpolation(steps=10, intermediate_targets=True, intermediate_power=2.0)
    steps = jnp.array([0, 4, 9])
    np.testing.assert_allclose(target_weight(ip, steps), [0.01, 0.25, 1.0], rtol=1e-6)  # ((s + 1) / 10) ** 2
    current, target = jnp.full((3, 2, 2, 3), -1.0), jnp.full((3, 2, 2, 3), 1.0)
    np.testing.assert_allclose(seen_target(ip, current, target, steps)[:, 0, 0, 0], [-0.98, -0.5, 1.0], rtol=1e-6)
    off = dataclasses.replace(ip, intermediate_targets=False)
    np.testing.assert_allclose(seen_target(off, current, target, steps)[:, 0, 0, 0], [1.0, 1.0, 1.0])


def test_motion_weighting_weighs_moving_segments_more_with_a_batch_mean_of_one():
    still = np.zeros((1, 3, 2, 2, 3), np.float32)
    moving = np.zeros((1, 3, 2, 2, 3), np.float32)
    moving[0, 1] = 0.5  # consecutive squared differences 0.25, 0.25: motion 0.25, the batch mean 0.125
    obs = jnp.asarray(np.concatenate([still, moving]))
    ip = Interpolation(steps=2, motion_weighting=True, motion_floor=0.1)
    # (floor + motion / mean) / (floor + 1): (0.1 + 0) / 1.1 and (0.1 + 2) / 1.1.
    np.testing.assert_allclose(motion_weights(ip, obs), [0.1 / 1.1, 2.1 / 1.1], rtol=1e-6)
    np.testing.assert_allclose(motion_weights(dataclasses.replace(ip, motion_weighting=False), obs), [1, 1])


def test_interpolation_fields_are_validated_with_the_fix():
    for fields, match in (({"denoiser.interpolation.steps": -1}, "interpolation.steps"),
                          ({"denoiser.interpolation.steps": 4, "denoiser.interpolation.p_interpolate": 1.5},
                           "p_interpolate"),
                          ({"denoiser.interpolation.steps": 4, "denoiser.interpolation.intermediate_power": 0.0},
                           "intermediate_power"),
                          ({"denoiser.interpolation.steps": 1, "denoiser.training.num_autoregressive_steps": 2},
                           "num_autoregressive_steps")):
        with pytest.raises(ConfigError, match=match):
            validate(with_fields(wm_configs.get_config("debug"), **fields))


# ---- Detectors.


def test_pooling_and_the_nearest_buffer_frame_by_hand():
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
    np.testing.assert_allclose(drift.pool_frames(x, 2)[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
    buffer = jnp.stack([jnp.zeros((2, 2, 3)), jnp.ones((2, 2, 3)), jnp.full((2, 2, 3), -0.5)])
    frames = jnp.stack([jnp.full((2, 2, 3), 0.9), jnp.full((2, 2, 3), -0.2)])
    distance, index = drift.nearest(frames, buffer, 1)
    np.testing.assert_allclose(distance, [0.01, 0.04], rtol=1e-4)  # 0.1 ** 2 to ones, 0.2 ** 2 to zeros
    np.testing.assert_array_equal(index, [1, 0])


def test_roc_auc_by_hand():
    # Positives 2 and 4 against negatives 1, 2, 3: 2 beats 1, ties 2 (half), loses to 3; 4 beats all: 4.5 / 6.
    assert drift.roc_auc([1, 2, 3], [2, 4]) == pytest.approx(0.75)
    assert drift.roc_auc([0, 0], [1]) == 1.0 and drift.roc_auc([1], [0, 0]) == 0.0


def ramp_frames(rng, count, length):
    """Uniform grey frames whose level walks in small steps (a stand-in for real play: always some change)."""
    # Steps of 4 levels from a start in [-0.3, 0.3]: 12 steps stay inside [-1, 1], so no frame repeats.
    levels = np.cumsum(rng.choice([-1, 1], (count, length)) * 4, axis=1) / 127.5 + rng.uniform(-0.3, 0.3, (count, 1))
    return np.broadcast_to(levels[:, :, None, None, None], (count, length, SIZE, SIZE, 3)).astype(np.float32)


def test_the_detectors_fire_on_frozen_and_noise_frames_and_not_on_real_ones():
    rng = np.random.default_rng(0)
    cfg = drift.DriftConfig(stuck_window=6, stuck_threshold=1e-5, jump_threshold=0.05, novelty_window=3,
                            novelty_threshold=1e-3, pool=1)
    real = ramp_frames(rng, 6, 12)
    buffer = jnp.asarray(ramp_frames(rng, 60, 12).reshape(-1, SIZE, SIZE, 3))
    frozen = np.repeat(real[:, :1], 12, axis=1)
    noise = np.clip(real + rng.normal(0, 0.2, real.shape), -1, 1).astype(np.float32)

    def fires(frames):
        change = np.mean((frames[:, 1:] - frames[:, :-1]) ** 2, axis=(2, 3, 4))
        novelty = np.asarray(drift.nearest(jnp.asarray(frames.reshape((-1,) + frames.shape[2:])), buffer, 1)[0])
        stuck, novel = drift.window_scores(change, novelty.reshape(len(frames), -1), cfg)
        return (stuck[:, -1] < cfg.stuck_threshold) | (novel[:, -1] > cfg.novelty_threshold) | (
            change.max(axis=1) > cfg.jump_threshold)

    assert not fires(real).any()
    assert fires(frozen).all()
    assert fires(noise).all()


# ---- Recovery, on a tiny model trained here to interpolate.


def interpolation_segments(key, b):
    """n frames at a grey level, then m frames that move to another level as the intermediate targets do (each
    frame k of the m: the one before plus (k + 1) / m of the way left to the end level); a quarter stay still."""
    start, end = jax.random.uniform(key, (2, b), minval=-0.8, maxval=0.8)
    end = jnp.where(jnp.arange(b) < b // 4, start, end)
    levels = [start] * N
    for k in range(M):
        levels.append(levels[-1] + (k + 1) / M * (end - levels[-1]))
    levels = jnp.floor((jnp.stack(levels, axis=1) + 1) * 127.5) / 127.5 - 1
    obs = jnp.broadcast_to(levels[:, :, None, None, None], (b, N + M, SIZE, SIZE, 3))
    zeros = jnp.zeros((b, N + M), jnp.int32)
    return Batch(obs, zeros, zeros.astype(jnp.float32), zeros, zeros, jnp.ones((b, N + M), bool))


@pytest.fixture(scope="module")
def trained():
    """A denoiser without actions (one action) trained for 1,500 updates of 16 segments (seconds, after
    compilation) to predict and to interpolate; as a world model of 8x8 frames."""
    ip = Interpolation(steps=M, p_interpolate=0.75, intermediate_targets=True, intermediate_power=1.0)
    denoiser = tiny(ip, num_actions=1)
    variables = denoiser.init(jax.random.key(0), SIZE)
    optimizer = optax.adam(1e-2)

    @jax.jit
    def update(state, key):
        params, opt_state = state
        key_batch, key_loss = jax.random.split(key)
        grads, _ = jax.grad(denoiser.loss, has_aux=True)(params, variables["buffers"],
                                                         interpolation_segments(key_batch, 16), key_loss)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    state = (variables["params"], optimizer.init(variables["params"]))
    for i in range(1500):
        state = update(state, jax.random.fold_in(jax.random.key(1), i))
    model = WorldModel(denoiser, SamplerConfig(), (SIZE, SIZE))
    return model, {"denoiser": {"params": state[0], "buffers": variables["buffers"]}}


def recover(model, variables, start, goal, num_steps):
    """A rollout from a still context at level `start` whose first frame fires a detector (a stuck threshold
    nothing stays under), with a buffer of one frame at level `goal`: mean level per step, and the Scores."""
    context = Frames(jnp.full((1, N, SIZE, SIZE, 3), start), None)
    buffer = jnp.full((1, SIZE, SIZE, 3), goal)
    cfg = drift.DriftConfig(stuck_window=1, stuck_threshold=1e9, recovery=True)
    act = jnp.zeros((1, N + num_steps - 1), jnp.int32)
    frames, scores = drift.rollout(model, variables, jax.random.key(3), context, act, num_steps, buffer, cfg)
    return np.asarray(frames.low[0].mean(axis=(1, 2, 3))), scores


def test_recovery_reaches_the_targets_neighbourhood_within_m_steps(trained):
    model, variables = trained
    for start, goal in ((-0.6, 0.6), (0.5, -0.5)):
        levels, scores = recover(model, variables, start, goal, M + 1)
        # Frame 0 is drawn autoregressively and fires; frames 1..m interpolate toward the goal.
        np.testing.assert_array_equal(np.asarray(scores.fired[0]), [True] + [False] * M)
        np.testing.assert_array_equal(np.asarray(scores.recovering[0]), [False] + [True] * M)
        # The neighbourhood: within 0.15 of the goal's level (19 of 255 levels), from 1.0 or 1.2 away.
        assert abs(levels[M] - goal) < 0.15, (start, goal, levels)


def test_interpolating_toward_the_current_frame_without_actions_stays_at_it(trained):
    model, variables = trained
    levels, scores = recover(model, variables, 0.2, 0.2, M + 1)
    assert np.asarray(scores.recovering[0, 1:]).all()
    np.testing.assert_allclose(levels, 0.2, atol=0.08)


def test_without_recovery_the_rollout_is_the_world_models(trained):
    model, variables = trained
    context = Frames(jnp.full((2, N, SIZE, SIZE, 3), 0.3), None)
    act = jnp.zeros((2, N + 4), jnp.int32)
    cfg = drift.DriftConfig(stuck_window=1, stuck_threshold=1e9)  # fires at every step, but does not recover
    frames, scores = drift.rollout(model, variables, jax.random.key(5), context, act, 5,
                                   jnp.zeros((3, SIZE, SIZE, 3)), cfg)
    np.testing.assert_array_equal(frames.low, model.rollout(variables, jax.random.key(5), context, act, 5).low)
    assert np.asarray(scores.fired).all() and not np.asarray(scores.recovering).any()
    with pytest.raises(ValueError, match="not trained"):
        drift.rollout(WorldModel(tiny(num_actions=1), SamplerConfig(), (SIZE, SIZE)), None, jax.random.key(0),
                      context, act, 5, jnp.zeros((3, SIZE, SIZE, 3)), dataclasses.replace(cfg, recovery=True))


def test_a_rollout_in_chunks_draws_what_one_rollout_draws(trained):
    model, variables = trained
    context = Frames(jnp.full((1, N, SIZE, SIZE, 3), -0.4), None)
    act = jnp.zeros((1, N + 6), jnp.int32)
    buffer = jnp.full((1, SIZE, SIZE, 3), 0.4)
    cfg = drift.DriftConfig(stuck_window=1, stuck_threshold=1e9, recovery=True)
    frames, scores = drift.rollout(model, variables, jax.random.key(7), context, act, 7, buffer, cfg)
    keys, inputs = jax.random.split(jax.random.key(7), 7), drift.recovery_inputs(model, buffer, cfg)
    state, first, first_scores = drift.rollout_chunk(model, variables, keys[:3], drift.init_state(context, cfg),
                                                     act[:, :3 + N - 1], inputs, cfg)
    _, second, second_scores = drift.rollout_chunk(model, variables, keys[3:], state, act[:, 3:], inputs, cfg)
    np.testing.assert_array_equal(np.concatenate([first.low, second.low], axis=1), frames.low)
    np.testing.assert_array_equal(np.concatenate([first_scores.recovering, second_scores.recovering], axis=1),
                                  scores.recovering)
    assert np.asarray(scores.recovering).any()  # the chunks cut through a recovery


# ---- The tools.


def test_dream_recovers_on_an_interpolation_run_and_refuses_one_without(tmp_path):
    """`dream --recovery` on a world-model run trained with interpolation: the rollout and drift.json, whose
    counts are per row and within the steps drawn; a run without interpolation is refused with the reason."""
    from diamond_jax import dream
    from diamond_jax.data.importers import import_npz
    from diamond_jax.training import parallel
    from diamond_jax.world_model.train import WorldModelTrainer

    src = tmp_path / "npz"
    src.mkdir()
    rng = np.random.default_rng(0)
    for e in range(3):
        np.savez(src / f"episode_{e}.npz", obs=rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
                 act=rng.integers(0, 4, 16))
    dataset = import_npz(str(src), str(tmp_path / "ds"), action_kind="discrete", test_fraction=0.34)
    steps = 6
    for name, m in (("interp", 2), ("plain", 0)):
        config = with_fields(wm_configs.get_config("debug"), **{
            "training.num_steps": 1, "training.test_every": 1, "training.video_steps": 1,
            "denoiser.interpolation.steps": m})
        WorldModelTrainer(config, dataset.path, str(tmp_path / name),
                          mesh=parallel.make_mesh(devices=jax.devices()[:1])).run()
    flags = [f"--steps={steps}", "--rows=2", "--format=gif", "--actions=random", "--recovery"]
    result = dream.main([f"--workdir={tmp_path / 'interp'}", f"--out={tmp_path / 'dream'}"] + flags)
    summary = json.loads((tmp_path / "dream" / "drift.json").read_text())
    assert summary == result["drift"] and result["imagined"].shape[:2] == (2, steps + 1)
    for key in ("detections_per_row", "recovered_frames_per_row"):
        assert len(summary[key]) == 2 and all(0 <= v <= steps for v in summary[key])
    with pytest.raises(SystemExit, match="--recovery"):
        dream.main([f"--workdir={tmp_path / 'plain'}", f"--out={tmp_path / 'dream2'}"] + flags)
