"""One jitted, data-parallel update per model: AdamW with linear warm-up and grad-norm clipping."""

from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from diamond_jax.training import parallel

Metrics = Dict[str, jax.Array]
LossFn = Callable[[Any, Any, Any, jax.Array], Tuple[jax.Array, Metrics]]  # (params, buffers, batch, key)


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    buffers: Any  # variables that are part of the model but not trained (fixed Fourier weights)
    opt_state: Any

    def variables(self) -> Dict[str, Any]:
        return {"params": self.params, "buffers": self.buffers}

    @classmethod
    def create(cls, variables: Dict[str, Any], optimizer: optax.GradientTransformation) -> "TrainState":
        params = variables["params"]
        return cls(step=jnp.zeros((), jnp.int32), params=params, buffers=variables.get("buffers", {}),
                   opt_state=optimizer.init(params))


def warmup_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
    """lr * step / warmup_steps for the first warmup_steps updates (so the first update has lr 0), then lr."""

    def schedule(count):
        return lr * jnp.where(count >= warmup_steps, 1.0, count / max(1, warmup_steps))

    return schedule


def decay_mask(params: Any) -> Any:
    """Weight decay on the weights of linear, convolution and LSTM layers only, as the official optimiser
    groups do: not on biases, normalisation scales or embeddings."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", "")).startswith("kernel"), params)


def make_optimizer(lr: float, weight_decay: float, eps: float, warmup_steps: int,
                   max_grad_norm: float) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(warmup_schedule(lr, warmup_steps), b1=0.9, b2=0.999, eps=eps, weight_decay=weight_decay,
                    mask=decay_mask),
    )


def optimizer_from_config(model_config) -> optax.GradientTransformation:
    """The optimiser of one model's config section (config.denoiser, config.rew_end_model, ...)."""
    o, t = model_config.optimizer, model_config.training
    return make_optimizer(o.lr, o.weight_decay, o.eps, t.lr_warmup_steps, t.max_grad_norm)


def make_update(loss_fn: LossFn, optimizer: optax.GradientTransformation, has_output: bool = False):
    """update(state, batch, key) -> (state, metrics): one optimiser step on loss_fn.

    With has_output, loss_fn returns (loss, (metrics, output)) and update returns (state, metrics, output):
    the actor-critic's loss also yields the imagined environments' next state.
    """

    def update(state: TrainState, batch: Any, key: jax.Array):
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.buffers, batch, key)
        metrics, output = aux if has_output else (aux, None)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm_before_clip=optax.tree.norm(grads))
        state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return (state, metrics, output) if has_output else (state, metrics)

    return update


def jit_update(update, mesh: Mesh, batch_sharding: Any = None, has_output: bool = False):
    """Jits update(state, batch, key) for the mesh: the batch is split over the devices, the state is
    replicated, and XLA all-reduces the gradients. The same program runs on one device or many.

    batch_sharding: a sharding or a pytree prefix of the batch, for batches that hold replicated parts (the
    actor-critic's inputs carry the frozen world model); default: all of it split over the devices.
    has_output: for updates made with make_update(..., has_output=True); the output is split over the devices.
    """
    rep, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
    batch_sharding = data if batch_sharding is None else batch_sharding
    out_shardings = (rep, rep, data) if has_output else (rep, rep)
    return jax.jit(update, in_shardings=(rep, batch_sharding, rep), out_shardings=out_shardings,
                   donate_argnums=(0,))


def count_params(params: Any) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
