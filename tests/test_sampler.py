"""Invariants of the sampler: run these before trusting a change to it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import atari100k
from diamond_jax.models.denoiser import Denoiser
from diamond_jax.models.sampler import SamplerConfig, build_sigmas, sample, sample_next_obs


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 50])
def test_karras_schedule(n):
    sigmas = build_sigmas(n, 2e-3, 5.0, 7.0)
    assert sigmas.shape == (n + 1,)
    assert np.all(np.diff(sigmas) < 0)
    assert sigmas[0] == pytest.approx(5.0) and sigmas[-1] == 0.0
    if n > 1:
        assert sigmas[-2] == pytest.approx(2e-3)


def test_karras_schedule_values():
    # By hand: rho = 1 makes the schedule linear in sigma.
    np.testing.assert_allclose(build_sigmas(3, 1.0, 3.0, 1.0), [3.0, 2.0, 1.0, 0.0])
    # rho = 2, n = 3: midpoint of sqrt(1) and sqrt(9) is 2, squared 4.
    np.testing.assert_allclose(build_sigmas(3, 1.0, 9.0, 2.0), [9.0, 4.0, 1.0, 0.0])


def gaussian_problem(mu=0.3, s=0.2):
    """Data ~ N(mu, s^2): D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the probability-flow ODE keeps
    (x - mu) / sqrt(s^2 + sigma^2) constant, so x(0) = mu + (x(sigma_max) - mu) s / sqrt(s^2 + sigma_max^2)."""
    def denoise(x, sigma):
        return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)

    def exact(x_start, sigma_max):
        return mu + (x_start - mu) * s / np.sqrt(s ** 2 + sigma_max ** 2)

    return denoise, exact


def numpy_sigmas(n, sigma_min=2e-3, sigma_max=5.0, rho=7.0):
    """Karras et al.'s levels, rounded to float32 as the sampler holds them (the rest is float64)."""
    ramp = np.linspace(0, 1, n)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)


def numpy_sampler(denoise, x, n, order, s_churn=0.0, s_tmin=0.0, s_tmax=np.inf, eps=None):
    """EDM's Algorithm 1 (Heun) / its Euler variant, with Algorithm 2's churn, in float64: the points on the
    schedule. The step to sigma 0 returns D, which is what its Euler step computes. eps[i]: the churn noise
    of step i (scaled by s_noise), None for s_noise = 0."""
    sigmas = numpy_sigmas(n)
    gamma_max = min(s_churn / n, np.sqrt(2) - 1)
    points = [x]
    for i in range(n):
        sigma, next_sigma = sigmas[i], sigmas[i + 1]
        gamma = gamma_max if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if eps is not None:
            x = x + eps[i] * np.sqrt(sigma_hat ** 2 - sigma ** 2)
        if next_sigma == 0:
            x = denoise(x, sigma_hat)
        else:
            d = (x - denoise(x, sigma_hat)) / sigma_hat
            x_next = x + d * (next_sigma - sigma_hat)
            if order == 2:
                d_2 = (x_next - denoise(x_next, next_sigma)) / next_sigma
                x_next = x + (d + d_2) / 2 * (next_sigma - sigma_hat)
            x = x_next
        points.append(x)
    return x, np.stack(points)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_sample_from_given_noise_follows_the_hand_written_integrator(order, n):
    """A denoiser that depends on x and sigma (the Gaussian problem's), from a given start noise: the sample and
    every point of the trajectory as in a float64 numpy integrator."""
    denoise, _ = gaussian_problem()
    x_start = np.random.default_rng(n).standard_normal((2, 8, 8, 3)).astype(np.float32)
    cfg = SamplerConfig(num_steps_denoising=n, order=order)
    out, trajectory = sample(denoise, jax.random.key(0), x_start.shape, cfg, x_start=jnp.asarray(x_start),
                             return_trajectory=True)
    want, want_points = numpy_sampler(denoise, x_start.astype(np.float64), n, order)
    assert trajectory.shape == (n + 1,) + x_start.shape
    # Heun's second slope divides a float32 difference by sigma_min = 0.002: rounding grows ~500-fold.
    atol = 1e-5 if order == 1 else 1e-4
    np.testing.assert_allclose(out, want, rtol=0, atol=atol)
    np.testing.assert_allclose(trajectory, want_points, rtol=0, atol=atol)
    np.testing.assert_array_equal(trajectory[0], x_start)
    np.testing.assert_array_equal(trajectory[-1], out)


