"""Conditioning variants of the denoiser (the paper's section 4.2): masked conditioning with learned null inputs,
classifier-free guidance (equation 4) and cross-attention to a history encoder, each against an expectation
computed apart from the code under test."""


import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import atari100k, world_model as wm_configs
from diamond_jax import dream, imagination
from diamond_jax.agent import Agent
from diamond_jax.data.batch import Batch
from diamond_jax.data.importers import import_npz
from diamond_jax.models.blocks import Conv, Dense, FourierFeatures, GroupNorm, UNet
from diamond_jax.models.denoiser import CrossAttention, Denoiser, HistoryEncoder, quantize
from diamond_jax.models.sampler import SamplerConfig, sample_next_obs
from diamond_jax.training import parallel, steps
from diamond_jax.world_model.model import Frames, WorldModel
from diamond_jax.world_model.train import WorldModelTrainer
from conftest import with_fields

B, N, SIZE, A = 2, 2, 16, 4
CROSS = CrossAttention(levels=(0, 1), heads=2, channels=(8, 8))


def tiny(conditioning="frame_stack", n=N, cond_channels=16, **kwargs) -> Denoiser:
    return Denoiser(num_actions=A, num_steps_conditioning=n, cond_channels=cond_channels, depths=(1, 1), channels=(8, 8),
                    attn_depths=(0, 0), conditioning=conditioning,
                    cross_attention=CROSS if conditioning == "cross_attention" else None, **kwargs)


def randomised(variables, seed=1, scale=0.3):
    """Every parameter redrawn: zero-initialised layers (the output convolution, cross-attention's output)
    would otherwise hide what the inputs do."""
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    params = jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return dict(variables, params=params)


def inputs(seed=0, b=B, n=N):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    obs = quantize(jax.random.uniform(k1, (b, n, SIZE, SIZE, 3), minval=-1, maxval=1))
    act = jax.random.randint(k2, (b, n), 0, A)
    return obs, act, jax.random.normal(k3, (b, SIZE, SIZE, 3))


# ---- Defaults: today's model exactly.


class TodaysInnerModel(nn.Module):
    """The frame-stack F as it was before the conditioning variants, composed from the shared layers (the debug
    config's sizes)."""

    n: int

    @nn.compact
    def __call__(self, x, c_noise, obs, act):
        b = x.shape[0]
        act_emb = nn.Embed(A, 16 // self.n, embedding_init=nn.initializers.normal(1.0), name="act_emb_0")(act)
        noise_emb = FourierFeatures(16, name="noise_emb")(jnp.broadcast_to(c_noise, (b,)))
        cond = Dense(16, name="cond_proj_0")(noise_emb + act_emb.reshape(b, -1))
        cond = Dense(16, name="cond_proj_2")(nn.silu(cond))
        y = Conv(8, name="conv_in")(jnp.concatenate([obs, x], axis=-1))
        y = UNet((1, 1), (8, 8), (0, 0), name="unet")(y, cond)
        return Conv(3, kernel_init=nn.initializers.zeros, name="conv_out")(nn.silu(GroupNorm(name="norm_out")(y)))


def test_without_condition_dropout_the_parameters_and_outputs_are_todays():
    denoiser = Denoiser.from_config(atari100k.get_config("debug"), num_actions=A)
    assert denoiser.conditioning == "frame_stack" and not denoiser.has_null_inputs
    n = denoiser.num_steps_conditioning
    variables = denoiser.init(jax.random.key(0), SIZE)
    todays = TodaysInnerModel(n).init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), jnp.zeros((1,)),
                                      jnp.zeros((1, SIZE, SIZE, n * 3)), jnp.zeros((1, n), jnp.int32))
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, dict(todays))
    variables = randomised(variables)
    obs, act, x = inputs(n=n)
    cs = denoiser.conditioners(jnp.full((B,), 0.7))
    want = TodaysInnerModel(n).apply(variables, x * cs.c_in, cs.c_noise,
                                    obs.transpose(0, 2, 3, 1, 4).reshape(B, SIZE, SIZE, -1) / 0.5, act)
    np.testing.assert_array_equal(denoiser.model_output(variables, x, obs, act, cs), want)


