"""The JAX/Flax implementation of DIAMOND (Alonso et al., NeurIPS 2024)."""

__version__ = "0.1.0"