def test_defaults_draw_the_start_noise_from_the_key_and_return_the_sample_alone():
    denoise, _ = gaussian_problem()
    cfg, shape = SamplerConfig(), (2, 8, 8, 3)
    out = sample(denoise, jax.random.key(4), shape, cfg)
    assert isinstance(out, jax.Array) and out.shape == shape
    # The start noise is N(0, I) from the key's first half: passing that noise explicitly gives the same sample.
    x_start = jax.random.normal(jax.random.split(jax.random.key(4))[0], shape)
    np.testing.assert_array_equal(out, sample(denoise, jax.random.key(4), shape, cfg, x_start=x_start))
    want, _ = numpy_sampler(denoise, np.asarray(x_start, np.float64), cfg.num_steps_denoising, 1)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="x_start has shape"):
        sample(denoise, jax.random.key(4), shape, cfg, x_start=x_start[0])


@pytest.mark.parametrize("order", [1, 2])
def test_churn_raises_the_noise_level_within_s_tmin_s_tmax(order):
    """s_noise = 0 isolates the raised levels: D is evaluated at sigma_hat = sigma (1 + gamma) and the step
    goes from sigma_hat, gamma = min(s_churn / n, sqrt(2) - 1) where s_tmin <= sigma <= s_tmax, else 0. With
    s_tmin = 0.05 the last two of the 5 levels (0.037, 0.002) are left unraised."""
    denoise, _ = gaussian_problem()
    x_start = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    for s_churn in (0.5, 10.0):  # gamma = 0.1, then the cap sqrt(2) - 1
        cfg = SamplerConfig(num_steps_denoising=5, order=order, s_churn=s_churn, s_tmin=0.05, s_tmax=4.0,
                            s_noise=0.0)
        out, trajectory = sample(denoise, jax.random.key(0), x_start.shape, cfg, x_start=jnp.asarray(x_start),
                                 return_trajectory=True)
        want, want_points = numpy_sampler(denoise, x_start.astype(np.float64), 5, order, s_churn, 0.05, 4.0)
        np.testing.assert_allclose(trajectory, want_points, rtol=0, atol=1e-4)
        without_churn, _ = numpy_sampler(denoise, x_start.astype(np.float64), 5, order)
        assert np.max(np.abs(want - without_churn)) > 1e-3  # the raised levels change the sample


def test_churn_noise_has_the_variance_that_raises_sigma_to_sigma_hat():
    """D = 0 and x_start = 0, n = 2, Euler, churn at the cap gamma = sqrt(2) - 1: the first step adds
    eps s_noise sqrt(sigma_hat^2 - sigma^2) = eps s_noise sigma_max (sigma_hat = sqrt(2) sigma_max), then
    scales by sigma_1 / sigma_hat, so the point at sigma_1 has std s_noise sigma_1 / sqrt(2)."""
    shape = (100_000,)
    cfg = SamplerConfig(num_steps_denoising=2, s_churn=10.0, s_noise=0.7)
    _, trajectory = sample(lambda x, sigma: jnp.zeros_like(x), jax.random.key(1), shape, cfg,
                           x_start=jnp.zeros(shape), return_trajectory=True)
    point = np.asarray(trajectory[1], np.float64)
    expected_std = 0.7 * 2e-3 / np.sqrt(2)
    assert abs(point.mean()) < 5 * expected_std / np.sqrt(shape[0])
    # The sample variance of 100k normals is within 2% of the variance with overwhelming probability.
    assert point.std() == pytest.approx(expected_std, rel=0.01)


def count_calls(order, n, s_churn=0.0):
    calls = []

    def denoise(x, sigma):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.zeros_like(x)

    cfg = SamplerConfig(num_steps_denoising=n, order=order, s_churn=s_churn)
    jax.block_until_ready(jax.jit(lambda k: sample(denoise, k, (1, 4, 4, 3), cfg))(jax.random.key(0)))
    jax.effects_barrier()
    return len(calls)


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_number_of_denoiser_calls(n):
    assert count_calls(1, n) == n
    # Heun evaluates twice per step, except on the last step to sigma = 0.
    assert count_calls(2, n) == 2 * n - 1
    assert count_calls(1, n, s_churn=1.0) == n


def test_n1_calls_the_denoiser_once():
    assert count_calls(1, 1) == 1 and count_calls(2, 1) == 1


