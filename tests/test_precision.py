"""config.precision=bfloat16: every product and convolution runs in bfloat16, on the same weights the models stay
within a stated tolerance of float32's, the parameters and optimiser states stay float32, and a debug run trains
with finite losses. That float32 computes what it computed before the policy existed is the other model tests'
(test_denoiser, test_rew_end, test_actor_critic, test_imagination; test_convert against torch.nn layers).

The tolerances follow from bfloat16's 8-bit mantissa: each product or convolution rounds its operands and its
output to a relative 2^-9 = 0.2%, and the errors of the ~20 layers a U-Net pass crosses add up like a random
walk, to a few percent of the network's output. Measured on the debug models below (CPU): F, the U-Net's output,
off by 1.5% of its standard deviation (rms; 1.8% for the paper-size U-Net); the denoised frame by at most 3 of
its 256 levels (0.024) and 0.001-0.003 on average; one imagined step's frame likewise (3 levels, 0.003 on
average), the reward/end LSTM state by at most 0.045 (its values spread 0.3-0.6), the actor-critic's logits and
value by at most 0.003 and 0.001. Each bound below is 2-10 times the measured error; the lower bounds show that
bfloat16 is in use (float32's own rounding differences would be ~1e-7).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import atari100k
from diamond_jax import imagination
from diamond_jax.agent import Agent
from diamond_jax.config import ConfigError, validate
from diamond_jax.models.denoiser import quantize
from diamond_jax.models.precision import compute_dtype
from diamond_jax.training import loop, paper, workdir
from diamond_jax.training.logger import read_events

B, N, SIZE, NUM_ACTIONS = 8, 4, 16, 4
LEVEL = 2 / 255  # one step of the 256-level frame grid


def debug_config(precision):
    config = atari100k.get_config("debug").unlock()
    config.precision = precision
    return config.lock()


@pytest.fixture(scope="module")
def agents():
    """The debug agent in float32 and in bfloat16, and one set of float32 weights for both, its zero-initialised
    layers (the denoiser's output convolution and second residual convolutions, the actor-critic's heads)
    perturbed, as training would have, so that every input reaches every output."""
    a32, a16 = (Agent.from_config(debug_config(p), NUM_ACTIONS) for p in ("float32", "bfloat16"))
    variables = a32.init(jax.random.key(0))
    zero_init = ("conv_out", "conv2", "actor_linear", "critic_linear")
    variables = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 * jax.random.normal(jax.random.key(len(jax.tree_util.keystr(path))), x.shape)
        if any(name in jax.tree_util.keystr(path) for name in zero_init) else x, variables)
    return a32, a16, variables


def inputs(key):
    k_obs, k_act, k_next, k_noise = jax.random.split(key, 4)
    obs = quantize(jax.random.uniform(k_obs, (B, N, SIZE, SIZE, 3), minval=-1, maxval=1))
    act = jax.random.randint(k_act, (B, N), 0, NUM_ACTIONS)
    next_obs = quantize(jax.random.uniform(k_next, (B, SIZE, SIZE, 3), minval=-1, maxval=1))
    return obs, act, next_obs, jax.random.normal(k_noise, next_obs.shape)


def test_the_config_chooses_the_compute_dtype():
    assert atari100k.get_config().precision == "float32"  # the paper's
    assert compute_dtype(debug_config("float32")) == jnp.float32
    assert compute_dtype(debug_config("bfloat16")) == jnp.bfloat16
    # Configs saved before the field existed (a run's config.json, an agent's agent.json) are float32.
    old = atari100k.get_config("debug").unlock()
    del old["precision"]
    validate(old)
    assert compute_dtype(old) == jnp.float32
    old.precision = "float16"
    with pytest.raises(ConfigError, match="config.precision='float16': must be one of float32, bfloat16.*Fix:"):
        validate(old)


def test_a_bfloat16_run_is_not_the_papers_config():
    config = atari100k.get_config("game=Pong").unlock()
    config.precision = "bfloat16"
    assert paper.differences(config) == ["precision"]


def test_a_run_saved_before_the_field_resumes_and_a_changed_precision_is_refused(tmp_path):
    config = debug_config("float32")
    workdir.open_workdir(str(tmp_path), config, lock=False)
    path = tmp_path / workdir.CONFIG_FILE
    saved = path.read_text()
    assert '"precision": "float32"' in saved
    path.write_text(saved.replace('"precision": "float32",', ""))  # as runs before the field saved it
    workdir.open_workdir(str(tmp_path), config, lock=False)  # resuming: accepted
    with pytest.raises(ValueError, match="precision: 'float32' -> 'bfloat16'"):
        workdir.open_workdir(str(tmp_path), debug_config("bfloat16"), lock=False)


def products(fn, *args):
    """(primitive, operand dtypes) -> count, for the matrix products and convolutions of fn's program."""
    counts = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                key = (eqn.primitive.name, tuple(v.aval.dtype.name for v in eqn.invars))
                counts[key] = counts.get(key, 0) + 1
            for param in eqn.params.values():  # the bodies of scans and nested calls
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return counts


