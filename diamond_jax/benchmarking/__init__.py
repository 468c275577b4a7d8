"""The machinery of `python -m diamond_jax.benchmark`: what each item runs, how it is timed and counted, and
what the figures mean for a whole run."""
