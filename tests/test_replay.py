"""The replay dataset: layout, segment sampling against plain-Python references, the device mirror,
persistence (bit-exact, incremental, crash-safe, truncation) and memory."""

import functools
import json
import logging
import os

import chex
import jax
import numpy as np
import pytest

from configs import atari100k
from diamond_jax.data import files as files_lib, replay as replay_lib
from diamond_jax.data.replay import ReplayDataset
from diamond_jax.data.sampling import draw_segments, gather_segments, sample_segments
from diamond_jax.training import parallel

SHAPE = (2, 3, 3)
WEIGHTS = (0.1, 0.1, 0.1, 0.7)


def five_sigma(count, n, p):
    """Whether a binomial count is within 5 standard deviations of its mean (a false alarm has
    probability < 1e-6 per check; the keys are fixed anyway, so the tests are deterministic)."""
    return abs(count - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1e-9


def random_steps(rng, k, dead_at_end=None):
    """k steps: frames, actions, rewards in {-1, 0, 1, 5}, end/trunc only possibly at the last step."""
    obs = rng.integers(0, 256, (k,) + SHAPE, dtype=np.uint8)
    act = rng.integers(0, 4, k).astype(np.int32)
    rew = rng.choice(np.array([-1.0, 0.0, 1.0, 5.0], np.float32), k)
    end, trunc = np.zeros(k, bool), np.zeros(k, bool)
    if dead_at_end == "end":
        end[-1] = True
    elif dead_at_end == "trunc":
        trunc[-1] = True
    return obs, act, rew, end, trunc, rng.integers(0, 256, SHAPE, dtype=np.uint8)


def append_continuing(replay, lane, rng, k, dead_at_end=None):
    """Appends k steps to lane, continuing its in-progress episode from its current frame if it has one."""
    obs, act, rew, end, trunc, last = random_steps(rng, k, dead_at_end)
    open_id = replay._open[lane]
    if open_id >= 0:
        obs[0] = replay.episode(open_id)["obs"][-1]
    return replay.append(lane, obs, act, rew, end, trunc, last)


def hand_built(rng, **kw):
    """Two lanes: ended, truncated and in-progress episodes, some extended by later appends."""
    r = ReplayDataset(2, SHAPE, **kw)
    append_continuing(r, 0, rng, 3, "end")  # 0
    append_continuing(r, 1, rng, 1, "trunc")  # 1
    append_continuing(r, 1, rng, 2)  # 2, in progress...
    append_continuing(r, 0, rng, 4)  # 3, in progress
    append_continuing(r, 1, rng, 3, "end")  # ...2 continued and ended
    append_continuing(r, 0, rng, 2)  # 3 continued, still in progress
    append_continuing(r, 1, rng, 5)  # 4, in progress
    return r


def reference_segment(episode, start, seq_length, mask_frames=False):
    """Plain Python: position k holds a real frame iff 0 <= k <= L, a real step iff 0 <= k < L; the mask
    marks real steps, or real frames."""
    length = len(episode["act"])
    out = {"obs": [], "act": [], "rew": [], "end": [], "trunc": [], "mask_padding": []}
    for k in range(start, start + seq_length):
        frame = episode["obs"][k] / 255 * 2 - 1 if 0 <= k <= length else np.zeros(SHAPE)
        out["obs"].append(frame)
        real = 0 <= k < length
        for name in ("act", "rew", "end", "trunc"):
            out[name].append(episode[name][k] if real else 0)
        out["mask_padding"].append(0 <= k <= length if mask_frames else real)
    return {k: np.array(v) for k, v in out.items()}


def test_layout_and_episode_table():
    rng = np.random.default_rng(0)
    r = hand_built(rng)
    assert r.num_episodes == 5
    assert r.lengths.tolist() == [3, 1, 5, 6, 5]
    assert r._ep_lane.tolist()[:5] == [0, 1, 1, 0, 1] and r._ep_start.tolist()[:5] == [0, 0, 2, 4, 8]
    assert r._ep_finished.tolist()[:5] == [True, True, True, False, False]
    assert r.lane_sizes == [4 + 7, 2 + 6 + 6]  # L + 1 slots per episode
    assert r.num_steps == 20
    ep = r.episode(2)
    assert ep["end"].tolist() == [0, 0, 0, 0, 1] and ep["obs"].shape == (6,) + SHAPE
    rews = np.concatenate([r.episode(i)["rew"] for i in range(5)])
    assert r.counts_rew.tolist() == [np.sum(rews < 0), np.sum(rews == 0), np.sum(rews > 0)]
    assert r.counts_end.tolist() == [18, 2]  # 20 steps, episodes 0 and 2 ended (1 was cut)


def test_append_refuses_inconsistent_data():
    rng = np.random.default_rng(1)
    r = hand_built(rng)
    obs, act, rew, end, trunc, last = random_steps(rng, 2)
    with pytest.raises(ValueError, match="out of sync"):
        r.append(0, obs, act, rew, end, trunc, last)  # lane 0 has an episode in progress: obs[0] must match
    end[0] = True
    with pytest.raises(ValueError, match="split it"):
        r.append(0, obs, act, rew, end, trunc, last)


@pytest.mark.parametrize("mask_frames", [False, True])
def test_gather_matches_the_python_reference_at_every_start(mask_frames):
    rng = np.random.default_rng(2)
    r = hand_built(rng)
    device = r.device_replay()
    seq_length = 4
    cases = [(e, s) for e in range(r.num_episodes) for s in range(-seq_length + 1, int(r.lengths[e]) + 1)]
    episode, start = (np.array(x, np.int32) for x in zip(*cases))
    batch = jax.jit(gather_segments, static_argnums=(3, 4))(device, episode, start, seq_length, mask_frames)
    for i, (e, s) in enumerate(cases):
        ref = reference_segment(r.episode(e), s, seq_length, mask_frames)
        for name in ("obs", "act", "rew", "end", "trunc", "mask_padding"):
            np.testing.assert_allclose(np.asarray(getattr(batch, name)[i]), ref[name], rtol=0, atol=1e-6,
                                       err_msg=f"{name} episode {e} start {s}")
    assert batch.obs.dtype == np.float32 and batch.act.dtype == np.int32 and batch.end.dtype == np.int32
    assert batch.mask_padding.dtype == bool


def exact_start_distribution(length, seq_length, beyond_end, final_frame=False):
    """P(start) by enumerating the official rule's (t, offset) draws; with final_frame, over the L + 1 frames."""
    positions = length + 1 if final_frame else length
    probs = {}
    for t in range(positions):
        for offset in range(seq_length):
            start = t - offset if beyond_end else min(positions, t + 1 + offset) - seq_length
            probs[start] = probs.get(start, 0) + 1 / (positions * seq_length)
    return probs


@pytest.mark.parametrize("beyond_end", [False, True])
def test_segment_bounds_follow_the_official_rule(beyond_end):
    rng = np.random.default_rng(3)
    r = ReplayDataset(1, SHAPE)
    r.append(0, *random_steps(rng, 5, "end"))
    n, seq_length = 20_000, 3
    episode, start = jax.jit(draw_segments, static_argnums=(2, 3, 4, 5))(
        r.device_replay(), jax.random.key(0), n, seq_length, WEIGHTS, beyond_end)
    assert (np.asarray(episode) == 0).all()
    start = np.asarray(start)
    probs = exact_start_distribution(5, seq_length, beyond_end)
    assert set(np.unique(start)) <= set(probs)
    for s, p in probs.items():
        assert five_sigma(np.sum(start == s), n, p), (s, np.sum(start == s) / n, p)
    if not beyond_end:
        assert (start + seq_length <= 5).all()  # never past the last step


def test_segments_may_end_on_the_final_frame_when_asked():
    """include_final_frame: starts as the official rule over the 6 frames of a 5-step episode, so that the
    final frame (5) ends a segment as often as start 3 is drawn, and counts there as real data."""
    rng = np.random.default_rng(13)
    r = ReplayDataset(1, SHAPE)
    r.append(0, *random_steps(rng, 5, "end"))
    device = r.device_replay()
    n, seq_length = 20_000, 3
    _, start = jax.jit(draw_segments, static_argnums=(2, 3, 4, 5, 6))(
        device, jax.random.key(0), n, seq_length, WEIGHTS, False, True)
    start = np.asarray(start)
    probs = exact_start_distribution(5, seq_length, False, final_frame=True)
    assert max(probs) == 3
    assert set(np.unique(start)) <= set(probs)
    for s, p in probs.items():
        assert five_sigma(np.sum(start == s), n, p), (s, np.sum(start == s) / n, p)
    m = 2_000
    batch = jax.jit(sample_segments, static_argnums=(2, 3, 4, 5, 6))(
        device, jax.random.key(1), m, seq_length, WEIGHTS, False, True)
    final = r.episode(0)["obs"][5] / 255 * 2 - 1  # random frames: only the final frame equals it
    ends_on_final = np.abs(np.asarray(batch.obs[:, -1]) - final).max(axis=(1, 2, 3)) < 1e-6
    assert five_sigma(ends_on_final.sum(), m, probs[3])
    assert np.asarray(batch.mask_padding)[ends_on_final, -1].all()
    with pytest.raises(ValueError, match="include_final_frame"):
        sample_segments(device, jax.random.key(0), 2, seq_length, WEIGHTS, True, True)


def draw_episodes(replay, n, weights=WEIGHTS):
    episode, _ = jax.jit(draw_segments, static_argnums=(2, 3, 4, 5))(
        replay.device_replay(), jax.random.key(1), n, 2, weights, False)
    return np.asarray(episode)


def test_episode_choice_by_age_groups():
    """10 episodes: groups of 2, 2, 2 and 4 (the last takes the remainder); each group's weight is spread
    evenly over its episodes whatever their lengths."""
    rng = np.random.default_rng(4)
    r = ReplayDataset(1, SHAPE)
    for i in range(10):
        r.append(0, *random_steps(rng, 1 + 3 * i % 7, "end"))
    n = 40_000
    episode = draw_episodes(r, n)
    groups = [range(0, 2), range(2, 4), range(4, 6), range(6, 10)]
    for w, g in zip(WEIGHTS, groups):
        assert five_sigma(np.isin(episode, list(g)).sum(), n, w)
        for e in g:
            assert five_sigma(np.sum(episode == e), n, w / len(g)), e


def test_episodes_of_zero_weight_are_never_drawn():
    rng = np.random.default_rng(14)
    r = ReplayDataset(1, SHAPE)
    for i in range(9):
        r.append(0, *random_steps(rng, 2 + i, "end"))
    episode = draw_episodes(r, 20_000, weights=(0.0, 0.5, 0.0, 0.5))  # groups: 0-1, 2-3, 4-5, 6-8
    assert set(np.unique(episode)) == {2, 3, 6, 7, 8}


def test_episode_choice_by_length_with_fewer_episodes_than_weights():
    rng = np.random.default_rng(5)
    r = ReplayDataset(1, SHAPE)
    for length in (1, 3, 6):
        r.append(0, *random_steps(rng, length, "end"))
    n = 40_000
    episode = draw_episodes(r, n)
    for e, p in enumerate((0.1, 0.3, 0.6)):
        assert five_sigma(np.sum(episode == e), n, p)
    assert episode.max() < 3


def test_sampling_does_not_recompile_as_the_dataset_grows(monkeypatch):
    rng = np.random.default_rng(6)
    for name in ("_write_slots", "_write_table"):  # the device writes compile once too
        monkeypatch.setattr(replay_lib, name, chex.assert_max_traces(getattr(replay_lib, name), n=1))
    r = ReplayDataset(2, SHAPE)
    # One trace per padding mode, none for growth within the capacities.
    sample = jax.jit(chex.assert_max_traces(n=2)(sample_segments), static_argnums=(2, 3, 4, 5))
    for i in range(12):  # crosses the 4-episode switch of the weighting rule, and several chunks
        append_continuing(r, i % 2, rng, 1 + 37 * i % 300, "end" if i % 3 else None)
        batch = sample(r.device_replay(), jax.random.key(i), 8, 5, WEIGHTS, i % 2 == 0)
        assert batch.obs.shape == (8, 5) + SHAPE


def test_device_mirror_grows_by_doubling_and_keeps_its_contents():
    rng = np.random.default_rng(7)
    r = ReplayDataset(1, SHAPE, initial_capacity=1024, initial_episode_capacity=256)
    r.append(0, *random_steps(rng, 10, "end"))
    assert r.device_replay().frames.shape[1] == 2048  # room for one more write chunk past the end
    for _ in range(300):
        r.append(0, *random_steps(rng, 4, "end"))
    device = r.device_replay()
    assert device.frames.shape[1] == 4096 and device.ep_length.shape[0] == 1024
    assert int(device.num_episodes) == 301
    np.testing.assert_array_equal(np.asarray(device.ep_length[:301]), r.lengths)
    for e in (0, 150, 300):
        s, ep = int(r._ep_start[e]), r.episode(e)
        np.testing.assert_array_equal(np.asarray(device.frames[0, s:s + len(ep["obs"])]), ep["obs"])
        np.testing.assert_array_equal(np.asarray(device.act[0, s:s + len(ep["act"])]), ep["act"])


def assert_same_dataset(a, b):
    assert a.summary() == b.summary()
    assert a._open == b._open
    np.testing.assert_array_equal(a.counts_rew, b.counts_rew)
    np.testing.assert_array_equal(a.counts_end, b.counts_end)
    for name in ("_ep_lane", "_ep_start", "_ep_length", "_ep_finished"):
        np.testing.assert_array_equal(getattr(a, name)[:a.num_episodes], getattr(b, name)[:b.num_episodes])
    for la, lb in zip(a._lanes, b._lanes):
        np.testing.assert_array_equal(la.read_frames(0, la.size), lb.read_frames(0, lb.size))
        for x, y in zip(la.read_steps(0, la.size), lb.read_steps(0, lb.size)):
            np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.device_get(a.device_replay()), jax.device_get(b.device_replay())):
        assert x.shape == y.shape
        np.testing.assert_array_equal(x, y)
    sample = functools.partial(jax.jit(sample_segments, static_argnums=(2, 3, 4, 5)), key=jax.random.key(3),
                               batch_size=16, seq_length=5, sample_weights=WEIGHTS, can_sample_beyond_end=True)
    for x, y in zip(sample(a.device_replay()), sample(b.device_replay())):
        np.testing.assert_array_equal(x, y)


