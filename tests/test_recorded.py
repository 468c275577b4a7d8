"""Datasets of recorded play: the writer's round trip, split and atomicity, window sampling against plain
numpy slicing of what was written, every bad input, the three importers, Atari recorded at 210x160, the CLI."""

import json
import os
import subprocess
import sys

import envpool
import imageio.v3 as iio
import numpy as np
import pytest

from configs import atari100k
from diamond_jax.data import importers
from diamond_jax.data.recorded import ActionSpec, DatasetError, DatasetWriter, RecordedDataset
from diamond_jax.data.replay import ReplayDataset
from diamond_jax.envs import record as record_mod
from diamond_jax.envs.record import record

H, W = 6, 5
PONG_ACTIONS = ("NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE")  # ALE's minimal set for Pong


def frames(episode, length, h=H, w=W):
    """Frames that name their episode and step: channel 0 is the episode, channel 1 the step, channel 2 noise."""
    out = np.zeros((length, h, w, 3), np.uint8)
    out[..., 0] = episode
    out[..., 1] = np.arange(length)[:, None, None]
    out[..., 2] = np.random.default_rng(episode).integers(0, 256, (length, h, w))
    return out


def hand_episode(e, length, kind, size=3):
    """(obs, act, rew, end) of episode e, each value a hand-chosen function of (e, t)."""
    t = np.arange(length)
    act = {"discrete": (t + e) % size,
           "multi_hot": ((t[:, None] + e + np.arange(size)) % 2).astype(np.float32),
           "continuous": (t[:, None] * 0.5 - e + np.arange(size) * 0.25).astype(np.float32)}[kind]
    return frames(e, length), act, (t * 10 + e).astype(np.float32), t == length - 1


def write(path, lengths, kind="discrete", size=3, rewards=True, **kw):
    with DatasetWriter(str(path), ActionSpec(kind, size), **kw) as writer:
        for e, length in enumerate(lengths):
            obs, act, rew, end = hand_episode(e, length, kind, size)
            writer.add_episode(obs, act, rew if rewards else None, end if rewards else None, name=f"ep{e}")
        return writer.commit()


# ---- The writer and the dataset.


@pytest.mark.parametrize("kind", ["discrete", "multi_hot", "continuous"])
def test_round_trip_is_bit_exact(tmp_path, kind):
    write(tmp_path / "ds", [4, 7, 5], kind, fps=15.0, source="by hand")
    ds = RecordedDataset.open(str(tmp_path / "ds"))
    assert ds.frame_shape == (H, W) and ds.action == ActionSpec(kind, 3) and ds.fps == 15.0
    assert ds.has_rew and ds.has_end and ds.source == "by hand"
    for e, length in enumerate([4, 7, 5]):
        obs, act, rew, end = hand_episode(e, length, kind)
        got = ds.episode(e)
        assert ds.episode_name(e) == f"ep{e}"
        assert isinstance(got.obs, np.memmap) and got.obs.dtype == np.uint8 and np.array_equal(got.obs, obs)
        assert got.act.dtype == (np.int32 if kind == "discrete" else np.float32) and np.array_equal(got.act, act)
        assert got.rew.dtype == np.float32 and np.array_equal(got.rew, rew) and np.array_equal(got.end, end)


def test_action_spec_json_round_trip_and_checks():
    spec = ActionSpec("multi_hot", 2, ("a", "b"))
    assert ActionSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(DatasetError, match="kind 'joystick' is not one of discrete, multi_hot, continuous"):
        ActionSpec("joystick", 2)
    with pytest.raises(DatasetError, match="1 action names"):
        ActionSpec("discrete", 2, ("NOOP",))


