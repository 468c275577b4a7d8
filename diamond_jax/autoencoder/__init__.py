"""Training an autoencoder of frames for latent world models (python -m diamond_jax.autoencoder), and the
folder format the world model reads it from (training/autoencoder_export.py)."""