# ---- Masked conditioning.


def test_the_condition_dropout_rate_is_honoured():
    p, n = 0.2, 20_000
    null = np.asarray(tiny(condition_dropout=p).sample_null(jax.random.key(3), n))
    assert null.dtype == bool
    # Binomial(n, p): the fraction within 5 standard deviations (sqrt(p (1 - p) / n) = 0.0028).
    assert abs(null.mean() - p) < 5 * np.sqrt(p * (1 - p) / n), null.mean()


@pytest.mark.parametrize("conditioning", ["frame_stack", "cross_attention"])
@pytest.mark.parametrize("target", ["all", "actions"])
def test_a_null_row_ignores_what_its_target_masks(conditioning, target):
    denoiser = tiny(conditioning, condition_dropout=0.2, condition_dropout_target=target)
    variables = randomised(denoiser.init(jax.random.key(0), SIZE))
    obs, act, x = inputs()
    cs = denoiser.conditioners(jnp.full((B,), 0.7))
    null = jnp.array([True, False])
    out = np.asarray(denoiser.model_output(variables, x, obs, act, cs, null))
    other_act = (act + 1) % A
    other_obs = quantize(-obs)
    act_out = np.asarray(denoiser.model_output(variables, x, obs, other_act, cs, null))
    obs_out = np.asarray(denoiser.model_output(variables, x, other_obs, act, cs, null))
    np.testing.assert_array_equal(act_out[0], out[0])  # every target masks the actions
    assert np.abs(act_out[1] - out[1]).max() > 1e-4  # a conditioned row sees them
    assert np.abs(obs_out[1] - out[1]).max() > 1e-4
    if target == "all":
        np.testing.assert_array_equal(obs_out[0], out[0])
    else:
        assert np.abs(obs_out[0] - out[0]).max() > 1e-4


def test_a_model_without_null_inputs_refuses_to_run_unconditionally():
    denoiser = tiny()
    variables = denoiser.init(jax.random.key(0), SIZE)
    obs, act, x = inputs()
    with pytest.raises(ValueError, match="condition_dropout > 0"):
        denoiser.model_output(variables, x, obs, act, denoiser.conditioners(jnp.ones((B,))), jnp.ones((B,), bool))
    with pytest.raises(ValueError, match="condition_dropout > 0"):
        denoiser.denoise(variables, x, 1.0, obs, act, guidance_scale=1.0)


# ---- Guidance.


def levels(frame):
    """The uint8 level of every value of a frame on the 256-level grid."""
    return np.round((np.asarray(frame) + 1) * 127.5)


def conv_batch_sizes(fn, *args):
    """The batch size of every convolution in fn's program, inner programs (scan, jit) included."""
    sizes = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                sizes.append(eqn.invars[0].aval.shape[0])
            for param in eqn.params.values():
                for p in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(p, "jaxpr", p)
                    if hasattr(inner, "eqns"):
                        visit(inner)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return sizes


