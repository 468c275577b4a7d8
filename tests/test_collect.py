"""Collection with the actor-critic: the replay holds exactly what the envs did, LSTM resets, epsilon-greedy,
test episodes, exact restore, and the initial-collection rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import atari100k
from diamond_jax.data.replay import ReplayDataset
from diamond_jax.envs import collect
from diamond_jax.envs.base import EnvStep
from diamond_jax.envs.atari import make_atari_env
from diamond_jax.envs.collect import (TrainCollector, collect_initial, collect_test_episodes, keep_collecting_initial,
                                      policy_step_fn)
from diamond_jax.models.actor_critic import ActorCritic

NUM_ACTIONS = 4  # Breakout, the default game


def debug_config(num_envs=2):
    config = atari100k.get_config("debug")
    config.collection.train.num_envs = num_envs
    config.collection.test.num_envs = num_envs
    return config


@pytest.fixture(scope="module")
def model():
    actor_critic = ActorCritic.from_config(debug_config(), NUM_ACTIONS)
    return actor_critic, actor_critic.init(jax.random.key(0), 16)


def expected_episodes(config, env_seed, acts):
    """Independent expectation: fresh envs stepped with the recorded actions, cut into episodes by hand."""
    env = make_atari_env(config.game, config.env, acts.shape[1], train=True, seed=env_seed)
    obs = env.reset()
    lanes = [[] for _ in range(acts.shape[1])]
    current = [None] * acts.shape[1]
    for act in acts:
        s = env.step(act)
        for i in range(len(act)):
            if current[i] is None:
                current[i] = {"obs": [], "act": [], "rew": [], "end": [], "trunc": []}
            for name, value in (("obs", obs[i]), ("act", act[i]), ("rew", s.rew[i]), ("end", s.end[i]),
                                ("trunc", s.trunc[i])):
                current[i][name].append(value)
            if s.end[i] or s.trunc[i]:
                current[i]["obs"].append(s.final_obs[i])
                lanes[i].append(dict(current[i], finished=True))
                current[i] = None
        obs = s.obs
    for i, episode in enumerate(current):
        if episode is not None:
            episode["obs"].append(obs[i])
            lanes[i].append(dict(episode, finished=False))
    return lanes


def episodes_by_lane(replay):
    lanes = [[] for _ in range(replay.num_lanes)]
    for e in range(replay.num_episodes):
        lanes[replay._ep_lane[e]].append(replay.episode(e))
    return lanes


def assert_same_episodes(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["finished"] == y["finished"]
        for name in ("obs", "act", "rew", "end", "trunc"):
            np.testing.assert_array_equal(np.asarray(x[name]), np.asarray(y[name]), err_msg=name)


def test_train_collector_fills_the_replay_with_what_the_envs_did(model):
    actor_critic, variables = model
    config = debug_config()
    replay = ReplayDataset.from_config(config)
    collector = TrainCollector(config, actor_critic, replay, jax.random.key(1), env_seed=3)
    logs_1 = collector.collect(variables, 60)
    in_progress = {e: replay.episode(e) for e in range(replay.num_episodes) if not replay.episode(e)["finished"]}
    logs_2 = collector.collect(variables, 140)
    assert replay.num_steps == 200 and logs_2["num_steps"] == 200
    acts = collector.state_dict()["acts"]
    assert acts.shape == (100, 2)
    lanes = expected_episodes(config, 3, acts)
    for expected, stored in zip(lanes, episodes_by_lane(replay)):
        assert_same_episodes(expected, stored)
    assert sum(len(lane) for lane in lanes) >= 4  # some episodes ended (life losses)
    # Episodes in progress after the first call were extended by the second, their frames untouched.
    assert len(in_progress) == 2
    for e, before in in_progress.items():
        after = replay.episode(e)
        assert len(after["act"]) > len(before["act"])
        np.testing.assert_array_equal(after["obs"][:len(before["obs"])], before["obs"])
    finished = logs_1["episodes"] + logs_2["episodes"]
    assert len(finished) == sum(replay.episode(e)["finished"] for e in range(replay.num_episodes))
    for log in finished:
        episode = replay.episode(log["episode_id"])
        assert log["length"] == len(episode["act"]) and log["return"] == pytest.approx(episode["rew"].sum())
    assert logs_2["counts/rew_zero"] + logs_2["counts/rew_positive"] + logs_2["counts/rew_negative"] == 200
    assert logs_2["counts/end_1"] == sum(int(np.sum(episode["end"])) for lane in lanes for episode in lane)


def test_lstm_state_is_zero_at_each_episode_start(model):
    actor_critic, variables = model
    config = debug_config()
    collector = TrainCollector(config, actor_critic, ReplayDataset.from_config(config), jax.random.key(2), 4)
    starts = 0
    for _ in range(80):
        collector.collect(variables, 2)
        hx, cx = collector._hx_cx
        new_episode = collector._ep_length == 0
        starts += new_episode.sum()
        for i in range(2):
            zero = not hx[i].any() and not cx[i].any()
            assert zero == new_episode[i], (i, collector._ep_length)
    assert starts >= 2


def test_epsilon_greedy_frequency(model):
    actor_critic, variables = model
    # A policy that always picks action 0: any other action comes from exploration.
    params = jax.tree.map(lambda x: x, variables["params"])
    params["actor_linear"]["bias"] = jnp.array([60.0, 0.0, 0.0, 0.0])
    greedy = {"params": params}
    n, epsilon = 4000, 0.3
    obs = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    policy_step = policy_step_fn(actor_critic)
    act, _ = policy_step(greedy, obs, actor_critic.initial_state(n), jax.random.key(3), epsilon)
    act = np.asarray(act)
    # Per env: explore with probability epsilon, then a uniform action, which is not 0 with probability 3/4.
    p = epsilon * (NUM_ACTIONS - 1) / NUM_ACTIONS
    assert abs(np.sum(act != 0) - n * p) <= 5 * np.sqrt(n * p * (1 - p))
    for a in range(1, NUM_ACTIONS):
        q = epsilon / NUM_ACTIONS
        assert abs(np.sum(act == a) - n * q) <= 5 * np.sqrt(n * q * (1 - q))
    act, _ = policy_step(greedy, obs, actor_critic.initial_state(n), jax.random.key(4), 0.0)
    assert (np.asarray(act) == 0).all()


def test_test_collection_returns_whole_episodes(model):
    actor_critic, variables = model
    config = debug_config()
    dataset = ReplayDataset(1, (16, 16, 3))
    out = collect_test_episodes(config, actor_critic, variables, 3, jax.random.key(5), env_seed=7, dataset=dataset)
    assert len(out["returns"]) == len(out["lengths"]) == 3 == dataset.num_episodes
    for e in range(3):
        episode = dataset.episode(e)
        assert episode["finished"] and out["lengths"][e] == len(episode["act"]) <= config.env.max_episode_steps
        assert out["returns"][e] == pytest.approx(episode["rew"].sum())
        # A test episode ends at game over or the time limit, never at a life loss.
        assert not (episode["end"][:-1] | episode["trunc"][:-1]).any()
        assert episode["trunc"][-1] or episode["end"][-1]
        if episode["end"][-1]:
            assert len(episode["act"]) > 50  # Breakout has 5 lives; game over takes a while


def test_restore_continues_exactly(model, tmp_path):
    """A run killed after a checkpoint and resumed: the replay saved later is cut back to the checkpoint's
    summary, the collector restored from its state dict; both then add exactly what the uninterrupted
    collector adds."""
    actor_critic, variables = model
    config = debug_config()
    replay = ReplayDataset.from_config(config)
    collector = TrainCollector(config, actor_critic, replay, jax.random.key(6), env_seed=11)
    collector.collect(variables, 40)
    checkpoint = collector.state_dict(), replay.summary()
    collector.collect(variables, 20)
    replay.save(tmp_path)  # saved after the checkpoint, then the run dies
    collector.collect(variables, 80)

    resumed_replay = ReplayDataset.load(tmp_path, up_to=checkpoint[1])
    resumed = TrainCollector(config, actor_critic, resumed_replay, jax.random.key(99), env_seed=99)
    resumed.restore(checkpoint[0])
    resumed.collect(variables, 20)
    resumed.collect(variables, 80)
    assert resumed_replay.summary() == replay.summary()
    assert_same_episodes([replay.episode(e) for e in range(replay.num_episodes)],
                         [resumed_replay.episode(e) for e in range(resumed_replay.num_episodes)])
    a, b = collector.state_dict(), resumed.state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_restore_refuses_a_state_it_cannot_reproduce(model):
    actor_critic, variables = model
    config = debug_config()
    collector = TrainCollector(config, actor_critic, ReplayDataset.from_config(config), jax.random.key(7), 1)
    collector.collect(variables, 10)
    state = collector.state_dict()
    state["env_seed"] = 2
    with pytest.raises(RuntimeError, match="did not reproduce"):
        collector.restore(state)


class ScriptedRewards:
    """Stands in for the collector: collect(n) takes the next n rewards of a fixed stream."""

    def __init__(self, stream):
        self.stream, self.position = stream, 0
        self.counts = np.zeros(3, np.int64)

    def collect(self, num_steps):
        rew = self.stream[self.position:self.position + num_steps]
        self.position += num_steps
        self.counts += np.bincount(np.sign(rew).astype(np.int64) + 1, minlength=3)


@pytest.mark.parametrize("name, events, expected_steps", [
    ("rewards are common: the minimum", {t: 1.0 for t in range(0, 5000, 50)} | {7: -1.0}, 5000),
    # 9 positive rewards in the first 5,000 steps, one negative at step 6,150: enough once 6,200 are collected.
    ("one short: 100 steps at a time", {t: 3.0 for t in range(100, 1000, 100)} | {6150: -2.0}, 6200),
    ("never enough: the maximum", {t: 1.0 for t in range(3)}, 10_000),
])
def test_initial_collection_rule(name, events, expected_steps):
    config = atari100k.get_config()
    stream = np.zeros(20_000, np.float32)
    for t, r in events.items():
        stream[t] = r
    source = ScriptedRewards(stream)
    steps = collect_initial(source.collect, lambda: source.counts, config)
    assert steps == source.position == expected_steps, name


def test_initial_collection_rule_boundaries():
    assert not keep_collecting_initial([10, 4000, 0], 5000, 10, 10_000)  # exactly the threshold: stop
    assert keep_collecting_initial([4, 5000, 5], 5000, 10, 10_000)  # 4 + 5 < 10, classes in any order
    assert not keep_collecting_initial([0, 10_000, 0], 10_000, 10, 10_000)  # the maximum is reached


class ScriptedEpisodes:
    """A stand-in env: env i plays episodes of the lengths lengths[i][k]; each ends with reward 10 * i + k, so a
    return names the env and the episode that earned it."""

    def __init__(self, lengths, size):
        self.lengths, self.size = lengths, size
        self.num_envs, self.num_actions, self.action_names = len(lengths), 4, ("NOOP", "FIRE", "RIGHT", "LEFT")

    def reset(self):
        self.episode, self.t = [0] * self.num_envs, [0] * self.num_envs
        return np.zeros((self.num_envs, self.size, self.size, 3), np.uint8)

    def step(self, act):
        frames = np.zeros((self.num_envs, self.size, self.size, 3), np.uint8)
        rew, end = np.zeros(self.num_envs, np.float32), np.zeros(self.num_envs, bool)
        for i in range(self.num_envs):
            self.t[i] += 1
            if self.t[i] == self.lengths[i][self.episode[i]]:
                rew[i], end[i] = 10 * i + self.episode[i], True
                self.episode[i], self.t[i] = self.episode[i] + 1, 0
        return EnvStep(frames, frames, rew, end, np.zeros(self.num_envs, bool), np.zeros(self.num_envs, np.int32))


def test_test_episodes_keep_the_first_n_started_not_the_first_n_finished(debug_config, debug_agent, monkeypatch):
    """Env 0's first episode is long, env 1's are short. The first 4 episodes started are env 0's first and env 1's
    first three (each env starts its next episode when one ends, while fewer than 4 have started); the first 4 to
    finish would be env 1's four."""
    agent, variables = debug_agent
    lengths = [[6, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]]
    monkeypatch.setattr(collect, "make_env", lambda config, n, train, seed: ScriptedEpisodes(lengths,
                                                                                            config.env.size))
    config = debug_config.unlock().copy_and_resolve_references()
    config.collection.test.num_envs = 2
    out = collect_test_episodes(config, agent.actor_critic, variables["actor_critic"], 4, jax.random.key(0), 0)
    assert out["returns"] == [0.0, 10.0, 11.0, 12.0]  # episode e -> (env, its k-th episode): (0,0) (1,0) (1,1) (1,2)
    assert out["lengths"] == [6, 1, 1, 1]
