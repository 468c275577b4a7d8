import dataclasses
import math

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


def test_loss_equals_a_plain_masked_mean(debug_denoiser):
    """One predicted frame (t = n + 1): recompute the loss with the same draws in plain numpy."""
    denoiser, variables = debug_denoiser
    mask = jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    batch = make_batch(jax.random.key(0), t=5, mask=mask)
    key = jax.random.key(5)
    loss, _ = denoiser.loss(variables["params"], variables["buffers"], batch, key)

    key_step = jax.random.split(key, 1)[0]
    key_sigma, key_noise = jax.random.split(key_step)
    sigma = denoiser.sample_sigma_training(key_sigma, 4)
    next_obs = batch.obs[:, 4]
    noisy = denoiser.apply_noise(key_noise, next_obs, sigma)
    cs = denoiser.conditioners(sigma)
    out = np.asarray(denoiser.model_output(variables, noisy, batch.obs[:, :4], batch.act[:, :4], cs))
    target = (np.asarray(next_obs) - np.asarray(cs.c_skip) * np.asarray(noisy)) / np.asarray(cs.c_out)
    valid = [0, 1, 3]  # row 2's target frame is padding
    expected = np.mean((out[valid] - target[valid]) ** 2)
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


def test_second_pass_conditions_on_the_first_passs_denoised_output(debug_denoiser):
    """The two-pass loss, written out step by step: the second pass's newest context frame is the first pass's
    clipped, quantised denoised output, not the real frame."""
    denoiser, variables = debug_denoiser
    n = denoiser.num_steps_conditioning
    batch = make_batch(jax.random.key(0), t=n + 2)
    key = jax.random.key(3)
    loss, _ = denoiser.loss(variables["params"], variables["buffers"], batch, key)

    def one_pass(key_i, context, act, next_obs):
        k_sigma, k_noise = jax.random.split(key_i)
        sigma = denoiser.sample_sigma_training(k_sigma, 4)
        noisy = denoiser.apply_noise(k_noise, next_obs, sigma)
        cs = denoiser.conditioners(sigma)
        out = denoiser.model_output(variables, noisy, context, act, cs)
        target = (next_obs - cs.c_skip * noisy) / cs.c_out
        return float(jnp.mean((out - target) ** 2)), denoiser.wrap_model_output(noisy, out, cs)

    k1, k2 = jax.random.split(key, 2)
    loss_1, denoised = one_pass(k1, batch.obs[:, :n], batch.act[:, :n], batch.obs[:, n])
    own_context = jnp.concatenate([batch.obs[:, 1:n], denoised[:, None]], axis=1)
    loss_2, _ = one_pass(k2, own_context, batch.act[:, 1:n + 1], batch.obs[:, n + 1])
    np.testing.assert_allclose(float(loss), (loss_1 + loss_2) / 2, rtol=1e-5)
    loss_2_real_context, _ = one_pass(k2, batch.obs[:, 1:n + 1], batch.act[:, 1:n + 1], batch.obs[:, n + 1])
    assert abs(loss_2_real_context - loss_2) > 1e-6
