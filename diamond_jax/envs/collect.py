"""Collecting real experience with the actor-critic.

- `policy_step_fn(actor_critic)`: the jitted acting step, sampling at a temperature, with epsilon-greedy.
- `TrainCollector`: the training envs, persistent across epochs; each `collect` call adds its steps to the
  replay dataset, partial episodes included (later calls extend them), as the official collector does.
  It is restorable exactly: envpool cannot save emulator states, but every backend is deterministic given
  its seed and the actions sent, so the collector records every action batch and `restore` replays them.
- `collect_test_episodes`: fresh test envs, a given number of whole episodes.
- `collect_initial`: the first epoch's collection rule.

Environments come from `diamond_jax.envs.make_env`, whichever the backend.
"""

import functools
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from diamond_jax.data.batch import obs_from_frames
from diamond_jax.data.replay import ReplayDataset
from diamond_jax.envs import make_env
from diamond_jax.models.actor_critic import ActorCritic, HxCx

PolicyStep = Callable[..., Tuple[jax.Array, HxCx]]


def sample_action(key: jax.Array, logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """An action per row from softmax(logits / temperature): 1 samples the policy, 0 takes its most likely
    action (greedy)."""
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1))


@functools.lru_cache(maxsize=None)
def policy_step_fn(actor_critic: ActorCritic) -> PolicyStep:
    """policy_step(ac_variables, obs uint8 [n, h, w, 3], hx_cx, key, epsilon, temperature=1) -> (act int32 [n],
    hx_cx): one LSTM step, an action sampled from the policy at `temperature` (`sample_action`), replaced by a
    uniform random one with probability epsilon independently in each env (the official code draws once for
    all envs; with one env, the same)."""

    @jax.jit
    def policy_step(ac_variables, obs, hx_cx, key, epsilon, temperature=1.0):
        n = obs.shape[0]
        chex.assert_shape(obs, (n, None, None, 3))
        chex.assert_type(obs, jnp.uint8)
        out = actor_critic.predict_act_value(ac_variables, obs_from_frames(obs), hx_cx)
        key_act, key_explore, key_random = jax.random.split(key, 3)
        act = sample_action(key_act, out.logits_act, jnp.asarray(temperature, jnp.float32))
        explore = jax.random.uniform(key_explore, (n,)) < epsilon
        random_act = jax.random.randint(key_random, (n,), 0, actor_critic.num_actions)
        return jnp.where(explore, random_act, act).astype(jnp.int32), out.hx_cx

    return policy_step


def _typed_key(key: jax.Array) -> jax.Array:
    return key if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def _reset_rows(hx_cx: HxCx, first: np.ndarray) -> HxCx:
    """Zero LSTM state for the envs whose episode starts now, as the official env loop does."""
    return tuple(np.where(first[:, None], 0.0, np.asarray(x)).astype(np.float32) for x in hx_cx)


def _counts(replay: ReplayDataset) -> Dict[str, int]:
    names = ("counts/rew_negative", "counts/rew_zero", "counts/rew_positive", "counts/end_0", "counts/end_1")
    return dict(zip(names, (int(x) for x in (*replay.counts_rew, *replay.counts_end))))


