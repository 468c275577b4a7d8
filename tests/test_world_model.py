"""World models of recorded play: actions of every kind, frames of any size, the upsampler, training with resume,
and the evaluation, on real Atari play recorded at full resolution and on a synthetic dataset of continuous
actions."""

import glob
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import atari100k, world_model as wm_configs
from conftest import with_fields
from diamond_jax.config import ConfigError
from diamond_jax.data.importers import import_npz
from diamond_jax.data.recorded import ActionSpec, DatasetWriter
from diamond_jax.envs.record import record
from diamond_jax.models.denoiser import Denoiser, pad_to_multiple
from diamond_jax.models.upsampler import Upsampler, resize_frames
from diamond_jax.training import parallel
from diamond_jax.training.loop import Preempted
from diamond_jax.world_model import evaluate, metrics
from diamond_jax.world_model.model import Frames, WorldModel
from diamond_jax.world_model.run import load_run
from diamond_jax.world_model.train import WorldModelTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wm_config(*presets, **overrides):
    return with_fields(wm_configs.get_config(",".join(("debug",) + presets)), **overrides)


def one_device_mesh():
    return parallel.make_mesh(devices=jax.devices()[:1])


def tiny_denoiser(kind="discrete", size=3, channels=(8, 8)):
    return Denoiser(num_actions=size, num_steps_conditioning=2, cond_channels=16, depths=(1,) * len(channels),
                    channels=channels, attn_depths=(0,) * len(channels), action_kind=kind)


# ---- The models.


def test_pad_to_multiple_repeats_the_bottom_row_and_right_column():
    x = np.arange(6, dtype=np.float32).reshape(1, 3, 2, 1)  # rows [0 1], [2 3], [4 5]
    want = np.array([[0, 1, 1, 1], [2, 3, 3, 3], [4, 5, 5, 5], [4, 5, 5, 5]], np.float32)
    np.testing.assert_array_equal(np.asarray(pad_to_multiple(jnp.asarray(x), 4))[0, :, :, 0], want)
    assert pad_to_multiple(jnp.asarray(x[:, :2]), 2).shape == (1, 2, 2, 1)


def test_the_denoiser_draws_frames_whose_size_its_levels_do_not_divide():
    denoiser = tiny_denoiser(channels=(8, 8, 8))  # two downsamplings: sizes padded to multiples of 4
    variables = denoiser.init(jax.random.key(0), (18, 14))
    x = jax.random.normal(jax.random.key(1), (2, 18, 14, 3))
    obs = jax.random.uniform(jax.random.key(2), (2, 2, 18, 14, 3), minval=-1, maxval=1)
    out = denoiser.denoise(variables, x, jnp.float32(1.0), obs, jnp.array([[0, 1], [2, 0]]))
    assert out.shape == (2, 18, 14, 3)
    levels = (np.asarray(out) + 1) * 127.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # on the uint8 grid