def test_save_and_load_round_trip_bit_exactly(tmp_path):
    rng = np.random.default_rng(8)
    r = hand_built(rng)
    r.save(tmp_path)
    assert_same_dataset(r, ReplayDataset.load(tmp_path))
    # Incremental: a second save writes only the new frames, as new chunk files.
    before = set(os.listdir(tmp_path / "frames"))
    append_continuing(r, 1, rng, 3, "end")
    append_continuing(r, 0, rng, 2)
    r.save(tmp_path)
    after = set(os.listdir(tmp_path / "frames"))
    assert before < after and len(after - before) == 2
    new_frames = sum(len(np.load(tmp_path / "frames" / f)) for f in after - before)
    assert new_frames == 3 + 2  # continuing episodes: their current frame was saved already
    loaded = ReplayDataset.load(tmp_path)
    assert_same_dataset(r, loaded)
    # The loaded copy goes on as the original.
    for x in (r, loaded):
        append_continuing(x, 0, np.random.default_rng(9), 4, "trunc")
    assert_same_dataset(r, loaded)


@pytest.mark.parametrize("crash_in", ["frames", "index"])
def test_an_interrupted_save_keeps_the_previous_state_loadable(tmp_path, monkeypatch, crash_in):
    rng = np.random.default_rng(10)
    r = hand_built(rng)
    r.save(tmp_path)
    saved = ReplayDataset.load(tmp_path)
    files = set(os.listdir(tmp_path / "frames"))
    append_continuing(r, 0, rng, 3, "end")
    append_continuing(r, 1, rng, 2)

    real_write_array = files_lib.write_array_atomic

    def crash_after_one_chunk(path, array):
        real_write_array(path, array)  # one chunk file written in full, a partial one next to it...
        with open(path + ".tmp", "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed while saving")  # ...then the process dies

    def crash_before_renaming_the_index(path, arrays):
        with open(path + ".tmp", "wb") as f:  # the new index complete, but not yet renamed into place
            np.savez(f, **arrays)
        raise KeyboardInterrupt("killed while saving")

    if crash_in == "frames":
        monkeypatch.setattr(files_lib, "write_array_atomic", crash_after_one_chunk)
    else:
        monkeypatch.setattr(files_lib, "write_index_atomic", crash_before_renaming_the_index)
    with pytest.raises(KeyboardInterrupt):
        r.save(tmp_path)
    monkeypatch.undo()
    loaded = ReplayDataset.load(tmp_path)
    assert_same_dataset(saved, loaded)
    assert set(os.listdir(tmp_path / "frames")) == files  # stray chunk and partial files cleaned
    assert not (tmp_path / "index.npz.tmp").exists()
    r.save(tmp_path)  # and the next save works
    assert_same_dataset(r, ReplayDataset.load(tmp_path))


