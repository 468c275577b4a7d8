import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import atari100k
from diamond_jax.data.batch import Batch
from diamond_jax.models.actor_critic import ActorCritic
from diamond_jax.models.denoiser import Denoiser, compute_conditioners, quantize
from diamond_jax.models.rew_end import RewEndModel
from diamond_jax.training.steps import count_params


@pytest.mark.parametrize("sigma, expected", [
    # sigma' = sqrt(sigma^2 + 0.09) is 0.3, 0.5 and 1 for these sigmas; then by hand with sigma_data = 0.5.
    (0.0, (1 / math.sqrt(0.34), 0.3 * math.sqrt(0.25 / 0.34), 0.25 / 0.34, math.log(0.3) / 4)),
    (0.4, (1 / math.sqrt(0.5), 0.5 * math.sqrt(0.5), 0.5, math.log(0.5) / 4)),
    (math.sqrt(0.91), (1 / math.sqrt(1.25), math.sqrt(0.2), 0.2, 0.0)),
])
def test_conditioners_by_hand(sigma, expected):
    cs = compute_conditioners(jnp.float32(sigma), sigma_data=0.5, sigma_offset_noise=0.3)
    np.testing.assert_allclose([cs.c_in, cs.c_out, cs.c_skip, cs.c_noise], expected, rtol=1e-5, atol=1e-6)


