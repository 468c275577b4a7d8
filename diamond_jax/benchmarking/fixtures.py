"""Fixtures of the benchmark: a synthetic replay dataset of a whole collection budget, the rate of segment
sampling from it, and the rate of the training collector."""

import time
from typing import Optional

import jax
import numpy as np
from ml_collections import config_dict

from diamond_jax import envs
from diamond_jax.data.replay import ReplayDataset
from diamond_jax.data.sampling import sample_segments
from diamond_jax.envs.collect import TrainCollector
from diamond_jax.models.actor_critic import ActorCritic

# The PyTorch reference's benchmark (bench_torch.py) times batch 32, the paper's, in every item; the sampling
# item draws batches of this size too, whatever the config says.
REFERENCE_BATCH_SIZE = 32


def synthetic_replay(config, seed: int = 0) -> ReplayDataset:
    """A replay dataset holding the whole collection budget of `config` in episodes of 20 to 400 steps,
    with random frames (for benchmarks)."""
    rng = np.random.default_rng(seed)
    t = config.collection.train
    size = config.env.size
    replay = ReplayDataset.from_config(config)
    pool = rng.integers(0, 256, (256, size, size, 3), dtype=np.uint8)
    for lane in range(t.num_envs):
        remaining = t.num_steps_total // t.num_envs
        while remaining:
            k = min(remaining, int(rng.integers(20, 401)))
            remaining -= k
            end = np.zeros(k, bool)
            end[-1] = True
            replay.append(lane, pool[rng.integers(0, len(pool), k)], rng.integers(0, 4, k).astype(np.int32),
                          rng.choice(np.array([-1.0, 0.0, 1.0], np.float32), k), end, np.zeros(k, bool),
                          pool[rng.integers(0, len(pool))])
    return replay


def benchmark_sampling(config, num_batches: int, seq_length: Optional[int] = None) -> float:
    """Segments per second of jitted `sample_segments` (batches of REFERENCE_BATCH_SIZE, the reward/end
    model's segments with padding past the end unless seq_length is given) from a synthetic replay of the
    whole budget."""
    batch_size = REFERENCE_BATCH_SIZE
    seq_length = seq_length or config.rew_end_model.training.seq_length
    device = synthetic_replay(config).device_replay()
    sample = jax.jit(sample_segments, static_argnums=(2, 3, 4, 5))
    weights = tuple(config.rew_end_model.training.sample_weights)
    keys = jax.random.split(jax.random.key(0), num_batches + 1)
    jax.block_until_ready(sample(device, keys[-1], batch_size, seq_length, weights, True))  # compiles
    start = time.perf_counter()
    for i in range(num_batches):
        batch = sample(device, keys[i], batch_size, seq_length, weights, True)
    jax.block_until_ready(batch)
    return num_batches * batch_size / (time.perf_counter() - start)


def benchmark_collection(config: config_dict.ConfigDict, num_steps: int) -> float:
    """Agent steps per second of the training collector, the policy (randomly initialised) acting and the
    replay dataset filling, after a warm-up that compiles the policy."""
    actor_critic = ActorCritic.from_config(config, envs.num_actions(config))
    variables = actor_critic.init(jax.random.key(0), config.env.size)
    collector = TrainCollector(config, actor_critic, ReplayDataset.from_config(config), jax.random.key(1), 0)
    collector.collect(variables, collector.num_envs)
    start = time.perf_counter()
    collector.collect(variables, num_steps)
    return num_steps / (time.perf_counter() - start)