def test_load_up_to_an_earlier_summary(tmp_path):
    rng = np.random.default_rng(11)
    r = hand_built(rng)
    summary = r.summary()
    r.save(tmp_path / "then")
    then = ReplayDataset.load(tmp_path / "then")
    later_rng = np.random.default_rng(12)
    append_continuing(r, 0, later_rng, 3, "end")  # ends the episode in progress in lane 0
    append_continuing(r, 1, later_rng, 2)  # extends lane 1's
    append_continuing(r, 0, later_rng, 4)
    r.save(tmp_path / "now")
    append_continuing(r, 1, later_rng, 1, "end")
    r.save(tmp_path / "now")
    cut = ReplayDataset.load(tmp_path / "now", up_to=summary)
    assert_same_dataset(then, cut)
    # The cut dataset goes on exactly as the original did, and saves and loads consistently.
    replay_rng = np.random.default_rng(12)
    append_continuing(cut, 0, replay_rng, 3, "end")
    append_continuing(cut, 1, replay_rng, 2)
    append_continuing(cut, 0, replay_rng, 4)
    append_continuing(cut, 1, replay_rng, 1, "end")
    assert_same_dataset(r, cut)
    cut.save(tmp_path / "now")
    assert_same_dataset(r, ReplayDataset.load(tmp_path / "now"))
    with pytest.raises(ValueError, match="earlier state"):
        ReplayDataset.load(tmp_path / "then", up_to=r.summary())