def test_conditioners_without_offset_are_plain_edm():
    sigma = jnp.array([0.1, 1.0, 10.0])
    cs = compute_conditioners(sigma, sigma_data=0.5, sigma_offset_noise=0.0)
    np.testing.assert_allclose(cs.c_skip, 0.25 / (sigma ** 2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(cs.c_out, sigma * 0.5 / jnp.sqrt(sigma ** 2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(cs.c_noise, jnp.log(sigma) / 4, rtol=1e-6)


def test_quantize_matches_uint8_truncation():
    x = jnp.array([-1.5, -1.0, -0.999, 0.0, 0.5, 0.99, 1.0, 2.0])
    expected = np.floor((np.clip(np.asarray(x), -1, 1) + 1) / 2 * 255).astype(np.uint8) / 255 * 2 - 1
    np.testing.assert_allclose(quantize(x), expected, atol=1e-6)
    assert float(quantize(x).max()) <= 1.0 and float(quantize(x).min()) >= -1.0


def test_parameter_counts_equal_the_official_release():
    """Counts measured from the official code for a 4-action game (SPEC section 9)."""
    c = atari100k.get_config()
    key = jax.random.key(0)
    counts = {
        name: count_params(jax.eval_shape(lambda k, m=model: m.init(k, 64), key)["params"])
        for name, model in [("denoiser", Denoiser.from_config(c, 4)), ("rew_end", RewEndModel.from_config(c, 4)),
                            ("actor_critic", ActorCritic.from_config(c, 4))]
    }
    assert counts == {"denoiser": 4_405_955, "rew_end": 5_900_864, "actor_critic": 3_229_637}
    # Only the action embeddings and the policy head depend on the number of actions.
    d18 = count_params(jax.eval_shape(lambda k: Denoiser.from_config(c, 18).init(k, 64), key)["params"])
    assert d18 - counts["denoiser"] == 14 * 64


def perturb_zero_init(params, scale=0.1):
    """The output and second residual convolutions start at zero, which hides the network's inputs."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x + scale * jax.random.normal(jax.random.key(len(str(p))), x.shape)
        if "conv_out" in str(p) or "conv2" in str(p) else x, params)


@pytest.fixture(scope="module")
def debug_denoiser():
    denoiser = Denoiser.from_config(atari100k.get_config("debug"), num_actions=3)
    variables = denoiser.init(jax.random.key(0), 16)
    return denoiser, dict(variables, params=perturb_zero_init(variables["params"]))


def make_batch(key, b=4, t=6, size=16, mask=None):
    k1, k2 = jax.random.split(key)
    obs = quantize(jax.random.uniform(k1, (b, t, size, size, 3), minval=-1, maxval=1))
    mask = jnp.ones((b, t), bool) if mask is None else mask
    obs = jnp.where(mask[:, :, None, None, None], obs, 0.0)
    act = jax.random.randint(k2, (b, t), 0, 3)
    zeros = jnp.zeros((b, t))
    return Batch(obs, act, zeros, zeros.astype(jnp.int32), zeros.astype(jnp.int32), mask)


@dataclasses.dataclass(frozen=True)
class PerfectDenoiser(Denoiser):
    """Knows the clean frame (constant over time in the batches it is given) and outputs F's exact target."""

    def model_output(self, variables, noisy_next_obs, obs, act, cs):
        clean = variables["params"]["frame"]
        return (clean - cs.c_skip * noisy_next_obs) / cs.c_out


def test_loss_is_zero_for_a_perfect_model():
    cfg = atari100k.get_config("debug")
    perfect = PerfectDenoiser(**dataclasses.asdict(Denoiser.from_config(cfg, 3)))
    frame = quantize(jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), minval=-1, maxval=1))
    batch = make_batch(jax.random.key(0))._replace(obs=jnp.broadcast_to(frame[:, None], (4, 6, 16, 16, 3)))
    loss, _ = perfect.loss({"frame": frame}, {}, batch, jax.random.key(2))
    assert float(loss) < 1e-10


class ToyInnerModel(nn.Module):
    """A stand-in for the U-Net whose output a test can write out: F = x + c_noise + newest context frame
    + last action / 10, so the loss shows whether c_in, c_noise, obs / sigma_data, the frame-major stacking
    of the context and the action reach F as documented."""

    @nn.compact
    def __call__(self, noisy_next_obs, c_noise, obs, act):
        return noisy_next_obs + c_noise[:, None, None, None] + obs[..., -3:] + act[:, -1, None, None, None] / 10


@dataclasses.dataclass(frozen=True)
class ToyDenoiser(Denoiser):
    @property
    def inner_model(self):
        return ToyInnerModel()


def numpy_pass(d, key_i, next_obs, context, act, mask):
    """One predicted frame of the loss in float64 numpy, from the EDM formulas (Karras et al. 2022, table 1)
    with the offset noise folded into sigma, and F = ToyInnerModel. The draws are redrawn from the key as the
    loss splits it: (sigma, (offset, pixel noise)). Returns the masked MSE and the quantised denoised frame."""
    key_sigma, key_noise = jax.random.split(key_i)
    key_offset, key_pixels = jax.random.split(key_noise)
    x, context, act = (np.asarray(a, np.float64) for a in (next_obs, context, act))
    b, h, w, c = x.shape
    normal = np.asarray(jax.random.normal(key_sigma, (b,)), np.float64)
    sigma = np.clip(np.exp(normal * d.sigma_scale + d.sigma_loc), d.sigma_train_min, d.sigma_train_max)
    offset = np.asarray(jax.random.normal(key_offset, (b, 1, 1, c)), np.float64)
    pixels = np.asarray(jax.random.normal(key_pixels, x.shape), np.float64)
    noisy = x + d.sigma_offset_noise * offset + sigma[:, None, None, None] * pixels
    s = np.sqrt(sigma ** 2 + d.sigma_offset_noise ** 2)[:, None, None, None]
    c_in = 1 / np.sqrt(s ** 2 + d.sigma_data ** 2)
    c_skip = d.sigma_data ** 2 / (s ** 2 + d.sigma_data ** 2)
    c_out = s * d.sigma_data / np.sqrt(s ** 2 + d.sigma_data ** 2)
    c_noise = np.log(s) / 4
    f = c_in * noisy + c_noise + context[:, -1] / d.sigma_data + act[:, -1, None, None, None] / 10
    target = (x - c_skip * noisy) / c_out
    valid = np.asarray(mask, bool)
    mse = np.mean((f[valid] - target[valid]) ** 2)
    denoised = np.floor((np.clip(c_skip * noisy + c_out * f, -1, 1) + 1) / 2 * 255) / 127.5 - 1
    return mse, denoised


@pytest.fixture(scope="module")
def toy_denoiser():
    return ToyDenoiser(**dataclasses.asdict(Denoiser.from_config(atari100k.get_config("debug"), 3)))


def test_loss_equals_a_numpy_computation_from_the_edm_formulas(toy_denoiser):
    """One predicted frame (t = n + 1), some rows padded."""
    d = toy_denoiser
    mask = jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    batch = make_batch(jax.random.key(0), t=5, mask=mask)
    key = jax.random.key(5)
    loss, _ = d.loss({}, {}, batch, key)
    expected, _ = numpy_pass(d, jax.random.split(key, 1)[0], batch.obs[:, 4], batch.obs[:, :4], batch.act[:, :4],
                             mask[:, 4])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_loss_ignores_padded_positions(debug_denoiser):
    denoiser, variables = debug_denoiser
    mask = jnp.array([[1] * 5, [0] * 5, [1] * 5, [0] * 5], bool)
    batch = make_batch(jax.random.key(0), t=5, mask=mask)
    garbage = batch.obs.at[1].set(0.7).at[3].set(-0.2)
    key = jax.random.key(1)
    a, _ = denoiser.loss(variables["params"], variables["buffers"], batch, key)
    b, _ = denoiser.loss(variables["params"], variables["buffers"], batch._replace(obs=garbage), key)
    assert float(a) == float(b)
    c, _ = denoiser.loss(variables["params"], variables["buffers"], batch._replace(obs=batch.obs.at[0, 4].add(0.5)),
                         key)
    assert float(c) != float(a)


def test_second_pass_conditions_on_the_first_passs_denoised_output(toy_denoiser):
    """The two-pass loss in numpy: the second pass's newest context frame is the first pass's clipped,
    quantised denoised output, not the real frame."""
    d = toy_denoiser
    n = d.num_steps_conditioning
    batch = make_batch(jax.random.key(0), t=n + 2)
    obs, act, mask = np.asarray(batch.obs), np.asarray(batch.act), np.ones(4, bool)
    key = jax.random.key(3)
    loss, _ = d.loss({}, {}, batch, key)

    k1, k2 = jax.random.split(key, 2)
    loss_1, denoised = numpy_pass(d, k1, obs[:, n], obs[:, :n], act[:, :n], mask)
    own_context = np.concatenate([obs[:, 1:n], denoised[:, None]], axis=1)
    loss_2, _ = numpy_pass(d, k2, obs[:, n + 1], own_context, act[:, 1:n + 1], mask)
    np.testing.assert_allclose(float(loss), (loss_1 + loss_2) / 2, rtol=1e-5)
    # The check can tell the two contexts apart.
    loss_2_real_context, _ = numpy_pass(d, k2, obs[:, n + 1], obs[:, 1:n + 1], act[:, 1:n + 1], mask)
    assert abs(loss_2_real_context - loss_2) > 1e-3 * loss_2



def normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


@pytest.mark.parametrize("clip", [
    None,  # the configured range [2e-3, 20]: about 0.2% of the draws clipped, nearly all at the top
    (math.exp(-0.4 - 1.2), math.exp(-0.4 + 1.5 * 1.2)),  # bounds at loc - scale and loc + 1.5 scale
])
def test_training_sigmas_are_log_normal_and_clipped(clip):
    """log sigma ~ N(loc, scale^2) clipped to [sigma_min, sigma_max]: the quartiles of log sigma lie at loc and
    loc -+ 0.6745 scale (inside both clip ranges), and the mass at each bound is the normal tail beyond it."""
    d = Denoiser.from_config(atari100k.get_config("debug"), 3)
    loc, scale = -0.4, 1.2
    assert (d.sigma_loc, d.sigma_scale) == (loc, scale)
    if clip is not None:
        d = dataclasses.replace(d, sigma_train_min=clip[0], sigma_train_max=clip[1])
    n = 200_000
    sigma = np.asarray(d.sample_sigma_training(jax.random.key(0), n))
    lo, hi = np.float32(d.sigma_train_min), np.float32(d.sigma_train_max)
    assert sigma.shape == (n,) and sigma.min() >= lo and sigma.max() <= hi
    # The sample median's standard error is 1.25 scale / sqrt(n) = 0.0034, its quartiles' about 0.004.
    np.testing.assert_allclose(np.quantile(np.log(sigma.astype(np.float64)), [0.25, 0.5, 0.75]),
                               [loc - 0.6745 * scale, loc, loc + 0.6745 * scale], atol=0.02)
    for at_bound, tail in [(sigma == lo, normal_cdf((math.log(d.sigma_train_min) - loc) / scale)),
                           (sigma == hi, 1 - normal_cdf((math.log(d.sigma_train_max) - loc) / scale))]:
        # Within 5 binomial standard deviations (the key is fixed, so the test is deterministic).
        assert abs(at_bound.mean() - tail) <= 5 * math.sqrt(tail * (1 - tail) / n) + 1 / n, (at_bound.mean(), tail)


def test_offset_noise_is_one_draw_per_image_and_channel():
    """apply_noise(x, sigma) = x + offset (constant over the pixels of an image's channel, std sigma_offset_noise,
    independent across images and channels) + sigma * per-pixel unit noise."""
    d = Denoiser.from_config(atari100k.get_config("debug"), 3)
    b, size = 4000, 4
    key = jax.random.key(0)
    x = jnp.zeros((b, size, size, 3))
    offset = np.asarray(d.apply_noise(key, x, jnp.zeros(b)))
    np.testing.assert_array_equal(offset, np.broadcast_to(offset[:, :1, :1, :], offset.shape))
    per_image = offset[:, 0, 0, :]  # [b, c]
    # Standard errors: 0.3 / sqrt(2 b) = 0.0034 for each channel's std, 1 / sqrt(b) = 0.016 for a correlation.
    np.testing.assert_allclose(per_image.std(axis=0), d.sigma_offset_noise, atol=0.02)
    np.testing.assert_allclose(per_image.mean(axis=0), 0.0, atol=0.03)
    correlations = np.corrcoef(per_image.T)[np.triu_indices(3, 1)]
    assert np.all(np.abs(correlations) < 0.08), correlations
    # The pixel noise, scaled by each row's sigma, comes on top of the same offset.
    sigma = jnp.linspace(0.5, 2.0, b)
    pixels = (np.asarray(d.apply_noise(key, x + 0.25, sigma)) - 0.25 - offset) / np.asarray(sigma)[:, None, None, None]
    np.testing.assert_allclose(pixels.std(), 1.0, atol=0.01)
    np.testing.assert_allclose(pixels.mean(axis=(1, 2)).std(), 1 / size, rtol=0.05)  # independent over pixels
