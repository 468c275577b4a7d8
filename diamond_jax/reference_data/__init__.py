"""Reference scores read by diamond_jax.scores; a package so that setuptools ships it without warnings."""