def test_memory_for_100k_steps_is_at_most_2_gb():
    config = atari100k.get_config()
    size = config.env.size
    # Exact for a small dataset: the formula is the one the arrays follow.
    rng = np.random.default_rng(13)
    r = ReplayDataset(2, SHAPE)
    for i in range(40):
        append_continuing(r, i % 2, rng, 1 + 53 * i % 200, "end" if i % 4 else None)
    expected = replay_lib.memory_nbytes(r.lane_sizes, r.num_episodes, SHAPE, r.initial_capacity,
                                        r.initial_episode_capacity)
    assert expected["host"] == r.host_nbytes()
    assert expected["device"] == sum(x.nbytes for x in jax.tree.leaves(r.device_replay()))
    # 100k steps in 5,000 episodes (Breakout with a random policy ends a life in about 25 steps).
    paper = ReplayDataset.from_config(config)
    steps, episodes = config.collection.train.num_steps_total, 5_000
    nbytes = replay_lib.memory_nbytes([steps + episodes], episodes, (size, size, 3), paper.initial_capacity,
                                      paper.initial_episode_capacity)
    assert nbytes["host"] <= 2 * 2**30 and nbytes["device"] <= 2 * 2**30, nbytes


def test_device_mirror_replicated_over_a_mesh():
    """The training loop keeps the mirror replicated over its data-parallel mesh; samples do not change."""
    mesh = parallel.make_mesh()
    assert mesh.size == 2
    plain, replicated = (hand_built(np.random.default_rng(15), sharding=s)
                         for s in (None, parallel.replicated(mesh)))
    device = replicated.device_replay()
    assert all(x.sharding.is_equivalent_to(parallel.replicated(mesh), x.ndim) for x in jax.tree.leaves(device))
    append_continuing(replicated, 0, np.random.default_rng(16), 3)  # an in-place update keeps the placement
    append_continuing(plain, 0, np.random.default_rng(16), 3)
    device = replicated.device_replay()
    assert all(x.sharding.is_equivalent_to(parallel.replicated(mesh), x.ndim) for x in jax.tree.leaves(device))
    sample = jax.jit(sample_segments, static_argnums=(2, 3, 4, 5), out_shardings=parallel.data_sharded(mesh))
    for x, y in zip(sample(device, jax.random.key(0), 8, 5, WEIGHTS, True),
                    sample(plain.device_replay(), jax.random.key(0), 8, 5, WEIGHTS, True)):
        np.testing.assert_array_equal(x, y)