def test_split_is_by_episode_disjoint_complete_and_seeded(tmp_path):
    ds = write(tmp_path / "a", [3] * 10, test_fraction=0.3, seed=1)
    train, test = ds.episode_ids("train"), ds.episode_ids("test")
    assert len(test) == 3 and sorted(train + test) == list(range(10)) and not set(train) & set(test)
    assert ds.num_frames("train") == 21 and ds.lengths("test").tolist() == [3, 3, 3]
    assert write(tmp_path / "b", [3] * 10, test_fraction=0.3, seed=1).episode_ids("test") == test
    others = {tuple(write(tmp_path / f"s{s}", [3] * 10, test_fraction=0.3, seed=s).episode_ids("test"))
              for s in range(2, 6)}
    assert others - {tuple(test)}, "the seed does not change the split"
    assert len(write(tmp_path / "two", [3, 3], test_fraction=0.1).episode_ids("test")) == 1  # at least one
    assert write(tmp_path / "one", [3], test_fraction=0.5).episode_ids("train") == [0]
    assert write(tmp_path / "none", [3, 3], test_fraction=0.0).episode_ids("test") == []


def test_windows_lie_inside_episodes_and_hold_what_was_written(tmp_path):
    lengths, seq = [5, 9, 4, 12], 4
    ds = write(tmp_path / "ds", lengths, "multi_hot", test_fraction=0.0)
    batch = ds.sample(np.random.default_rng(0), 200, seq)
    assert batch.obs.shape == (200, seq, H, W, 3) and batch.act.shape == (200, seq, 3)
    assert batch.rew.shape == batch.end.shape == (200, seq)
    for i in range(200):
        e, start = int(batch.obs[i, 0, 0, 0, 0]), int(batch.obs[i, 0, 0, 0, 1])  # written into the frames
        assert start + seq <= lengths[e]
        obs, act, rew, end = hand_episode(e, lengths[e], "multi_hot")
        window = slice(start, start + seq)
        assert np.array_equal(batch.obs[i], obs[window]) and np.array_equal(batch.act[i], act[window])
        assert np.array_equal(batch.rew[i], rew[window]) and np.array_equal(batch.end[i], end[window])
    again = ds.sample(np.random.default_rng(0), 200, seq)
    assert all(np.array_equal(a, b) for a, b in zip(batch, again))


def test_episodes_are_drawn_in_proportion_to_their_windows(tmp_path):
    # With seq 4, the episodes have 1, 3 and 10 windows: every window of the split equally likely.
    ds = write(tmp_path / "ds", [4, 6, 13], test_fraction=0.0)
    n = 20_000
    batch = ds.sample(np.random.default_rng(1), n, 4)
    episode, start = batch.obs[:, 0, 0, 0, 0], batch.obs[:, 0, 0, 0, 1]
    counts = np.bincount(episode, minlength=3) / n
    np.testing.assert_allclose(counts, [1 / 14, 3 / 14, 10 / 14], atol=0.015)  # ~4 standard deviations
    starts = np.bincount(start[episode == 2], minlength=10) / (episode == 2).sum()
    np.testing.assert_allclose(starts, np.full(10, 0.1), atol=0.025)  # uniform start in the longest


def test_without_rewards_and_ends_segments_hold_zeros(tmp_path):
    ds = write(tmp_path / "ds", [5], rewards=False)
    assert not ds.has_rew and not ds.has_end and ds.episode(0).rew is None and ds.episode(0).end is None
    batch = ds.sample(np.random.default_rng(0), 3, 2)
    assert batch.rew.dtype == np.float32 and not batch.rew.any() and batch.end.dtype == bool and not batch.end.any()


def test_a_window_longer_than_every_episode_names_the_lengths(tmp_path):
    ds = write(tmp_path / "ds", [4, 6], test_fraction=0.0)
    with pytest.raises(ValueError, match=r"no train episode has seq_length=7 frames \(their lengths: \[4, 6\]\)"):
        ds.sample(np.random.default_rng(0), 2, 7)


# ---- Atomicity.


def test_an_exception_in_the_with_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="interrupted"):
        with DatasetWriter(str(tmp_path / "ds"), ActionSpec("discrete", 3)) as writer:
            writer.add_episode(*hand_episode(0, 4, "discrete"))
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    with DatasetWriter(str(tmp_path / "ds"), ActionSpec("discrete", 3)) as writer:
        writer.add_episode(*hand_episode(0, 4, "discrete"))  # and no commit
    assert os.listdir(tmp_path) == []