def test_every_product_and_convolution_runs_in_bfloat16_but_the_fourier_features(agents):
    _, a16, variables = agents
    obs, act, next_obs, _ = inputs(jax.random.key(1))
    conv, dot = ("conv_general_dilated", ("bfloat16",) * 2), ("dot_general", ("bfloat16",) * 2)
    denoiser = products(lambda v: a16.denoiser.denoise(v, next_obs, 0.5, obs, act), variables["denoiser"])
    # One float32 product: 2 pi c_noise times the Fourier weights (see blocks.FourierFeatures).
    assert set(denoiser) == {conv, dot, ("dot_general", ("float32",) * 2)}
    assert denoiser[("dot_general", ("float32",) * 2)] == 1
    rew_end = products(lambda v: a16.rew_end_model.predict_rew_end(v, obs, act, obs), variables["rew_end_model"])
    assert set(rew_end) == {conv, dot}
    ac, hx_cx = a16.actor_critic, a16.actor_critic.initial_state(B)
    assert set(products(lambda v: ac.predict_act_value(v, obs[:, 0], hx_cx), variables["actor_critic"])) == {conv, dot}


@pytest.mark.parametrize("sigma", [2e-3, 0.5, 5.0])
def test_the_bfloat16_denoiser_stays_within_tolerance_of_float32(agents, sigma):
    a32, a16, variables = agents
    obs, act, next_obs, noise = inputs(jax.random.key(1))
    noisy = next_obs + sigma * noise
    cs = a32.denoiser.conditioners(jnp.full((B,), sigma))
    f32, f16 = (jax.jit(a.denoiser.model_output)(variables["denoiser"], noisy, obs, act, cs) for a in (a32, a16))
    d32, d16 = (jax.jit(a.denoiser.denoise)(variables["denoiser"], noisy, sigma, obs, act) for a in (a32, a16))
    assert f16.dtype == d16.dtype == jnp.float32  # the network's output is float32 for the preconditioning

    rel_rms = float(jnp.sqrt(jnp.mean((f16 - f32) ** 2)) / jnp.std(f32))
    assert 1e-3 < rel_rms < 0.05  # measured 0.015; float32's own rounding would give ~1e-7
    error = np.abs(np.asarray(d16) - np.asarray(d32))
    assert error.max() <= 6 * LEVEL + 1e-6  # measured 3 levels
    assert error.mean() < 0.01  # measured 0.001-0.003
    levels = (np.asarray(d16) + 1) / LEVEL
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # still on the frame grid


def test_one_bfloat16_imagined_step_stays_within_tolerance_of_float32(agents):
    a32, a16, variables = agents
    obs, act, _, _ = inputs(jax.random.key(2))
    next_act = jax.random.randint(jax.random.key(3), (B,), 0, NUM_ACTIONS)

    def step(agent):
        point = imagination.burn_in(agent, variables, imagination.InitialConditions(obs, act))
        out, state = imagination.world_model_step(agent, variables, imagination.initial_state(point), next_act,
                                                  point.ac_out.hx_cx, jax.random.key(4))
        return point, out, state

    (p32, o32, s32), (p16, o16, s16) = (jax.jit(step, static_argnums=0)(a) for a in (a32, a16))
    jax.tree.map(lambda x32, x16: np.testing.assert_equal(x16.dtype, x32.dtype), (p32, o32, s32), (p16, o16, s16))

    frame_error = np.abs(np.asarray(o16.next_obs) - np.asarray(o32.next_obs))
    assert 0 < frame_error.max() <= 6 * LEVEL + 1e-6  # measured 3 levels
    assert frame_error.mean() < 0.01  # measured 0.003
    for x32, x16 in zip(s32.rew_end_hx_cx, s16.rew_end_hx_cx):
        np.testing.assert_allclose(x16, x32, atol=0.15)  # measured 0.028 (hidden), 0.045 (cell)
    np.testing.assert_allclose(p16.ac_out.logits_act, p32.ac_out.logits_act, atol=0.01)  # measured 0.003
    np.testing.assert_allclose(p16.ac_out.val, p32.ac_out.val, atol=0.01)  # measured 0.001
    assert not np.array_equal(p16.ac_out.logits_act, p32.ac_out.logits_act)


@pytest.fixture(scope="module")
def bfloat16_run(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bfloat16"))
    loop.Trainer(debug_config("bfloat16"), path).run()
    trainer = loop.Trainer(debug_config("bfloat16"), path)
    state = jax.device_get(trainer.state)
    trainer.close()
    return path, state


def test_a_debug_run_trains_in_bfloat16_with_finite_losses(bfloat16_run):
    path, _ = bfloat16_run
    losses = {}
    for name in os.listdir(os.path.join(path, "tensorboard")):
        for event in read_events(os.path.join(path, "tensorboard", name)):
            for v in event.summary.value:
                if "/train/loss" in v.tag and v.HasField("simple_value"):
                    losses.setdefault(v.tag, []).append(v.simple_value)
    for tag in ("denoiser/train/loss_denoising", "rew_end_model/train/loss_total", "actor_critic/train/loss_total"):
        assert losses.get(tag), (tag, sorted(losses))
        assert np.all(np.isfinite(losses[tag])), (tag, losses[tag])
    with open(os.path.join(path, "results.json")) as f:
        assert "precision" in json.load(f)["differs_from_paper"]


def test_parameters_and_optimiser_states_stay_float32_in_bfloat16(bfloat16_run):
    _, state = bfloat16_run
    for name in ("denoiser", "rew_end_model", "actor_critic"):
        train_state = state["models"][name]
        assert int(train_state.step) > 0
        leaves = [np.asarray(x) for x in jax.tree.leaves((train_state.params, train_state.opt_state))]
        # Floats are float32; the only other leaves are the optimiser's step counts.
        assert {x.dtype.name for x in leaves} == {"float32", "int32"}, name
        assert all(np.all(np.isfinite(x)) for x in leaves if x.dtype == np.float32), name