def two_saves(directory):
    """Save 1: lane 0 episode 0 (3 steps, ended), lane 1 episode 1 (2 steps, in progress): chunks 0 (lane 0,
    slots 0-3) and 1 (lane 1, slots 0-2). Save 2: episode 1 goes on 2 steps and ends, lane 0 episode 2
    (3 steps, in progress), lane 1 episode 3 (2 steps, cut): chunks 2 (lane 0, slots 4-7) and 3 (lane 1,
    slots 3-7). Returns the dataset and each append's arguments, in order."""
    rng = np.random.default_rng(20)
    r = ReplayDataset(2, SHAPE)
    appends = [(0, random_steps(rng, 3, "end")), (1, random_steps(rng, 2))]
    for lane, steps in appends:
        r.append(lane, *steps)
    r.save(directory)
    continued = random_steps(rng, 2, "end")
    continued[0][0] = appends[1][1][5]  # continues from episode 1's current frame
    later = [(1, continued), (0, random_steps(rng, 3)), (1, random_steps(rng, 2, "trunc"))]
    for lane, steps in later:
        r.append(lane, *steps)
    r.save(directory)
    return r, appends + later


def damage(path, how):
    if how == "missing":
        os.remove(path)
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    else:  # garbled: the last frame bytes change, the .npy stays readable
        data = bytearray(path.read_bytes())
        data[-5:] = bytes(255 - b for b in data[-5:])
        path.write_bytes(bytes(data))


