"""World models trained on recorded play, without reinforcement learning: the model and its sampling
(model.py), training (train.py, `python -m diamond_jax.world_model`), the metrics of generated frames and videos
against recorded ones (metrics.py) and the evaluation (evaluate.py, `python -m diamond_jax.world_model_eval`)."""