@pytest.mark.parametrize("conditioning", ["frame_stack", "cross_attention"])
def test_guidance_is_equation_4_and_zero_guidance_the_conditional_prediction(conditioning):
    denoiser = tiny(conditioning, condition_dropout=0.2)
    variables = randomised(denoiser.init(jax.random.key(0), SIZE))
    obs, act, x = inputs()
    w, sigma = 1.5, 5.0
    # One sampler step: the sample is the denoised estimate at sigma_max from the start noise x.
    sampled = {g: np.asarray(jax.jit(lambda v, g=g: sample_next_obs(
        denoiser, v, jax.random.key(0), obs, act, SamplerConfig(1, sigma_max=sigma, guidance_scale=g), x))(variables))
        for g in (0.0, w)}

    # Plain separate calls: D = c_skip x + c_out F, conditional and on the null inputs.
    cs = denoiser.conditioners(jnp.full((B,), sigma))
    d_c = cs.c_skip * x + cs.c_out * denoiser.model_output(variables, x, obs, act, cs, jnp.zeros((B,), bool))
    d_u = cs.c_skip * x + cs.c_out * denoiser.model_output(variables, x, obs, act, cs, jnp.ones((B,), bool))
    # Compared as levels of the 256-level grid: jit and eager compute level / 127.5 - 1 a rounding apart.
    np.testing.assert_array_equal(levels(sampled[0.0]), levels(quantize(d_c)))
    # The batched call may round differently from the separate ones in the last bit, which can move a value
    # across a level boundary: at most one level, and rarely.
    diff = np.abs(levels(sampled[w]) - levels(quantize((1 + w) * d_c - w * d_u)))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert np.abs(sampled[w] - sampled[0.0]).max() > 0  # guidance changed the frame

    # w = 0 traces one call on the b rows; w > 0 one call on the rows stacked twice.
    for g, rows in ((0.0, B), (w, 2 * B)):
        sizes = conv_batch_sizes(lambda v, g=g: sample_next_obs(
            denoiser, v, jax.random.key(0), obs, act, SamplerConfig(3, guidance_scale=g), x), variables)
        assert sizes and set(sizes) <= {rows, rows * N}, (g, set(sizes))  # rows * N: the history encoder's


# ---- Cross-attention.


def test_the_history_encoder_sees_no_later_frame_and_no_other_row():
    encoder = HistoryEncoder(A, "discrete", 16, (8, 8))
    obs, act, _ = inputs(n=3)
    variables = randomised(encoder.init(jax.random.key(0), obs, act, None))
    tokens = encoder.apply(variables, obs, act, None)
    later = encoder.apply(variables, obs.at[0, 2].set(-obs[0, 2]), act.at[0, 2].set((act[0, 2] + 1) % A), None)
    for level, (t, t_later) in enumerate(zip(tokens, later)):
        frames, frames_later = (np.asarray(a).reshape(B, 3, -1, a.shape[-1]) for a in (t, t_later))
        np.testing.assert_array_equal(frames_later[0, :2], frames[0, :2])  # earlier frames of the row
        np.testing.assert_array_equal(frames_later[1], frames[1])  # the other row
        assert np.abs(frames_later[0, 2] - frames[0, 2]).max() > 1e-4, level


def history_encoder_parameters(n):
    variables = tiny("cross_attention", n=n, cond_channels=24).init(jax.random.key(0), SIZE)
    encoder = variables["params"]["history_encoder"]
    assert encoder["time_emb"]["embedding"].shape == (n, 24)
    assert encoder["conv_in"]["kernel"].shape == (3, 3, 3, 8)  # one frame at a time
    return sum(x.size for x in jax.tree.leaves(encoder))


def test_the_history_encoder_shares_its_parameters_over_the_frames():
    # By hand, for cond 24, channels (8, 8), 4 actions: action table 4 * 24; two conditioning layers
    # 2 * (24 * 24 + 24); conv_in 3 * 3 * 3 * 8 + 8; per level a ResBlock of two AdaGroupNorm linears
    # (24 * 16 + 16) and two 3x3 convolutions (9 * 8 * 8 + 8), and an output GroupNorm (8 + 8); one
    # downsampling convolution (9 * 8 * 8 + 8); and the time table, n * 24.
    shared = 4 * 24 + 2 * 600 + 224 + 2 * (2 * 400 + 2 * 584 + 16) + 584
    assert history_encoder_parameters(2) == shared + 2 * 24
    assert history_encoder_parameters(6) == shared + 6 * 24


# ---- Training: data-parallel, RL and world models.


def variant_config(conditioning="cross_attention", dropout=0.0, guidance=0.0):
    config = atari100k.get_config("debug").unlock()
    config.denoiser.conditioning = conditioning
    config.denoiser.condition_dropout = dropout
    config.world_model_env.sampler.guidance_scale = guidance
    config.world_model_env.horizon = 2  # a short imagination: the test is of the variant, not of the horizon
    return config.lock()