def built_by_hand(episodes):
    """A dataset made by appends alone: (lane, obs, act, rew, end, trunc, last_obs) per episode, in id order."""
    r = ReplayDataset(2, SHAPE)
    for lane, *steps in episodes:
        r.append(lane, *steps)
    return r


@pytest.mark.parametrize("how", ["missing", "truncated", "garbled"])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_a_damaged_chunk_is_named_and_the_longest_consistent_prefix_is_kept(tmp_path, caplog, how, chunk):
    r, appends = two_saves(tmp_path)
    summary = r.summary()
    ep = [r.episode(i) for i in range(r.num_episodes)]
    damage(tmp_path / "frames" / f"{chunk:08d}.npy", how)
    loaded = ReplayDataset.load(tmp_path, up_to=summary)
    path = str(tmp_path / "frames" / f"{chunk:08d}.npy")
    assert path in caplog.text and how in caplog.text.replace("CRC-32 differs", "garbled")

    def whole(e, lane):
        return (lane, ep[e]["obs"][:-1], ep[e]["act"], ep[e]["rew"], ep[e]["end"], ep[e]["trunc"], ep[e]["obs"][-1])

    if chunk == 1:  # lane 1 from slot 0: episode 1 and every later one are lost
        expected, lost = built_by_hand([whole(0, 0)]), 4 + 3 + 2
    elif chunk == 2:  # lane 0 from slot 4: episode 2 is lost, and episode 3, which started after it
        expected, lost = built_by_hand([whole(0, 0), whole(1, 1)]), 3 + 2
    else:  # lane 1 from slot 3: episode 1 keeps its first 2 steps and is cut there; episode 3 is lost
        trunc = np.array([False, True])
        cut = (1, ep[1]["obs"][:2], ep[1]["act"][:2], ep[1]["rew"][:2], ep[1]["end"][:2], trunc, ep[1]["obs"][2])
        expected, lost = built_by_hand([whole(0, 0), cut, whole(2, 0)]), 2 + 2  # episode 2 stays in progress
    assert loaded.num_lost_steps == lost and loaded.num_steps == 12 - lost  # 3 + 4 + 3 + 2 steps saved
    expected.num_lost_steps = lost
    assert_same_dataset(expected, loaded)
    # Collection goes on: a new episode in a cut lane, the episode in progress elsewhere continued.
    for x in (expected, loaded):
        append_continuing(x, 1, np.random.default_rng(21), 2, "end")
        append_continuing(x, 0, np.random.default_rng(22), 1)
    assert_same_dataset(expected, loaded)
    # The loss is recorded for good: a save and a load later, the dataset still says so.
    loaded.save(tmp_path)
    again = ReplayDataset.load(tmp_path)
    assert again.num_lost_steps == lost and again.summary()["num_lost_steps"] == lost
    assert_same_dataset(expected, again)