def test_an_existing_dataset_is_refused_or_replaced_only_at_the_rename(tmp_path):
    path = str(tmp_path / "ds")
    write(path, [4, 4])
    with pytest.raises(DatasetError, match="already exists. Fix: pass overwrite=True"):
        DatasetWriter(path, ActionSpec("discrete", 3))
    with pytest.raises(RuntimeError):
        with DatasetWriter(path, ActionSpec("discrete", 3), overwrite=True) as writer:
            writer.add_episode(*hand_episode(5, 9, "discrete"))
            raise RuntimeError("interrupted")
    assert RecordedDataset.open(path).lengths("train").tolist() + RecordedDataset.open(path).lengths("test").tolist() \
        == [4, 4]  # the old dataset, untouched
    write(path, [9], overwrite=True)
    assert RecordedDataset.open(path).lengths("train").tolist() == [9] and os.listdir(tmp_path) == ["ds"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "video.mp4").write_bytes(b"precious")
    with pytest.raises(DatasetError, match="is not a recorded-play dataset: overwrite replaces only a dataset"):
        DatasetWriter(str(tmp_path / "mine"), ActionSpec("discrete", 3), overwrite=True)


# ---- Bad input to the writer, and damaged datasets.


def test_bad_episodes_are_named_with_the_fix(tmp_path):
    obs, act, rew, end = hand_episode(0, 4, "discrete")
    with DatasetWriter(str(tmp_path / "ds"), ActionSpec("discrete", 3)) as w:
        w.add_episode(obs, act, rew, end, name="first")
        with pytest.raises(DatasetError, match="episode 'big' has frames of 8x9, the dataset's are 6x5 "
                                               "\\(set by episode 'first'\\)"):
            w.add_episode(frames(1, 4, 8, 9), act, rew, end, name="big")
        with pytest.raises(DatasetError, match="episode 'x': discrete actions must lie in \\[0, 3\\), got 3 at row 1"):
            w.add_episode(obs, np.array([0, 3, 1, 1]), rew, end, name="x")
        with pytest.raises(DatasetError, match="episode 'x': 4 frames but 3 actions"):
            w.add_episode(obs, act[:3], rew, end, name="x")
        with pytest.raises(DatasetError, match="episode 'x': rew has shape \\(5,\\), expected \\(4,\\)"):
            w.add_episode(obs, act, np.zeros(5), end, name="x")
        with pytest.raises(DatasetError, match="episode 'x' has no rew but the episodes before it have rew"):
            w.add_episode(obs, act, None, end, name="x")
        with pytest.raises(DatasetError, match="episode 'x': frames are float32"):
            w.add_episode(obs.astype(np.float32), act, rew, end, name="x")
    with DatasetWriter(str(tmp_path / "mh"), ActionSpec("multi_hot", 2)) as w:
        with pytest.raises(DatasetError, match=r"episode 'x': multi_hot actions must be 0 or 1, got \[0.0, 0.5\]"):
            w.add_episode(obs, np.array([[0, 1], [0, 0.5], [1, 1], [0, 0]]), name="x")
    with DatasetWriter(str(tmp_path / "c"), ActionSpec("continuous", 2)) as w:
        with pytest.raises(DatasetError, match="episode 'x': continuous actions must be finite, got .*nan.* at row 2"):
            w.add_episode(obs, np.array([[0, 1], [0, 0.5], [np.nan, 1], [0, 0]]), name="x")