def denoiser_batch(denoiser, config, b=4):
    k1, k2 = jax.random.split(jax.random.key(1))
    t = denoiser.num_steps_conditioning + config.denoiser.training.num_autoregressive_steps
    obs = quantize(jax.random.uniform(k1, (b, t, SIZE, SIZE, 3), minval=-1, maxval=1))
    zeros = jnp.zeros((b, t), jnp.int32)
    return Batch(obs, jax.random.randint(k2, (b, t), 0, A), zeros.astype(jnp.float32), zeros, zeros,
                 jnp.ones((b, t), bool))


def test_one_update_with_cross_attention_and_dropout_is_the_same_on_one_and_two_devices():
    assert jax.device_count() >= 2, "tests/conftest.py sets up 2 CPU devices"
    config = variant_config(dropout=0.5)
    denoiser = Denoiser.from_config(config, num_actions=A)
    optimizer = steps.optimizer_from_config(config.denoiser)
    state = steps.TrainState.create(denoiser.init(jax.random.key(0), SIZE), optimizer)
    batch = denoiser_batch(denoiser, config)
    update_fn = steps.make_update(denoiser.loss, optimizer)
    results = []
    for n in (1, 2):
        mesh = parallel.make_mesh(n)
        s = jax.device_put(jax.tree.map(jnp.copy, state), parallel.replicated(mesh))
        s, metrics = steps.jit_update(update_fn, mesh)(s, jax.device_put(batch, parallel.data_sharded(mesh)),
                                                       jax.random.key(2))
        results.append((jax.device_get(s.params), float(metrics["loss_denoising"])))
    assert "null_act_emb" in results[0][0] and "history_encoder" in results[0][0]
    chex.assert_trees_all_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-4)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)


@pytest.mark.parametrize("variant", [dict(conditioning="cross_attention"),
                                     dict(conditioning="frame_stack", dropout=0.2, guidance=1.0)])
def test_the_rl_agent_trains_the_variant_and_imagines_with_it(variant):
    """A denoiser update, then an actor-critic update through imagination (the sampler under lax.scan)."""
    config = variant_config(**variant)
    agent = Agent.from_config(config, num_actions=A)
    assert agent.sampler.guidance_scale == variant.get("guidance", 0.0)
    variables = agent.init(jax.random.key(0))
    d_opt = steps.optimizer_from_config(config.denoiser)
    d_state, metrics = jax.jit(steps.make_update(agent.denoiser.loss, d_opt))(
        steps.TrainState.create(variables["denoiser"], d_opt), denoiser_batch(agent.denoiser, config),
        jax.random.key(1))
    assert np.isfinite(float(metrics["loss_denoising"]))
    variables = dict(variables, denoiser={"params": d_state.params, "buffers": d_state.buffers})

    obs, act, _ = inputs(b=2 * 2 * 4, n=config.denoiser.inner_model.num_steps_conditioning)
    pool = imagination.InitialConditions(obs.reshape((4, 2 * 2) + obs.shape[1:])[:, :2],
                                         act.reshape(4, 4, -1)[:, :2])
    state = imagination.initial_state(imagination.burn_in(agent, variables, jax.tree.map(lambda x: x[:, 0], pool)))
    ac_opt = steps.optimizer_from_config(config.actor_critic)
    update = jax.jit(steps.make_update(imagination.make_actor_critic_loss(agent, config.world_model_env.horizon),
                                       ac_opt, has_output=True))
    world_model = {k: variables[k] for k in ("denoiser", "rew_end_model")}
    _, metrics, next_state = update(steps.TrainState.create(variables["actor_critic"], ac_opt),
                                    imagination.ActorCriticInputs(state, pool, world_model), jax.random.key(2))
    assert np.isfinite(float(metrics["loss_total"])) and np.isfinite(np.asarray(next_state.obs)).all()


@pytest.fixture(scope="module")
def dot_dataset(tmp_path_factory):
    """A dot moved by discrete actions (up, down, left, right), as .npz episodes imported."""
    src = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    moves = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])
    for e in range(3):
        act = rng.integers(0, 4, 12)
        obs = np.zeros((12, 16, 16, 3), np.uint8)
        y, x = 7, 7
        for t in range(12):
            obs[t, y:y + 2, x:x + 2] = 255
            y, x = np.clip([y, x] + moves[act[t]], 0, 14)
        np.savez(src / f"episode_{e}.npz", obs=obs, act=act)
    return import_npz(str(src), str(tmp_path_factory.mktemp("dot") / "ds"), action_kind="discrete",
                      test_fraction=0.34)


