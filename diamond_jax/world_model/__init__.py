"""World models trained on recorded play, without reinforcement learning: the model and its sampling
(model.py), training (train.py, `python -m diamond_jax.world_model`), quality metrics and evaluation."""
