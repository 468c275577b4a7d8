"""Two fake CPU devices for every test, so that data-parallel code paths run in the suite; tests that need
one device build a one-device mesh."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