def test_opening_names_what_is_wrong(tmp_path):
    with pytest.raises(DatasetError, match="the directory does not exist"):
        RecordedDataset.open(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is not a recorded-play dataset \\(it has no meta.json\\)"):
        RecordedDataset.open(str(tmp_path / "empty"))
    path = tmp_path / "ds"
    write(path, [4, 5])
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(DatasetError, match="format version 99; this code reads \\(1,\\)"):
        RecordedDataset.open(str(path))
    (path / "meta.json").write_text(json.dumps(meta)[:50])
    with pytest.raises(DatasetError, match="meta.json is damaged"):
        RecordedDataset.open(str(path))
    (path / "meta.json").write_text(json.dumps(meta))
    obs_file = path / "episodes" / "000001_obs.npy"
    obs_file.write_bytes(obs_file.read_bytes()[:-7])
    with pytest.raises(DatasetError, match="000001_obs.npy \\(episode 'ep1'\\) has .* bytes.*truncated"):
        RecordedDataset.open(str(path))
    act_file = path / "episodes" / "000000_act.npy"
    garbled = bytearray(act_file.read_bytes())
    garbled[-1] ^= 1
    act_file.write_bytes(bytes(garbled))
    obs_file.unlink()
    with pytest.raises(DatasetError, match="the CRC-32 of .*000000_act.npy differs"):
        RecordedDataset.open(str(path))


# ---- Importers.


def gray_frames(levels, size=16):
    return np.stack([np.full((size, size, 3), v, np.uint8) for v in levels])


def write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows))