@pytest.mark.parametrize("variant", [{"denoiser.conditioning": "cross_attention"},
                                     {"denoiser.condition_dropout": 0.2, "sampler.guidance_scale": 1.0}])
def test_a_world_model_trains_the_variant_and_draws_videos_with_it(variant, dot_dataset, tmp_path):
    config = wm_configs.get_config("debug")
    for field, value in dict(variant, **{"training.num_steps": 2, "training.test_every": 2,
                                         "training.video_steps": 2}).items():
        section, leaf = field.split(".")
        config[section][leaf] = value
    trainer = WorldModelTrainer(config, dot_dataset.path, str(tmp_path),
                                mesh=parallel.make_mesh(devices=jax.devices()[:1]))
    assert trainer.model.sampler.guidance_scale == variant.get("sampler.guidance_scale", 0.0)
    results = trainer.run()
    assert results["steps"] == 2 and np.isfinite(results["test_loss"]["denoiser"])
    # The dream tool samples the run as asked: unconditionally (guidance 0 overriding the run's 1) where it has
    # null inputs; without them it refuses guidance and says how to train a model that has them.
    flags = [f"--workdir={tmp_path}", "--steps=2", "--rows=2", "--format=gif", f"--out={tmp_path / 'dream'}"]
    if "denoiser.condition_dropout" in variant:
        result = dream.main(flags + ["--unconditional", "--guidance_scale=0"])
        assert result["imagined"].shape[:2] == (2, 3) and (tmp_path / "dream" / "imagination.gif").is_file()
    else:
        with pytest.raises(SystemExit, match="guidance scale 1.0 needs a denoiser trained with masked conditioning"
                                             ".*--config.denoiser.condition_dropout=0.2"):
            dream.main(flags + ["--guidance_scale=1"])


def test_unconditional_sampling_ignores_the_context_and_refuses_what_it_cannot_do():
    """A world model drawing on null inputs ("all"): the same frame whatever the past frames and actions (same
    noise); the sampling options refuse a model without null inputs, and guidance together with them."""
    model = WorldModel.from_config(with_fields(wm_configs.get_config("debug"), **{"denoiser.condition_dropout": 0.2}),
                                   A, (SIZE, SIZE))
    variables = model.init(jax.random.key(0))
    variables["denoiser"] = randomised(variables["denoiser"])
    n, (h, w) = model.num_steps_conditioning, model.resolution
    contexts = [jax.random.uniform(jax.random.key(k), (B, n, h, w, 3), minval=-1, maxval=1) for k in (1, 2)]
    acts = [jnp.zeros((B, n), jnp.int32), jnp.full((B, n), A - 1, jnp.int32)]
    unconditional = model.with_sampling(unconditional=True)
    drawn = [np.asarray(unconditional.step(variables, jax.random.key(3), Frames(c, None), a).low)
             for c, a in zip(contexts, acts)]
    np.testing.assert_array_equal(drawn[0], drawn[1])
    conditional = [np.asarray(model.step(variables, jax.random.key(3), Frames(c, None), a).low)
                   for c, a in zip(contexts, acts)]
    assert np.abs(conditional[0] - conditional[1]).max() > 0.1  # the conditional model does see its context
    plain = WorldModel.from_config(wm_configs.get_config("debug"), A, (SIZE, SIZE))
    for kwargs in ({"unconditional": True}, {"guidance_scale": 0.5}):
        with pytest.raises(ValueError, match="no null inputs.*condition_dropout=0.2"):
            plain.with_sampling(**kwargs)
    with pytest.raises(ValueError, match="does not go with unconditional sampling"):
        model.with_sampling(guidance_scale=1.0, unconditional=True)
    with pytest.raises(ValueError, match="finite number >= 0"):
        model.with_sampling(guidance_scale=-1.0)
