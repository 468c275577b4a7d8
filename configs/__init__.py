"""Config files (`get_config(arg)`, presets after ':'), shipped in an installed package as diamond_jax.configs."""