def test_videos_with_csv_actions(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    iio.imwrite(src / "a.mp4", gray_frames([20, 80, 140, 200]), fps=10)  # lossy: values compared approximately
    iio.imwrite(src / "b.gif", gray_frames([30, 60, 90]), duration=100, loop=0)  # palette: exact
    write_csv(src / "a.csv", ["action", "rew", "end"], [[0, 0, 0], [2, 1, 0], [1, 0, 0], [0, -1, 1]])
    write_csv(src / "b.csv", ["action", "rew", "end"], [[4, 0, 0], [4, 0, 0], [1, 0.5, 1]])
    ds = importers.import_videos(str(src), str(tmp_path / "ds"), test_fraction=0.0)
    assert ds.action == ActionSpec("discrete", 5) and ds.frame_shape == (16, 16) and ds.fps == 10.0
    a, b = ds.episode(0), ds.episode(1)
    assert a.obs.shape == (4, 16, 16, 3) and np.abs(a.obs[:, 8, 8, 0].astype(int) - [20, 80, 140, 200]).max() <= 4
    assert np.array_equal(b.obs, gray_frames([30, 60, 90]))
    assert a.act.tolist() == [0, 2, 1, 0] and a.rew.tolist() == [0, 1, 0, -1] and a.end.tolist() == [0, 0, 0, 1]
    assert b.act.tolist() == [4, 4, 1] and b.rew.tolist() == [0, 0, 0.5] and b.end.tolist() == [0, 0, 1]


def test_several_discrete_keys_become_one_multi_hot_vector(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    iio.imwrite(src / "a.gif", gray_frames([10, 20, 30]), duration=100, loop=0)
    write_csv(src / "a.csv", ["action_move", "action_fire"], [[2, 0], [0, 1], [1, 1]])
    ds = importers.import_videos(str(src), str(tmp_path / "ds"), action_kind="multi_hot")
    assert ds.action == ActionSpec("multi_hot", 5, ("move=0", "move=1", "move=2", "fire=0", "fire=1"))
    assert ds.episode(0).act.tolist() == [[0, 0, 1, 1, 0], [1, 0, 0, 0, 1], [0, 1, 0, 0, 1]]
    assert not ds.has_rew and not ds.has_end


@pytest.mark.parametrize("header,kind", [(["key_up", "key_fire"], "multi_hot"), (["axis_x", "axis_y"], "continuous")])
def test_key_and_axis_columns(tmp_path, header, kind):
    src = tmp_path / "src"
    src.mkdir()
    iio.imwrite(src / "a.gif", gray_frames([10, 20]), duration=100, loop=0)
    write_csv(src / "a.csv", header, [[1, 0], [0, 1]])
    ds = importers.import_videos(str(src), str(tmp_path / "ds"))
    assert ds.action == ActionSpec(kind, 2, tuple(h.split("_")[1] for h in header))
    assert ds.episode(0).act.tolist() == [[1, 0], [0, 1]]


def test_npy_actions_need_their_kind_when_they_are_vectors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    iio.imwrite(src / "a.gif", gray_frames([10, 20]), duration=100, loop=0)
    np.save(src / "a.npy", np.array([[0.5, -1.0], [0.25, 2.0]], np.float32))
    with pytest.raises(DatasetError, match="a.npy: actions of shape \\(2, 2\\) are vectors. Fix: .*--action_kind"):
        importers.import_videos(str(src), str(tmp_path / "ds"))
    ds = importers.import_videos(str(src), str(tmp_path / "ds"), action_kind="continuous")
    assert ds.action == ActionSpec("continuous", 2) and ds.episode(0).act.tolist() == [[0.5, -1.0], [0.25, 2.0]]


def test_bad_video_folders_are_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(DatasetError, match="holds no video files"):
        importers.import_videos(str(src), str(tmp_path / "ds"))
    iio.imwrite(src / "a.gif", gray_frames([10, 20, 30]), duration=100, loop=0)
    with pytest.raises(DatasetError, match="a.gif has no actions file. Fix: .*a.csv or .*a.npy"):
        importers.import_videos(str(src), str(tmp_path / "ds"))
    write_csv(src / "a.csv", ["action"], [[0], [1]])
    with pytest.raises(DatasetError, match="a.gif has 3 frames but its actions file .*a.csv has 2 rows"):
        importers.import_videos(str(src), str(tmp_path / "ds"))
    write_csv(src / "a.csv", ["axis_x"], [[0.0], ["nan"], [1.0]])
    with pytest.raises(DatasetError, match="episode 'a.gif': continuous actions must be finite, got .*nan.* row 1"):
        importers.import_videos(str(src), str(tmp_path / "ds"))
    with pytest.raises(DatasetError, match="which are continuous actions, but the action kind asked for is discrete"):
        importers.import_videos(str(src), str(tmp_path / "ds"), action_kind="discrete")
    write_csv(src / "a.csv", ["action"], [])
    with pytest.raises(DatasetError, match="a.csv has a header but no rows"):
        importers.import_videos(str(src), str(tmp_path / "ds"))
    write_csv(src / "a.csv", ["action", "reward"], [[0, 0]] * 3)
    with pytest.raises(DatasetError, match="column 'reward' is not read"):
        importers.import_videos(str(src), str(tmp_path / "ds"))
    write_csv(src / "a.csv", ["action"], [[0]] * 3)
    iio.imwrite(src / "b.gif", gray_frames([10, 20, 30], size=24), duration=100, loop=0)
    write_csv(src / "b.csv", ["action"], [[0]] * 3)
    with pytest.raises(DatasetError, match="episode 'b.gif' has frames of 24x24, the dataset's are 16x16 "
                                           "\\(set by episode 'a.gif'\\)"):
        importers.import_videos(str(src), str(tmp_path / "ds"))
    (src / "b.gif").write_bytes(b"not a video at all")
    with pytest.raises(DatasetError, match="cannot read the video .*b.gif"):
        importers.import_videos(str(src), str(tmp_path / "ds"))
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no failed import left anything


def test_npz_episodes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    act0 = np.array([[0.5, 1.0], [-2.0, 0.0], [0.0, 0.25]], np.float32)
    np.savez(src / "e0.npz", obs=frames(0, 3), act=act0, rew=np.array([0.0, 1.0, 0.0]))
    np.savez(src / "e1.npz", obs=frames(1, 2), act=np.array([[1.0, 1.0], [2.0, 3.0]]), rew=np.array([2.0, 0.0]))
    ds = importers.import_npz(str(src), str(tmp_path / "ds"), action_kind="continuous")
    assert ds.action == ActionSpec("continuous", 2) and ds.has_rew and not ds.has_end
    assert np.array_equal(ds.episode(0).obs, frames(0, 3)) and np.array_equal(ds.episode(0).act, act0)
    assert np.array_equal(ds.episode(1).obs, frames(1, 2)) and ds.episode(1).rew.tolist() == [2.0, 0.0]
    np.savez(src / "e2.npz", obs=frames(2, 2), actions=np.zeros(2, np.int32))
    with pytest.raises(DatasetError, match="e2.npz holds the arrays \\['actions', 'obs'\\]: obs and act are "
                                           "required; \\['actions'\\] would not be read"):
        importers.import_npz(str(src), str(tmp_path / "ds2"), action_kind="continuous")


def test_the_replay_of_a_run(tmp_path):
    workdir = tmp_path / "run"
    replay = ReplayDataset(2, (H, W, 3))
    # Episode 0: 3 steps, ended; episode 1: 2 steps, still going. Each has one more frame than steps.
    replay.append(0, frames(0, 3), np.array([1, 5, 2], np.int32), np.array([0, 1, 0], np.float32),
                  np.array([False, False, True]), np.zeros(3, bool), frames(0, 4)[3])
    replay.append(1, frames(1, 2), np.array([3, 0], np.int32), np.array([-1, 0], np.float32), np.zeros(2, bool),
                  np.zeros(2, bool), frames(1, 3)[2])
    replay.save(str(workdir / "replay"))
    (workdir / "config.json").write_text(atari100k.get_config("game=Pong,debug").to_json_best_effort())
    ds = record_mod.import_replay(str(workdir), str(tmp_path / "ds"), test_fraction=0.0)
    assert ds.action == ActionSpec("discrete", 6, PONG_ACTIONS) and ds.fps == 15.0  # 60 frames/s, frame skip 4
    ep0, ep1 = ds.episode(0), ds.episode(1)
    assert np.array_equal(ep0.obs, frames(0, 3)) and ep0.act.tolist() == [1, 5, 2]
    assert ep0.rew.tolist() == [0, 1, 0] and ep0.end.tolist() == [False, False, True]
    assert np.array_equal(ep1.obs, frames(1, 2)) and ep1.act.tolist() == [3, 0] and ep1.rew.tolist() == [-1, 0]
    with pytest.raises(DatasetError, match="has no config.json"):
        record_mod.import_replay(str(tmp_path / "src_missing"), str(tmp_path / "ds2"))


# ---- Recording Atari.


def test_recorded_pong_is_full_resolution_seeded_and_named(tmp_path):
    c = atari100k.get_config("game=Pong")
    ds = record(c, str(tmp_path / "a"), episodes=3, max_steps=6, seed=3)
    assert ds.frame_shape == (210, 160) and ds.fps == 15.0
    assert ds.action == ActionSpec("discrete", 6, PONG_ACTIONS) and ds.has_rew and ds.has_end
    assert ds.num_frames("train") + ds.num_frames("test") == 18
    # The first frame is envpool's own unresized screen for the same seed and settings.
    raw = envpool.make("Pong-v5", env_type="gymnasium", num_envs=1, batch_size=1, seed=3, img_height=210,
                       img_width=160, gray_scale=False, stack_num=1, frame_skip=c.env.frame_skip,
                       noop_max=c.env.noop_max, repeat_action_probability=c.env.repeat_action_probability,
                       use_fire_reset=False, episodic_life=False, reward_clip=False)
    assert np.array_equal(ds.episode(0).obs[0], raw.reset()[0][0].transpose(1, 2, 0))
    acts = np.concatenate([ds.episode(e).act for e in range(3)])
    assert acts.min() >= 0 and acts.max() < 6 and len(set(acts.tolist())) > 1
    again = record(c, str(tmp_path / "b"), episodes=3, max_steps=6, seed=3)
    for e in range(3):
        assert np.array_equal(again.episode(e).obs, ds.episode(e).obs)
        assert np.array_equal(again.episode(e).act, ds.episode(e).act)


# ---- The command line.


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "diamond_jax.dataset", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_info_and_bad_input(tmp_path):
    write(tmp_path / "ds", [4, 6], test_fraction=0.5)
    info = run_cli(f"--info={tmp_path / 'ds'}", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "frames: 6x5 RGB" in info.stdout and "actions: discrete, number of actions 3" in info.stdout
    assert "train: 1 episodes" in info.stdout and "test: 1 episodes" in info.stdout
    bad = run_cli("--import_from=npz", f"--src={tmp_path / 'nothing'}", f"--out={tmp_path / 'out'}", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: --src={tmp_path / 'nothing'} is not a directory. Fix: pass the folder that holds the .npz episodes."]
