"""The dtype policy of the three models, one for the whole agent, chosen by `config.precision`.

"float32" (the paper's and the default) computes everything in float32. "bfloat16" runs the matrix products
and convolutions of every layer in bfloat16 (the layers of models/blocks.py: Dense, Conv, the attention
products, the LSTM cells' gate products) and keeps the activations between layers in bfloat16. Everything
whose precision decides the numbers stays float32: parameters (so gradients and optimiser states),
normalisation statistics and the normalisation itself, softmaxes, the noise level's Fourier features, the LSTM
cells' gates and state, the EDM preconditioning, the sampler's arithmetic on sigma, and every loss: each
network casts its outputs to float32, so nothing outside the networks sees another dtype.

Plain Python at import: config validation imports PRECISIONS before JAX may be imported (main picks JAX's
platform after parsing the config).
"""

from typing import Any

PRECISIONS = ("float32", "bfloat16")  # config.precision's choices; each names its compute dtype
DEFAULT_PRECISION = "float32"  # the paper's, and that of configs saved before config.precision existed


def compute_dtype(config) -> Any:
    """The dtype of matrix products, convolutions and activations for a config (or its JSON snapshot)."""
    import jax.numpy as jnp  # here, not at the top: see the module's docstring

    precision = config.get("precision", DEFAULT_PRECISION)
    if precision not in PRECISIONS:
        raise ValueError(f"config.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    return getattr(jnp, precision)  # jnp.float32 or jnp.bfloat16