def ode_errors(order, steps, mu=0.3, s=0.5):
    denoise, exact = gaussian_problem(mu, s)
    key = jax.random.key(0)
    shape = (4, 4, 4, 3)
    target = exact(np.asarray(jax.random.normal(jax.random.split(key)[0], shape)), 5.0)  # the sampler's first draw
    return [float(np.max(np.abs(np.asarray(sample(denoise, key, shape,
                                                   SamplerConfig(num_steps_denoising=n, order=order))) - target)))
            for n in steps]


def test_heun_is_closer_than_euler_to_the_ode_solution():
    """With enough steps for the EDM schedule, Heun (order 2) beats Euler (order 1), and each doubling of n
    divides Heun's error by about 4 and Euler's by about 2. With n <= 3 on this schedule the first step is so
    large that Euler can be the closer one, which is why DIAMOND samples with Euler and n = 3."""
    steps = (10, 20, 40)
    euler, heun = ode_errors(1, steps), ode_errors(2, steps)
    assert all(h < e for h, e in zip(heun, euler)), (euler, heun)
    for a, b in zip(heun, heun[1:]):
        assert 3.0 < a / b < 5.5, heun
    for a, b in zip(euler, euler[1:]):
        assert 1.7 < a / b < 2.5, euler


@pytest.fixture(scope="module")
def debug_denoiser():
    denoiser = Denoiser.from_config(atari100k.get_config("debug"), num_actions=4)
    variables = denoiser.init(jax.random.key(0), 16)
    # The output convolution starts at zero; perturb it so that the network's output matters.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(len(p)), x.shape) if "conv_out" in str(p) else x,
        variables["params"])
    return denoiser, {"params": params, "buffers": variables["buffers"]}


@functools.lru_cache(maxsize=None)
def jitted_sampler(denoiser, cfg):
    return jax.jit(functools.partial(sample_next_obs, denoiser, cfg=cfg))


def sample_debug(denoiser, variables, key, cfg, b=3):
    obs = jax.random.uniform(jax.random.key(7), (b, 4, 16, 16, 3), minval=-1, maxval=1)
    act = jnp.arange(4 * b).reshape(b, 4) % 4
    return jitted_sampler(denoiser, cfg)(variables, key, obs, act)


@pytest.mark.parametrize("cfg", [SamplerConfig(), SamplerConfig(order=2, num_steps_denoising=4),
                                 SamplerConfig(s_churn=2.0, s_tmin=0.01, s_tmax=3.0)])
def test_same_key_same_sample_other_key_other_sample(debug_denoiser, cfg):
    a = sample_debug(*debug_denoiser, jax.random.key(0), cfg)
    b = sample_debug(*debug_denoiser, jax.random.key(0), cfg)
    c = sample_debug(*debug_denoiser, jax.random.key(1), cfg)
    np.testing.assert_array_equal(a, b)
    assert np.mean(np.asarray(a) != np.asarray(c)) > 0.5


@pytest.mark.parametrize("cfg", [SamplerConfig(), SamplerConfig(order=2), SamplerConfig(num_steps_denoising=1),
                                 SamplerConfig(s_churn=5.0)])
def test_outputs_lie_on_the_256_level_grid(debug_denoiser, cfg):
    out = np.asarray(sample_debug(*debug_denoiser, jax.random.key(3), cfg, b=8))
    assert out.min() >= -1 and out.max() <= 1
    levels = (out + 1) / 2 * 255
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert len(np.unique(np.round(levels))) > 10  # a real image, not a constant


def test_sampler_composes_with_vmap_and_scan(debug_denoiser):
    denoiser, variables = debug_denoiser
    cfg = SamplerConfig()
    obs = jnp.zeros((2, 4, 16, 16, 3))
    act = jnp.zeros((2, 4), jnp.int32)
    keys = jax.random.split(jax.random.key(0), 3)
    one = functools.partial(sample_next_obs, denoiser, variables, obs=obs, act=act, cfg=cfg)
    vmapped = jax.jit(jax.vmap(one))(keys)

    def step(carry, key):
        return carry, one(key)

    _, scanned = jax.jit(lambda keys: jax.lax.scan(step, None, keys))(keys)
    one_jitted = jax.jit(one)
    looped = jnp.stack([one_jitted(k) for k in keys])
    np.testing.assert_allclose(vmapped, looped, atol=1e-5)
    np.testing.assert_allclose(scanned, looped, atol=1e-5)