@pytest.mark.parametrize("how", ["truncated", "garbled", "missing"])
def test_a_damaged_index_is_named_with_the_fix(tmp_path, how):
    two_saves(tmp_path)
    index = tmp_path / "index.npz"
    if how == "missing":
        os.remove(index)
        with pytest.raises(FileNotFoundError, match="missing index.npz"):
            ReplayDataset.load(tmp_path)
        return
    data = bytearray(index.read_bytes())
    if how == "truncated":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 3:len(data) // 3 + 64] = bytes(64)
    index.write_bytes(bytes(data))
    with pytest.raises(files_lib.ReplayDamaged, match=f"{index} is damaged.*Fix: restore") as error:
        ReplayDataset.load(tmp_path)
    assert "pickle" not in str(error.value)


def write_version_1(directory, rng):
    """A replay directory as the first release laid it out (format version 1: chunk rows (lane, start slot,
    frames, file id), no CRC-32, no count of lost steps), written with numpy alone. Lane 0: episode 0, 2 steps,
    ended. Lane 1: episode 1, 3 steps so far, in progress, its frames saved in two chunks. Returns the
    episodes as (lane, obs, act, rew, end, trunc, last_obs)."""
    frames = [rng.integers(0, 256, (3,) + SHAPE, dtype=np.uint8), rng.integers(0, 256, (4,) + SHAPE, dtype=np.uint8)]
    act = [np.array([1, 3, 0], np.int32), np.array([2, 0, 1, 0], np.int32)]  # slot L of an episode: no step data
    rew = [np.array([0.0, 5.0, 0.0], np.float32), np.array([-1.0, 0.0, 1.0, 0.0], np.float32)]
    end = [np.array([False, True, False]), np.zeros(4, bool)]
    trunc = [np.zeros(3, bool), np.zeros(4, bool)]
    os.makedirs(directory / "frames")
    for file_id, chunk in enumerate([frames[0], frames[1][:2], frames[1][2:]]):
        np.save(directory / "frames" / f"{file_id:08d}.npy", chunk)
    meta = {"version": 1, "num_lanes": 2, "frame_shape": list(SHAPE), "initial_capacity": 4 * 1024,
            "initial_episode_capacity": 4 * 256}
    index = {"meta": np.array(json.dumps(meta)), "chunks": np.array([[0, 0, 3, 0], [1, 0, 2, 1], [1, 2, 2, 2]]),
             "lane_sizes": np.array([3, 4]), "ep_lane": np.array([0, 1], np.int32),
             "ep_start": np.array([0, 0], np.int32), "ep_length": np.array([2, 3], np.int32),
             "ep_finished": np.array([True, False])}
    for i in range(2):
        index.update({f"act_{i}": act[i], f"rew_{i}": rew[i], f"end_{i}": end[i], f"trunc_{i}": trunc[i]})
    np.savez(directory / "index.npz", **index)
    return [(i, frames[i][:-1], act[i][:-1], rew[i][:-1], end[i][:-1], trunc[i][:-1], frames[i][-1]) for i in range(2)]


