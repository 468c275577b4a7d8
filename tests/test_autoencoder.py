"""The autoencoder of latent world models: its numerics against diffusers' AutoencoderKL (converted from random
weights), its folder format, its trainer (end to end, resumed), and the latent world model built on it.

diffusers and torch are the independent reference: a tiny AutoencoderKL built from a config with random weights
is saved as save_pretrained writes it, converted, and both models encode and decode the same frames.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diamond_jax import convert_vae
from diamond_jax.training import autoencoder_export as export
from diamond_jax.models.autoencoder import Autoencoder, kl_divergence

REPO = Path(__file__).resolve().parent.parent
TINY_DIFFUSERS = dict(block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                      down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                      sample_size=16, scaling_factor=0.5, shift_factor=0.25)


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    """(folder, torch model) of a tiny diffusers AutoencoderKL with random weights, saved as safetensors; biases
    and norm affines are randomised too so that a swapped or dropped one shows."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**TINY_DIFFUSERS).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder, safe_serialization=True)
    return folder, vae


def _frames(b=2, size=16, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (b, size, size, 3)).astype(np.float32)


def test_converted_diffusers_autoencoder_encodes_and_decodes_as_diffusers(diffusers_vae, tmp_path):
    torch = pytest.importorskip("torch")
    folder, vae = diffusers_vae
    message = convert_vae.convert_folder(str(folder), str(tmp_path / "out"))
    autoencoder, variables = export.load_export(str(tmp_path / "out"))
    n_tensors = len(vae.state_dict())
    assert message.startswith(f"{n_tensors} tensors")  # every tensor mapped
    assert autoencoder.downsampling == 2 and autoencoder.scaling_factor == 0.5 and autoencoder.shift_factor == 0.25

    x = _frames()
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
        mean_ref = posterior.mean.numpy().transpose(0, 2, 3, 1)
        logvar_ref = posterior.logvar.numpy().transpose(0, 2, 3, 1)
        z = np.random.default_rng(1).normal(size=mean_ref.shape).astype(np.float32)
        decoded_ref = vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
    mean, logvar = autoencoder.moments(variables, jnp.asarray(x))
    np.testing.assert_allclose(mean, mean_ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logvar, logvar_ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(autoencoder.decode_unscaled(variables, jnp.asarray(z)), decoded_ref, atol=1e-4, rtol=0)
    # Scaled latents follow diffusers' convention: (mean - shift) * scale, and decode undoes it.
    np.testing.assert_allclose(autoencoder.encode(variables, jnp.asarray(x)), (mean_ref - 0.25) * 0.5, atol=1e-4)
    np.testing.assert_allclose(autoencoder.decode(variables, jnp.asarray((z - 0.25) * 0.5)), decoded_ref, atol=1e-4)


def test_converter_reads_bin_and_old_attention_names(diffusers_vae, tmp_path):
    torch = pytest.importorskip("torch")
    folder, vae = diffusers_vae
    old = {}
    for key, value in vae.state_dict().items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".{new}.", f".{legacy}.")
        old[key] = value
    (tmp_path / "bin").mkdir()
    torch.save(old, tmp_path / "bin" / "diffusion_pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((folder / "config.json").read_text())
    convert_vae.convert_folder(str(tmp_path / "bin"), str(tmp_path / "out"))
    _, variables = export.load_export(str(tmp_path / "out"))
    got = variables["params"]["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"]
    np.testing.assert_array_equal(got, old["encoder.mid_block.attentions.0.query.weight"].numpy().T)


def test_converter_names_every_mismatch(diffusers_vae):
    folder, vae = diffusers_vae
    cfg = json.loads((folder / "config.json").read_text())
    state = {k: v.numpy() for k, v in vae.state_dict().items()}
    del state["decoder.conv_out.bias"]
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"][:4]
    state["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(convert_vae.ConvertError) as e:
        convert_vae.convert(cfg, state, "vae")
    message = str(e.value)
    assert "missing decoder.conv_out.bias" in message
    assert "encoder.conv_in.weight: shape (4, 3, 3, 3), expected (8, 3, 3, 3)" in message
    assert "unexpected extra.weight" in message
    with pytest.raises(convert_vae.ConvertError, match="up_block_types"):
        convert_vae.autoencoder_from_config(dict(cfg, up_block_types=["AttnUpDecoderBlock2D"] * 2), "vae")


def test_convert_vae_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "diamond_jax.convert_vae", f"--diffusers={tmp_path}",
                             f"--out={tmp_path / 'o'}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "config.json does not exist" in result.stderr


def test_kl_divergence_against_hand_computed_values():
    mean = jnp.array([[[[1.0, 0.0]]]])
    logvar = jnp.array([[[[0.0, np.log(2.0)]]]])
    # 0.5 * (1 + 1 - 1 - 0) + 0.5 * (0 + 2 - 1 - ln 2)
    np.testing.assert_allclose(kl_divergence(mean, logvar), [0.5 + 0.5 * (1 - np.log(2))], rtol=1e-6)


def test_sizes_must_divide_by_the_downsampling():
    ae = Autoencoder(block_out_channels=(8, 8, 8), norm_num_groups=4)
    assert ae.latent_shape((32, 16)) == (8, 4, 4)
    with pytest.raises(ValueError, match="downsampling factor 4"):
        ae.latent_shape((30, 16))


# ---- The trainer, on a tiny dataset of a block moved by discrete actions.


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    from diamond_jax.data.recorded import ActionSpec, DatasetWriter

    rng = np.random.default_rng(0)
    with DatasetWriter(str(tmp_path_factory.mktemp("blocks") / "ds"), ActionSpec("discrete", 3),
                       test_fraction=0.25) as writer:
        for _ in range(4):
            act = rng.integers(0, 3, 12).astype(np.int32)
            obs = np.full((12, 16, 16, 3), 40, np.uint8)
            x = 6
            for t in range(12):
                obs[t, 6:10, x:x + 4] = (250, 120, 10)
                x = int(np.clip(x + act[t] - 1, 0, 12))
            writer.add_episode(obs, act)
        return writer.commit()


def ae_config(**overrides):
    from configs import autoencoder as ae_configs
    from conftest import with_fields

    return with_fields(ae_configs.get_config("debug"), **overrides)


def one_device_mesh():
    from diamond_jax.training import parallel

    return parallel.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def ae_run(blocks, tmp_path_factory):
    """One tiny autoencoder trained for 6 updates (the debug preset), shared by the tests below."""
    from diamond_jax.autoencoder.train import AutoencoderTrainer

    workdir = str(tmp_path_factory.mktemp("ae_run"))
    results = AutoencoderTrainer(ae_config(), blocks.path, workdir, mesh=one_device_mesh()).run()
    return workdir, results


def test_a_run_trains_tests_checkpoints_and_exports(ae_run):
    workdir, results = ae_run
    assert results["steps"] == 6 and results["latent_shape"] == [8, 8, 4]
    assert np.isfinite(results["test"]["loss"]) and results["test"]["psnr_db"] > 0 and "ssim" in results["test"]
    assert sorted(map(int, os.listdir(os.path.join(workdir, "checkpoints")))) == [4, 6]
    autoencoder, variables = export.load_export(workdir)  # the workdir's export/ folder
    # scaling_factor 0 in the config: measured as 1 / the std of the posterior means of the scaling frames.
    assert autoencoder.scaling_factor == pytest.approx(results["scaling_factor"])
    assert autoencoder.block_out_channels == (4, 8) and autoencoder.downsampling == 2
    frames = jnp.asarray(_frames(8, 16, seed=3))
    mean, _ = autoencoder.moments(variables, frames)
    z = autoencoder.encode(variables, frames)
    np.testing.assert_allclose(z, mean * autoencoder.scaling_factor, rtol=1e-5, atol=1e-6)
    from diamond_jax.training.logger import read_events
    import glob

    tags = {v.tag for path in glob.glob(os.path.join(workdir, "tensorboard", "events.*"))
            for e in read_events(path) for v in e.summary.value}
    assert {"train/loss", "train/loss_pixel", "train/kl_per_pixel_value", "test/psnr_db", "test/ssim",
            "test/reconstruction"} <= tags


def test_stopped_and_resumed_equals_uninterrupted(blocks, ae_run, tmp_path):
    from diamond_jax.autoencoder.train import AutoencoderTrainer
    from diamond_jax.training.loop import Preempted

    class StopsAfter(AutoencoderTrainer):
        def frames(self, split, rng, n):
            if split == "train" and self.step == 2:
                self.request_stop()
            return super().frames(split, rng, n)

    with pytest.raises(Preempted):
        StopsAfter(ae_config(), blocks.path, str(tmp_path), mesh=one_device_mesh()).run()
    assert sorted(map(int, os.listdir(tmp_path / "checkpoints"))) == [3]  # the update in progress, then saved
    results = AutoencoderTrainer(ae_config(), blocks.path, str(tmp_path), mesh=one_device_mesh()).run()
    assert results["test"] == ae_run[1]["test"]
    for a, b in zip(jax.tree.leaves(export.load_export(str(tmp_path))[1]),
                    jax.tree.leaves(export.load_export(ae_run[0])[1])):
        np.testing.assert_array_equal(a, b)


def test_the_loss_is_l1_plus_weighted_kl_per_pixel_value(blocks):
    """The training loss against numpy, from the same posterior sample."""
    from diamond_jax.autoencoder.train import autoencoder_from_config, make_loss

    config = ae_config(**{"loss.kl_weight": 0.5})
    autoencoder = autoencoder_from_config(config)
    variables = autoencoder.init(jax.random.key(0), (16, 16))
    frames = blocks.sample(np.random.default_rng(0), 2, 1).obs[:, 0]
    key = jax.random.key(1)
    loss, out = make_loss(autoencoder, config)(variables["params"], {}, jnp.asarray(frames), key)
    x = frames.astype(np.float64) / 127.5 - 1  # 16x16 already: no resize
    mean, logvar = (np.asarray(a, np.float64) for a in autoencoder.moments(variables, jnp.asarray(x, jnp.float32)))
    z = mean + np.exp(0.5 * logvar) * np.asarray(jax.random.normal(key, mean.shape))
    recon = np.asarray(autoencoder.decode_unscaled(variables, jnp.asarray(z, jnp.float32)), np.float64)
    kl = 0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar).sum(axis=(1, 2, 3)).mean() / (16 * 16 * 3)
    np.testing.assert_allclose(out["loss_pixel"], np.abs(recon - x).mean(), rtol=1e-4)
    np.testing.assert_allclose(loss, np.abs(recon - x).mean() + 0.5 * kl, rtol=1e-4)


def test_bad_configs_and_inputs_are_refused_before_compute(blocks, tmp_path):
    from diamond_jax.autoencoder import config as ae_cfg
    from diamond_jax.autoencoder.train import AutoencoderTrainer
    from diamond_jax.config import ConfigError

    with pytest.raises(ConfigError, match=r"config.resolution=\(17, 16\): must be divisible by the downsampling "
                                          r"factor 2"):
        ae_cfg.validate(ae_config(resolution=(17, 16)))
    with pytest.raises(ConfigError, match="model.block_out_channels\\[1\\]=6: must be divisible by"):
        ae_cfg.validate(ae_config(**{"model.block_out_channels": (4, 6)}))
    with pytest.raises(ValueError, match="needs LPIPS weights. Fix: pass --lpips_weights"):
        AutoencoderTrainer(ae_config(**{"loss.lpips_weight": 1.0}), blocks.path, str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a")


def test_command_line_trains_and_resumes(blocks, tmp_path):
    args = [sys.executable, "-m", "diamond_jax.autoencoder", "--config=configs/autoencoder.py:debug",
            f"--dataset={blocks.path}", f"--workdir={tmp_path}", "--config.training.num_steps=2"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 2
    assert (tmp_path / "export" / "autoencoder.json").exists()
    bad = subprocess.run(args[:-1] + ["--config.loss.pixel=l3"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "config.loss.pixel='l3'" in bad.stderr


# ---- The latent world model, on the autoencoder trained above.


def wm_config(**overrides):
    from configs import world_model as wm_configs
    from conftest import with_fields

    return with_fields(wm_configs.get_config("debug"), **overrides)


@pytest.fixture(scope="module")
def latent_run(blocks, ae_run, tmp_path_factory):
    from diamond_jax.world_model.train import WorldModelTrainer

    workdir = str(tmp_path_factory.mktemp("latent_run"))
    config = wm_config(**{"denoiser.space": "latent", "autoencoder.path": ae_run[0]})
    trainer = WorldModelTrainer(config, blocks.path, workdir, mesh=one_device_mesh())
    results = trainer.run()
    return workdir, results


def test_a_latent_world_model_trains_on_latents_with_a_measured_sigma_data(blocks, ae_run, latent_run):
    from diamond_jax.world_model.run import load_run

    workdir, results = latent_run
    assert results["steps"] == 6 and np.isfinite(results["test_loss"]["denoiser"])
    record = json.loads(Path(workdir, "latent.json").read_text())
    # sigma_data: the std of every value of the encoded training frames, computed here from the exported
    # autoencoder and the dataset's frames (16x16 already: no resize).
    autoencoder, variables = export.load_export(ae_run[0])
    values = np.concatenate([np.asarray(autoencoder.encode(
        variables, jnp.asarray(blocks.episode(e).obs, jnp.float32) / 127.5 - 1)).ravel()
        for e in blocks.episode_ids("train")])
    assert record["sigma_data_measured"] and record["sigma_data"] == pytest.approx(values.std(), rel=1e-4)
    # The encoded dataset is kept in the workdir, read back on resume instead of encoding again.
    with np.load(Path(workdir, "latents.npz")) as cache:
        e = blocks.episode_ids("train")[0]
        np.testing.assert_allclose(cache[f"episode_{e}"], autoencoder.encode(
            variables, jnp.asarray(blocks.episode(e).obs, jnp.float32) / 127.5 - 1), atol=1e-5)
    assert record["latent_shape"] == [8, 8, 4]
    run = load_run(workdir)
    assert run.model.denoiser.sigma_data == record["sigma_data"] and run.model.denoiser.img_channels == 4
    assert not run.model.denoiser.quantize and run.model.denoised_size == (8, 8)
    # The run keeps its own copy of the autoencoder.
    for a, b in zip(jax.tree.leaves(run.variables["autoencoder"]), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)


def test_a_latent_world_model_draws_decoded_frames_and_is_evaluated_on_them(blocks, latent_run):
    from diamond_jax.world_model import evaluate, metrics
    from diamond_jax.world_model.model import frames_window
    from diamond_jax.world_model.run import load_run

    run = load_run(latent_run[0])
    obs = jnp.asarray(blocks.sample(np.random.default_rng(0), 2, 5, "test").obs)
    real = run.model.frames(obs, run.variables)
    assert real.low.shape == (2, 5, 16, 16, 3) and real.latent.shape == (2, 5, 8, 8, 4) and real.full is None
    drawn = run.model.rollout(run.variables, jax.random.key(0), frames_window(real, slice(None), 0, 2),
                              jnp.zeros((2, 4), jnp.int32), 3)
    assert drawn.low.shape == (2, 3, 16, 16, 3) and drawn.latent.shape == (2, 3, 8, 8, 4)
    # Each shown frame is its latent decoded, on the 256-level grid.
    ae = run.model.autoencoder
    np.testing.assert_allclose(drawn.low, ae.decode_frames(run.variables["autoencoder"], drawn.latent), atol=1e-6)
    np.testing.assert_allclose((np.asarray(drawn.low) + 1) * 127.5, np.round((np.asarray(drawn.low) + 1) * 127.5),
                               atol=1e-3)
    options = evaluate.EvalOptions(num_segments=2, horizons=(1, 2), batch_size=2, fvd_length=2, timing_calls=1)
    results = evaluate.Evaluator(run, blocks, metrics.MetricWeights(None, None, []), options).run()
    assert results["space"] == "latent" and results["open_loop"]["low"]["psnr_db"][0] > 0
    assert results["autoencoder_ceiling"]["psnr_db"] > 0 and "ssim" in results["autoencoder_ceiling"]


def test_latent_configs_are_checked(ae_run):
    from diamond_jax.config import ConfigError
    from diamond_jax.world_model import config as wm_cfg

    with pytest.raises(ConfigError, match="autoencoder.path=''.*Fix: pass --config.autoencoder.path="):
        wm_cfg.validate(wm_config(**{"denoiser.space": "latent"}))
    with pytest.raises(ConfigError, match="upsampler.enabled=True: is not supported with denoiser.space 'latent'"):
        wm_cfg.validate(wm_config(**{"denoiser.space": "latent", "autoencoder.path": ae_run[0],
                                     "upsampler.enabled": True}))
    with pytest.raises(ConfigError, match="interpolation.steps=4: is not supported with denoiser.space 'latent'"):
        wm_cfg.validate(wm_config(**{"denoiser.space": "latent", "autoencoder.path": ae_run[0],
                                     "denoiser.interpolation.steps": 4}))
    with pytest.raises(ConfigError, match="denoiser.space='voxel'"):
        wm_cfg.validate(wm_config(**{"denoiser.space": "voxel"}))


def test_dream_shows_a_latent_world_models_decoded_frames(blocks, latent_run, tmp_path):
    from diamond_jax.world_model import watch

    result = watch.dream(latent_run[0], num_steps=2, out=str(tmp_path), fmt="gif", rows=2, scale=1)
    imagined = result["comparison"].imagined
    assert imagined.shape == (2, 3, 16, 16, 3) and imagined.dtype == np.uint8
    # The first frame shown is the real last context frame; the drawn ones follow, with their PSNR.
    np.testing.assert_array_equal(imagined[:, 0], result["comparison"].real[:, 0])
    assert result["psnr"].shape == (2, 2) and (tmp_path / "imagination.gif").exists()