@pytest.mark.parametrize("kind", ["multi_hot", "continuous"])
def test_vector_actions_enter_through_a_linear_map_without_bias(kind):
    denoiser = tiny_denoiser(kind, size=3)
    variables = denoiser.init(jax.random.key(0), 8)
    kernel = np.asarray(variables["params"]["act_proj"]["kernel"])  # [size, cond_channels / n]
    assert kernel.shape == (3, 8)
    a = np.array([[[1, 0, 0], [0, 1, 1]]], np.float32)
    b = np.array([[[0.5, -2, 0], [0, 0, 3]]], np.float32)

    def embed(act):
        """The embedding of the actions inside a call of the U-Net (the output of its act_proj layer)."""
        x, obs = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 6))
        _, captured = denoiser.inner_model.apply(variables, x, jnp.zeros((1,)), obs, jnp.asarray(act),
                                                 capture_intermediates=True)
        return np.asarray(captured["intermediates"]["act_proj"]["__call__"][0]).reshape(1, -1)

    np.testing.assert_allclose(embed(a), np.concatenate([a[0, 0] @ kernel, a[0, 1] @ kernel])[None], rtol=1e-5)
    np.testing.assert_allclose(embed(a + b), embed(a) + embed(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(embed(np.zeros_like(a)), 0)


def test_the_action_kind_and_size_must_agree():
    with pytest.raises(ValueError, match="action_kind='joystick'"):
        tiny_denoiser("joystick")
    with pytest.raises(ValueError, match="0 goes with 'none'"):
        tiny_denoiser("none", size=3)


def test_resizing_keeps_a_constant_frame_and_snaps_to_uint8_levels():
    constant = jnp.full((1, 12, 10, 3), 100 / 127.5 - 1)
    for size in ((24, 20), (6, 5), (12, 10)):
        out = np.asarray(resize_frames(constant, size))
        assert out.shape == (1, *size, 3)
        np.testing.assert_allclose(out, 100 / 127.5 - 1, atol=1e-6)
    noise = jax.random.uniform(jax.random.key(0), (1, 12, 10, 3), minval=-1, maxval=1)
    levels = (np.asarray(resize_frames(noise, (5, 7))) + 1) * 127.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)


def test_the_upsampler_sees_its_past_full_frames_then_the_low_resolution_frame():
    denoiser = tiny_denoiser("none", size=0)
    upsampler = Upsampler(denoiser, (8, 6))  # num_steps_conditioning 2: one past frame + the low-res frame
    obs = jax.random.uniform(jax.random.key(0), (2, 2, 8, 6, 3), minval=-1, maxval=1)
    low = jnp.stack([jnp.full((2, 4, 3, 3), -0.2), jnp.full((2, 4, 3, 3), 0.6)], axis=1)
    batch = upsampler.batch(obs, low)
    assert batch.obs.shape == (2, 3, 8, 6, 3) and bool(batch.mask_padding.all())
    np.testing.assert_array_equal(batch.obs[:, 0], obs[:, 0])  # the past full-resolution frame
    np.testing.assert_allclose(batch.obs[:, 1], np.round(1.6 / 2 * 255) / 127.5 - 1, atol=1e-6)  # low-res of the next
    np.testing.assert_array_equal(batch.obs[:, 2], obs[:, 1])  # the frame to draw
    with pytest.raises(ValueError, match="takes no actions"):
        Upsampler(tiny_denoiser(), (8, 6))


def test_a_rollout_is_a_loop_of_steps_on_the_models_own_frames():
    config = wm_config("upsampler")
    model = WorldModel.from_config(config, 3, (20, 16))
    variables = model.init(jax.random.key(0))
    n, steps = model.num_steps_conditioning, 3
    frames = jax.random.randint(jax.random.key(1), (2, n, 20, 16, 3), 0, 256).astype(jnp.uint8)
    context = model.frames(frames)
    act = jnp.array([[0, 1, 2, 1], [2, 2, 0, 1]])
    key = jax.random.key(2)
    drawn = model.rollout(variables, key, context, act, steps)
    ctx = context
    for k, key_k in enumerate(jax.random.split(key, steps)):
        nxt = model.step(variables, key_k, ctx, act[:, k:k + n])
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[:, k], drawn), nxt, atol=1e-6)
        ctx = Frames(jnp.concatenate([ctx.low[:, 1:], nxt.low[:, None]], 1),
                     jnp.concatenate([ctx.full[:, 1:], nxt.full[:, None]], 1))
    assert drawn.low.shape == (2, steps, 16, 16, 3) and drawn.full.shape == (2, steps, 20, 16, 3)


def test_other_actions_for_the_sensitivity_measure_differ_as_documented():
    rng = np.random.default_rng(0)
    act = rng.integers(0, 4, 50).astype(np.int32)
    other = evaluate.alternative_actions(act, ActionSpec("discrete", 4), rng)
    assert (other != act).all() and other.min() >= 0 and other.max() < 4
    hot = rng.integers(0, 2, (50, 5)).astype(np.float32)
    flipped = evaluate.alternative_actions(hot, ActionSpec("multi_hot", 5), rng)
    assert ((flipped != hot).sum(axis=1) == 1).all() and set(np.unique(flipped)) <= {0.0, 1.0}
    cont = rng.normal(size=(50, 2)).astype(np.float32)
    shuffled = evaluate.alternative_actions(cont, ActionSpec("continuous", 2), rng)
    assert sorted(map(tuple, shuffled)) == sorted(map(tuple, cont))


# ---- Datasets: real Atari play at 210x160, and continuous actions imported from .npz episodes.