def test_a_version_1_directory_loads_and_resumes(tmp_path, caplog):
    """Runs made with the first release resume: its directories load (unchecked, said in the log), also up to
    a checkpoint's version-1 summary, and the next save upgrades them, CRC-32s of the old chunks included."""
    caplog.set_level(logging.INFO)
    episodes = write_version_1(tmp_path, np.random.default_rng(30))
    loaded = ReplayDataset.load(tmp_path)
    assert "format version 1, written without checksums" in caplog.text
    assert loaded.num_episodes == 2 and loaded.num_steps == 5 and loaded.num_lost_steps == 0
    for e, (_, obs, act, rew, end, trunc, last) in enumerate(episodes):
        ep = loaded.episode(e)
        np.testing.assert_array_equal(ep["obs"], np.concatenate([obs, last[None]]))
        for name, value in (("act", act), ("rew", rew), ("end", end), ("trunc", trunc)):
            np.testing.assert_array_equal(ep[name], value)
    assert_same_dataset(built_by_hand(episodes), loaded)

    # The checkpoint of the run may hold an older summary: lane 1 one step shorter, its episode in progress.
    v1_summary = {"version": 1, "num_episodes": 2, "lane_sizes": [3, 3], "num_steps": 4}
    lane, obs, act, rew, end, trunc, _ = episodes[1]
    shorter = [episodes[0], (lane, obs[:2], act[:2], rew[:2], end[:2], trunc[:2], obs[2])]
    cut = ReplayDataset.load(tmp_path, up_to=v1_summary)
    assert_same_dataset(built_by_hand(shorter), cut)

    # Collection goes on and saves in the current format, which records the old chunks' CRC-32s.
    expected = built_by_hand(shorter)
    for x in (expected, cut):
        append_continuing(x, 1, np.random.default_rng(31), 2, "end")
    cut.save(tmp_path)
    assert json.loads(str(np.load(tmp_path / "index.npz")["meta"]))["version"] == files_lib.FORMAT_VERSION
    assert_same_dataset(expected, ReplayDataset.load(tmp_path))
    # A crash before the next checkpoint resumes from the version-1 summary in the upgraded directory.
    assert_same_dataset(built_by_hand(shorter), ReplayDataset.load(tmp_path, up_to=v1_summary))
    damage(tmp_path / "frames" / "00000000.npy", "garbled")
    caplog.clear()
    assert ReplayDataset.load(tmp_path).num_lost_steps == 2 + 4  # lane 0's episode, then every later one
    assert "00000000.npy" in caplog.text and "CRC-32 differs" in caplog.text