class TrainCollector:
    """Training envs (done on life loss) acting with the actor-critic, epsilon-greedy, into a replay dataset
    with one lane per env. Frames, LSTM states and episodes in progress carry over between `collect` calls.

    key: drives the policy's sampling; env_seed: env i is seeded env_seed + i (no-ops at reset).
    """

    def __init__(self, config: config_dict.ConfigDict, actor_critic: ActorCritic, replay: ReplayDataset,
                 key: jax.Array, env_seed: int):
        c = config.collection.train
        if replay.num_lanes != c.num_envs:
            raise ValueError(f"the replay dataset has {replay.num_lanes} lanes but collection.train.num_envs is "
                             f"{c.num_envs}: it needs one lane per env (ReplayDataset.from_config(config))")
        self.num_envs = c.num_envs
        self.epsilon = c.epsilon
        self.replay = replay
        self._config = config
        self._actor_critic = actor_critic
        self._policy_step = policy_step_fn(actor_critic)
        self._start(key, env_seed)

    def _start(self, key: jax.Array, env_seed: int) -> None:
        self._env = make_env(self._config, self.num_envs, train=True, seed=env_seed)
        if self._env.num_actions != self._actor_critic.num_actions:
            raise ValueError(f"{self._config.game} has {self._env.num_actions} actions but the actor-critic "
                             f"has {self._actor_critic.num_actions}")
        self._env_seed = env_seed
        self._key = _typed_key(key)
        self._obs = self._env.reset()
        self._hx_cx = _reset_rows(self._actor_critic.initial_state(self.num_envs), np.ones(self.num_envs, bool))
        self._acts: List[np.ndarray] = []  # every action batch sent to the envs, for `restore`
        self._ep_return = np.zeros(self.num_envs, np.float64)
        self._ep_length = np.zeros(self.num_envs, np.int64)
        self.num_steps = 0

    def collect(self, ac_variables: Any, num_steps: int,
                on_step: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
        """Steps every env num_steps / num_envs times; returns logs: the episodes that finished (episode id,
        return, length), the steps collected so far and the dataset's reward/end counts. on_step(num_envs)
        is called after every env step (a progress bar)."""
        if num_steps % self.num_envs:
            raise ValueError(f"num_steps={num_steps} must be a multiple of the {self.num_envs} envs")
        buffers: List[List[Tuple]] = [[] for _ in range(self.num_envs)]
        finished = []
        for _ in range(num_steps // self.num_envs):
            self._key, key = jax.random.split(self._key)
            act, hx_cx = self._policy_step(ac_variables, self._obs, self._hx_cx, key, self.epsilon)
            act = np.asarray(act)
            step = self._env.step(act)
            self._acts.append(act)
            for i in range(self.num_envs):
                buffers[i].append((self._obs[i], act[i], step.rew[i], step.end[i], step.trunc[i]))
            self._ep_return += step.rew
            self._ep_length += 1
            dead = step.end | step.trunc
            for i in np.flatnonzero(dead):
                episode_id = self._flush(i, buffers[i], step.final_obs[i])
                finished.append({"episode_id": episode_id, "return": float(self._ep_return[i]),
                                 "length": int(self._ep_length[i])})
            self._ep_return[dead], self._ep_length[dead] = 0, 0
            self._hx_cx = _reset_rows(hx_cx, dead)
            self._obs = step.obs
            if on_step is not None:
                on_step(self.num_envs)
        for i in range(self.num_envs):
            if buffers[i]:  # an episode in progress: stored now, extended by the next call
                self._flush(i, buffers[i], self._obs[i])
        self.num_steps += num_steps
        return {"episodes": finished, "num_steps": self.num_steps, **_counts(self.replay)}

    def _flush(self, lane: int, buffer: List[Tuple], last_obs: np.ndarray) -> int:
        obs, act, rew, end, trunc = (np.stack(x) for x in zip(*buffer))
        buffer.clear()
        return self.replay.append(lane, obs, act, rew, end, trunc, last_obs)

    def state_dict(self) -> Dict[str, Any]:
        """What `restore` needs, as numpy arrays and numbers (the action history is num_steps int32)."""
        hx, cx = (np.asarray(x) for x in self._hx_cx)
        acts = np.stack(self._acts) if self._acts else np.zeros((0, self.num_envs), np.int32)
        return {"env_seed": self._env_seed, "key": np.asarray(jax.random.key_data(self._key)),
                "key_impl": str(jax.random.key_impl(self._key)), "acts": acts,
                "hx": hx, "cx": cx, "ep_return": self._ep_return.copy(), "ep_length": self._ep_length.copy(),
                "num_steps": self.num_steps, "obs_crc32": zlib.crc32(self._obs.tobytes())}

    def restore(self, state_dict: Dict[str, Any]) -> None:
        """Re-creates the envs with the same seed and replays the recorded actions, which brings them to the
        exact state they had at `state_dict()`; the replay dataset is restored separately (its `summary()`
        at that time, with `ReplayDataset.load(directory, up_to=...)`)."""
        sd = state_dict
        self._start(jax.random.wrap_key_data(jnp.asarray(sd["key"]), impl=sd["key_impl"]), int(sd["env_seed"]))
        acts = np.asarray(sd["acts"], np.int32)
        for act in acts:
            self._obs = self._env.step(act).obs
        self._acts = list(acts)
        if zlib.crc32(self._obs.tobytes()) != int(sd["obs_crc32"]):
            raise RuntimeError("replaying the recorded actions did not reproduce the envs' frames: was the "
                               "state saved with another envpool version, game or env config?")
        self._hx_cx = (np.asarray(sd["hx"], np.float32), np.asarray(sd["cx"], np.float32))
        self._ep_return = np.asarray(sd["ep_return"], np.float64).copy()
        self._ep_length = np.asarray(sd["ep_length"], np.int64).copy()
        self.num_steps = int(sd["num_steps"])


class Interrupted(Exception):
    """Test episodes abandoned because `should_stop` said so."""


def collect_test_episodes(config: config_dict.ConfigDict, actor_critic: ActorCritic, ac_variables: Any,
                          num_episodes: int, key: jax.Array, env_seed: int,
                          dataset: Optional[ReplayDataset] = None,
                          should_stop: Callable[[], bool] = lambda: False) -> Dict[str, List]:
    """Plays num_episodes whole test episodes (no done on life loss, epsilon collection.test.epsilon, actions
    sampled at collection.test.temperature) in fresh envs; returns their returns and lengths, and adds them to `dataset` (one lane) if given. Raises
    Interrupted as soon as should_stop() is true (checked every step: 100 long episodes can take an hour).

    With several envs, short episodes finish first: stopping at the first N to finish would favour them.
    Instead the episodes kept are the first N to start (env i starts episode i, then each env that finishes
    starts the next one while fewer than N have started), and collection runs until all of them have
    finished. Whether an episode is among the first N started does not depend on its own length, so the
    N are an unbiased sample. Envs past that point keep stepping (sync mode), their episodes discarded.
    """
    c = config.collection.test
    num_envs = min(c.num_envs, num_episodes)
    env = make_env(config, num_envs, train=False, seed=env_seed)
    policy_step = policy_step_fn(actor_critic)
    key = _typed_key(key)
    obs = env.reset()
    hx_cx = _reset_rows(actor_critic.initial_state(num_envs), np.ones(num_envs, bool))
    episode_of_env = np.arange(num_envs)  # the episode each env plays, -1 once past the first N
    next_episode = num_envs
    buffers: List[List[Tuple]] = [[] for _ in range(num_envs)]
    returns, lengths = [None] * num_episodes, [None] * num_episodes
    ep_return, ep_length = np.zeros(num_envs, np.float64), np.zeros(num_envs, np.int64)
    episodes: Dict[int, Tuple] = {}
    while any(x is None for x in returns):
        if should_stop():
            raise Interrupted(f"stopped after {sum(x is not None for x in returns)} of {num_episodes} episodes")
        key, key_step = jax.random.split(key)
        act, hx_cx = policy_step(ac_variables, obs, hx_cx, key_step, c.epsilon, c.temperature)
        act = np.asarray(act)
        step = env.step(act)
        ep_return += step.rew
        ep_length += 1
        if dataset is not None:
            for i in np.flatnonzero(episode_of_env >= 0):
                buffers[i].append((obs[i], act[i], step.rew[i], step.end[i], step.trunc[i]))
        dead = step.end | step.trunc
        for i in np.flatnonzero(dead):
            e = episode_of_env[i]
            if e >= 0:
                returns[e], lengths[e] = float(ep_return[i]), int(ep_length[i])
                if dataset is not None:
                    episodes[e] = (*(np.stack(x) for x in zip(*buffers[i])), step.final_obs[i])
                    buffers[i] = []
            episode_of_env[i] = next_episode if next_episode < num_episodes else -1
            next_episode += 1
        ep_return[dead], ep_length[dead] = 0, 0
        hx_cx = _reset_rows(hx_cx, dead)
        obs = step.obs
    if dataset is not None:
        for e in range(num_episodes):
            dataset.append(0, *episodes[e])
    return {"returns": returns, "lengths": lengths}


def keep_collecting_initial(counts_rew: Sequence[int], num_steps: int, threshold_rew: int, max_steps: int) -> bool:
    """The initial-collection rule: go on while the two rarest reward classes (by sign)
    together have fewer than threshold_rew steps and fewer than max_steps were collected."""
    return sum(sorted(counts_rew)[:2]) < threshold_rew and num_steps < max_steps


def collect_initial(collect: Callable[[int], Any], counts_rew: Callable[[], Sequence[int]],
                    config: config_dict.ConfigDict) -> int:
    """Collects first_epoch.min steps, then steps_per_epoch more at a time while `keep_collecting_initial`;
    returns the number of steps collected. collect(num_steps) collects; counts_rew() gives the dataset's
    counts of rewards -1, 0, +1 (ReplayDataset.counts_rew)."""
    c = config.collection.train
    num_steps = c.first_epoch.min
    collect(num_steps)
    while keep_collecting_initial(counts_rew(), num_steps, c.first_epoch.threshold_rew, c.first_epoch.max):
        collect(c.steps_per_epoch)
        num_steps += c.steps_per_epoch
    return num_steps
