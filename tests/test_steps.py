import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import atari100k
from diamond_jax.data.batch import Batch
from diamond_jax.models.denoiser import Denoiser, quantize
from diamond_jax.training import parallel, steps


def test_warmup_schedule_like_torch_lambda_lr():
    schedule = steps.warmup_schedule(1e-4, 100)
    np.testing.assert_allclose([schedule(s) for s in (0, 1, 50, 99, 100, 5000)],
                               [0.0, 1e-6, 5e-5, 9.9e-5, 1e-4, 1e-4], rtol=1e-6)
    np.testing.assert_allclose(steps.warmup_schedule(1e-3, 0)(0), 1e-3)


def test_weight_decay_only_on_weights():
    params = {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}, "norm": {"scale": jnp.ones(3)},
              "emb": {"embedding": jnp.ones((4, 2))}, "lstm": {"kernel_ih": jnp.ones(2), "bias_ih": jnp.ones(2)}}
    opt = steps.make_optimizer(lr=0.1, weight_decay=0.5, eps=1e-8, warmup_steps=0, max_grad_norm=1.0)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero_grads, opt.init(params), params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    # Zero gradients: Adam's step is 0, decoupled decay shrinks decayed weights by lr * wd = 5%.
    assert float(new["conv"]["kernel"][0, 0]) == pytest.approx(0.95)
    assert float(new["lstm"]["kernel_ih"][0]) == pytest.approx(0.95)
    for unchanged in (new["conv"]["bias"], new["norm"]["scale"], new["emb"]["embedding"], new["lstm"]["bias_ih"]):
        np.testing.assert_array_equal(unchanged, 1.0)


def test_gradient_clipping_by_global_norm():
    params = {"kernel": jnp.zeros(2)}
    opt = steps.make_optimizer(lr=1.0, weight_decay=0.0, eps=0.0, warmup_steps=0, max_grad_norm=1.0)
    # Adam's first step is lr * sign(g) whatever the scale; the second shows what the first gradient was.
    grads = [np.array([30.0, 40.0]), np.array([0.3, 0.4])]  # global norms 50 (clipped to 1) and 0.5 (kept)
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update({"kernel": jnp.asarray(g, jnp.float32)}, state, params)

    def adam_second_step(g_1, g_2, b1=0.9, b2=0.999):
        m = b1 * (1 - b1) * g_1 + (1 - b1) * g_2
        v = b2 * (1 - b2) * g_1 ** 2 + (1 - b2) * g_2 ** 2
        return -(m / (1 - b1 ** 2)) / np.sqrt(v / (1 - b2 ** 2))

    clipped = grads[0] / np.linalg.norm(grads[0])
    np.testing.assert_allclose(updates["kernel"], adam_second_step(clipped, grads[1]), rtol=1e-4)  # -0.932, float32
    assert not np.allclose(adam_second_step(grads[0], grads[1]), adam_second_step(clipped, grads[1]), rtol=0.1)


def debug_setup(batch_size=4, lr=None):
    config = atari100k.get_config("debug")
    if lr is not None:
        config.denoiser.optimizer.lr = lr
    denoiser = Denoiser.from_config(config, num_actions=3)
    variables = denoiser.init(jax.random.key(0), 16)
    optimizer = steps.optimizer_from_config(config.denoiser)
    state = steps.TrainState.create(variables, optimizer)
    k1, k2 = jax.random.split(jax.random.key(1))
    t = denoiser.num_steps_conditioning + 1 + config.denoiser.training.num_autoregressive_steps
    obs = quantize(jax.random.uniform(k1, (batch_size, t, 16, 16, 3), minval=-1, maxval=1))
    zeros = jnp.zeros((batch_size, t), jnp.int32)
    mask = jnp.ones((batch_size, t), bool).at[0, :3].set(False)
    obs = jnp.where(mask[..., None, None, None], obs, 0.0)
    batch = Batch(obs, jax.random.randint(k2, (batch_size, t), 0, 3), zeros.astype(jnp.float32), zeros, zeros, mask)
    return denoiser, optimizer, state, batch


def place(mesh, state, batch):
    """Copies placed for the mesh (the update donates its state)."""
    state = jax.tree.map(jnp.copy, state)
    return jax.device_put(state, parallel.replicated(mesh)), jax.device_put(batch, parallel.data_sharded(mesh))


def test_updates_on_one_batch_drive_the_loss_down():
    """The same batch, noise levels and noise at every update: a fixed regression problem (at 10x the paper's
    learning rate, so that a tiny model shows it within a few hundred updates)."""
    denoiser, optimizer, state, batch = debug_setup(lr=1e-3)
    mesh = parallel.make_mesh(1)
    update = steps.jit_update(steps.make_update(denoiser.loss, optimizer), mesh)
    state, batch = place(mesh, state, batch)
    losses = []
    for _ in range(300):
        state, metrics = update(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss_denoising"]))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)
    assert int(state.step) == 300


def test_data_parallel_update_equals_single_device():
    assert jax.device_count() >= 2, "tests/conftest.py sets up 2 CPU devices"
    denoiser, optimizer, state, batch = debug_setup()
    update_fn = steps.make_update(denoiser.loss, optimizer)
    results = {}
    for n in (1, 2):
        mesh = parallel.make_mesh(n)
        update = steps.jit_update(update_fn, mesh)
        s, b = place(mesh, state, batch)
        if n == 2:
            assert len(b.obs.sharding.device_set) == 2
        for i in range(3):
            s, metrics = update(s, b, jax.random.key(i))
        results[n] = (jax.device_get(s.params), float(metrics["loss_denoising"]))
    chex.assert_trees_all_close(results[1][0], results[2][0], atol=1e-5, rtol=1e-4)
    assert results[1][1] == pytest.approx(results[2][1], rel=1e-5)


def test_no_recompilation_across_repeated_updates():
    denoiser, optimizer, state, batch = debug_setup()

    @chex.assert_max_traces(n=1)
    def update_fn(state, batch, key):
        return steps.make_update(denoiser.loss, optimizer)(state, batch, key)

    mesh = parallel.make_mesh(2)
    update = steps.jit_update(update_fn, mesh)
    state, batch = place(mesh, state, batch)
    for i in range(4):
        state, _ = update(state, batch._replace(obs=batch.obs * 0.5), jax.random.key(i))


def test_bad_device_counts_fail_clearly():
    with pytest.raises(ValueError, match="num_devices=64 but only"):
        parallel.make_mesh(64)
    with pytest.raises(ValueError, match="config.denoiser.training.batch_size=3 cannot be split over 2 devices"):
        parallel.check_batch_size(3, parallel.make_mesh(2), "denoiser.training.batch_size")