@pytest.fixture(scope="module")
def pong(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pong") / "pong")
    return record(atari100k.get_config("game=Pong"), path, episodes=3, max_steps=12, seed=1, test_fraction=0.34)


@pytest.fixture(scope="module")
def continuous(tmp_path_factory):
    """A dot moved by a 2-D continuous action, as .npz episodes imported."""
    src = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    for e in range(4):
        act = rng.uniform(-1, 1, (14, 2)).astype(np.float32)
        obs = np.zeros((14, 24, 20, 3), np.uint8)
        y, x = 5, 8
        for t in range(14):
            obs[t, y:y + 2, x:x + 2] = 255
            y, x = int(np.clip(y + np.sign(act[t, 0]), 0, 22)), int(np.clip(x + np.sign(act[t, 1]), 0, 18))
        np.savez(src / f"episode_{e}.npz", obs=obs, act=act)
    return import_npz(str(src), str(tmp_path_factory.mktemp("cont") / "ds"), action_kind="continuous",
                      test_fraction=0.25)


# The upsampler draws a quarter of the recorded 210x160: the suite's CPU time, not the model, sets the size.
PONG_FULL = (52, 40)


def pong_config(**overrides):
    return wm_config("upsampler", **{"upsampler.resolution": PONG_FULL, **overrides})


@pytest.fixture(scope="module")
def pong_run(pong, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pong_run"))
    results = WorldModelTrainer(pong_config(), pong.path, workdir, mesh=one_device_mesh()).run()
    return workdir, results


def test_a_run_on_recorded_atari_trains_both_models_and_logs_tests_and_videos(pong_run):
    workdir, results = pong_run
    assert results["steps"] == 6 and set(results["test_loss"]) == {"denoiser", "upsampler"}
    assert all(np.isfinite(v) for v in results["test_loss"].values())
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f) == results
    assert sorted(map(int, os.listdir(os.path.join(workdir, "checkpoints")))) == [4, 6]  # keep 2, every 4, the end
    from diamond_jax.training.logger import read_events

    tags = {v.tag for path in glob.glob(os.path.join(workdir, "tensorboard", "events.*"))
            for e in read_events(path) for v in e.summary.value}
    assert {"denoiser/train/loss_denoising", "upsampler/train/loss_denoising", "test/denoiser/loss_denoising",
            "test/rollout", "test/rollout_full_resolution"} <= tags
    run = load_run(workdir)
    assert run.step == 6 and run.model.upsampler.size == PONG_FULL and run.dataset["frame_shape"] == [210, 160]


class StopsAfter(WorldModelTrainer):
    def __init__(self, *args, stop_after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._stop_after = stop_after

    def train_segments(self, name):
        if self.step == self._stop_after:
            self.request_stop()
        return super().train_segments(name)


def test_stopped_and_resumed_equals_uninterrupted(pong, pong_run, tmp_path):
    workdir = str(tmp_path)
    with pytest.raises(Preempted):
        StopsAfter(pong_config(), pong.path, workdir, mesh=one_device_mesh(), stop_after=2).run()
    assert sorted(map(int, os.listdir(os.path.join(workdir, "checkpoints")))) == [3]
    results = WorldModelTrainer(pong_config(), pong.path, workdir, mesh=one_device_mesh()).run()
    assert results["test_loss"] == pong_run[1]["test_loss"]
    chex.assert_trees_all_equal(load_run(workdir).variables, load_run(pong_run[0]).variables)


def test_a_resume_on_frames_of_another_size_is_refused(pong, pong_run, tmp_path):
    with DatasetWriter(str(tmp_path / "small"), pong.action, test_fraction=0.5) as writer:
        for _ in range(2):
            writer.add_episode(np.zeros((12, 100, 80, 3), np.uint8), np.zeros(12, np.int32))
        small = writer.commit()
    with pytest.raises(ValueError, match=r"holds a run trained on a dataset with frame_shape \[210, 160\]"):
        WorldModelTrainer(pong_config(), small.path, pong_run[0])


def test_the_config_is_held_against_the_dataset(pong, tmp_path):
    with pytest.raises(ConfigError, match="config.action_kind='continuous' but .* has discrete actions"):
        WorldModelTrainer(wm_config(action_kind="continuous"), pong.path, str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="segments of 13 frames, but the longest episode .* has 12"):
        WorldModelTrainer(wm_config(**{"denoiser.training.num_autoregressive_steps": 11}), pong.path,
                          str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


@pytest.fixture(scope="module")
def continuous_runs(continuous, tmp_path_factory):
    """Workdirs and models of one update of both models on continuous actions, on 1 and on 2 devices."""
    config = wm_config("upsampler", action_kind="continuous", **{"training.num_steps": 1})
    runs = []
    for mesh in (one_device_mesh(), parallel.make_mesh(devices=jax.devices()[:2])):
        workdir = str(tmp_path_factory.mktemp(f"continuous_{mesh.size}"))
        trainer = WorldModelTrainer(config, continuous.path, workdir, mesh=mesh)
        trainer.run()
        runs.append((workdir, jax.device_get({n: s.params for n, s in trainer.state.items()})))
    return runs


def test_one_update_on_two_devices_equals_one_on_one(continuous_runs):
    (_, one), (_, two) = continuous_runs
    assert set(one) == {"denoiser", "upsampler"}
    chex.assert_trees_all_close(one, two, rtol=1e-4, atol=1e-6)


def test_the_evaluation_scores_drawn_frames_against_the_real_ones(pong, pong_run):
    run = load_run(pong_run[0])
    options = evaluate.EvalOptions(num_segments=4, horizons=(1, 2, 50), batch_size=2, timing_calls=2)
    evaluator = evaluate.Evaluator(run, pong, metrics.MetricWeights.load(), options)
    results = evaluator.run()
    n = run.model.num_steps_conditioning
    assert results["horizons"] == [1, 2] and any("horizons above 10 skipped" in s for s in results["notes"])
    assert any(s.startswith("LPIPS skipped") for s in results["notes"]) and results["fvd"] == {"low": None,
                                                                                                 "full": None}
    for level, shape in (("low", (16, 16)), ("full", PONG_FULL)):
        real, drawn = evaluator.real[level], evaluator.drawn[level]
        assert drawn.shape == (4, 2, *shape, 3) and real.shape == (4, n + 2, *shape, 3)
        for i, h in enumerate(results["horizons"]):
            err = (real[:, n + h - 1].astype(np.float64) - drawn[:, h - 1]) ** 2
            psnr = 10 * np.log10(255 ** 2 / err.mean(axis=(1, 2, 3)))
            assert results["open_loop"][level]["psnr_db"][i] == pytest.approx(psnr[np.isfinite(psnr)].mean())
            # The trivial baseline: the last context frame held, against the same real frame.
            err = (real[:, n + h - 1].astype(np.float64) - real[:, n - 1]) ** 2
            with np.errstate(divide="ignore"):
                psnr = 10 * np.log10(255 ** 2 / err.mean(axis=(1, 2, 3)))
            copy = results["copy_last_frame"][level]["open_loop"]
            if np.isfinite(psnr).any():
                assert copy["psnr_db"][i] == pytest.approx(psnr[np.isfinite(psnr)].mean())
            assert copy["psnr_identical_fraction"][i] == pytest.approx(np.mean(~np.isfinite(psnr)))
    sens = results["action_sensitivity"]
    assert 0 <= sens["action_changed_pixels"] <= 1 and sens["noise_mean_abs_levels"] > 0
    assert all(v > 0 for v in results["sampling"].values())


def test_the_command_lines_evaluate_and_refuse_bad_input(continuous, continuous_runs, tmp_path):
    bad = subprocess.run([sys.executable, "-m", "diamond_jax.world_model", "--config=configs/world_model.py:debug",
                          f"--dataset={continuous.path}", f"--workdir={tmp_path / 'run'}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error: config.action_kind='discrete' but" in bad.stderr
    assert "Traceback" not in bad.stderr and not os.path.exists(tmp_path / "run")
    # Trained on 2 devices, evaluated on the 1 of a plain process: the checkpoint is restored onto it.
    out = str(tmp_path / "eval")
    evaluation = subprocess.run([sys.executable, "-m", "diamond_jax.world_model_eval",
                                 f"--workdir={continuous_runs[1][0]}", f"--out={out}", "--num_segments=2",
                                 "--horizons=1,3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["eval.json", "horizons.png", "rollouts.png"]
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f)["resolution"] == {"low": [16, 16], "full": [24, 20]}
    assert "LPIPS skipped" in evaluation.stdout
    missing = subprocess.run([sys.executable, "-m", "diamond_jax.world_model_eval", f"--workdir={tmp_path}"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "holds no world-model run" in missing.stderr
