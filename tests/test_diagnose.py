"""The diagnose tool: real transitions with their context as training pads it, the per-group summary against
hand computations, and a whole call on a saved run that leaves its replay dataset untouched."""

import json
import os

import numpy as np
import pytest

from diamond_jax import diagnose
from diamond_jax.data.files import FRAMES_DIR
from diamond_jax.data.replay import ReplayDataset
from diamond_jax.training.agent_checkpoint import save_agent

SIZE, N = 16, 4  # the debug config's frames and conditioning frames
# Two episodes: 3 steps (a reward +1 at step 1, ended) and 2 steps (a reward -1 at step 0, still going).
EPISODES = [dict(rew=[0.0, 1.0, 0.0], end=[False, False, True]), dict(rew=[-1.0, 0.0], end=[False, False])]


def frame(episode, t):
    """A frame that names its episode and step: every pixel 10 * (episode + 1) + t."""
    return np.full((SIZE, SIZE, 3), 10 * (episode + 1) + t, np.uint8)


def make_replay():
    replay = ReplayDataset(2, (SIZE, SIZE, 3))
    for e, spec in enumerate(EPISODES):
        length = len(spec["rew"])
        obs = np.stack([frame(e, t) for t in range(length)])
        act = np.arange(length, dtype=np.int32) + e  # act = step + episode, within the 4 debug actions
        replay.append(e, obs, act, np.array(spec["rew"], np.float32), np.array(spec["end"]),
                      np.zeros(length, bool), frame(e, length))
    return replay


def test_transitions_have_the_padded_context_of_training():
    t = diagnose.transitions(make_replay(), N)
    assert len(t.act) == 5
    # Episode 0, step 1: frames of steps -2, -1 (padding), 0 and 1; the frame reached is step 2's.
    i = 1
    assert t.real[i].tolist() == [False, False, True, True]
    assert [int(f[0, 0, 0]) for f in t.obs[i]] == [0, 0, 10, 11]
    assert t.act[i].tolist() == [0, 0, 0, 1]
    assert int(t.next_obs[i][0, 0, 0]) == 12 and t.rew[i] == 1.0 and not t.end[i]
    # The last step of episode 0 ended it: its next frame is the real final frame.
    assert int(t.next_obs[2][0, 0, 0]) == 13 and t.end[2]
    # Episode 1, step 1.
    assert [int(f[0, 0, 0]) for f in t.obs[4]] == [0, 0, 20, 21] and t.act[4].tolist() == [0, 0, 1, 2]
    assert t.rew.tolist() == [0.0, 1.0, 0.0, -1.0, 0.0] and t.end.tolist() == [False, False, True, False, False]


def test_summary_by_hand():
    t = diagnose.transitions(make_replay(), N)
    imagined = t.next_obs.copy()
    imagined[1, 0, 0, 0] += 40  # off by 40 > 32 levels: not right
    imagined[3] = imagined[3] + 20  # every pixel off by 20: right, PSNR 20 log10(255 / 20)
    p_rew = np.zeros((2, 5, 3))
    p_rew[0, :, :] = [0.1, 0.2, 0.7]  # after real frames
    p_rew[1, :, :] = [0.3, 0.6, 0.1]  # after imagined ones
    p_end = np.zeros((2, 5, 2))
    p_end[0] = [0.9, 0.1]
    p_end[1] = [0.4, 0.6]
    table = diagnose.summarise(t, imagined, p_rew, p_end, tolerance=32)
    plus = table["reward +1"]  # transition 1 alone
    assert plus["transitions"] == 1 and plus["frames_right"] == 0.0
    mse = 40 ** 2 / (SIZE * SIZE * 3)
    assert plus["psnr_db"] == pytest.approx(10 * np.log10(255 ** 2 / mse))
    assert plus["p_true_reward_real"] == pytest.approx(0.7) and plus["p_true_reward_imagined"] == pytest.approx(0.1)
    minus = table["reward -1"]  # transition 3
    assert minus["frames_right"] == 1.0 and minus["psnr_db"] == pytest.approx(20 * np.log10(255 / 20))
    assert minus["p_true_reward_real"] == pytest.approx(0.1) and minus["p_true_reward_imagined"] == pytest.approx(0.3)
    zero = table["reward 0"]  # transitions 0, 2, 4: imagined exactly
    assert zero["transitions"] == 3 and zero["frames_right"] == 1.0 and zero["frames_identical"] == 1.0
    assert zero["psnr_db"] is None
    assert zero["p_true_reward_imagined"] == pytest.approx(0.6)
    # End's probabilities of the true class: 0.1 / 0.6 at the end (transition 2), 0.9 / 0.4 elsewhere.
    assert table["end"]["p_true_end_real"] == pytest.approx(0.1)
    assert table["end"]["p_true_end_imagined"] == pytest.approx(0.6)
    assert zero["p_true_end_real"] == pytest.approx((0.9 + 0.1 + 0.9) / 3)


def test_choose_takes_at_most_per_group():
    t = diagnose.transitions(make_replay(), N)
    for seed in range(5):
        chosen = diagnose.choose(t, 1, np.random.default_rng(seed)).tolist()
        # +1 is transition 1, -1 is 3, the end is 2, and one of the reward-0 transitions 0, 2, 4 (2 again or not).
        assert chosen == sorted(set(chosen)) and {1, 2, 3} <= set(chosen) and len(chosen) in (3, 4)
    assert diagnose.choose(t, 10, np.random.default_rng(0)).tolist() == [0, 1, 2, 3, 4]


def test_a_run_diagnosed(tmp_path, debug_config, debug_agent, capsys):
    workdir = tmp_path / "run"
    save_agent(workdir / "agent", debug_config, debug_agent[1], step=5)
    make_replay().save(str(workdir / "replay"))
    # A chunk left by a save still under way in the live run: a read-only load must not delete it.
    leftover = workdir / "replay" / FRAMES_DIR / "99999999.npy"
    leftover.write_bytes(b"being written")
    before = sorted(os.listdir(workdir / "replay" / FRAMES_DIR))
    result = diagnose.main([f"--workdir={workdir}", "--out", str(tmp_path / "out")])
    assert sorted(os.listdir(workdir / "replay" / FRAMES_DIR)) == before
    saved = json.loads((tmp_path / "out" / "diagnose.json").read_text())
    assert saved["agent_epoch"] == 5 and saved["replay_transitions"] == 5
    assert {name: g["transitions"] for name, g in saved["groups"].items()} == {
        "reward +1": 1, "reward -1": 1, "reward 0": 3, "end": 1}
    for g in saved["groups"].values():
        for key in ("p_true_reward_real", "p_true_reward_imagined", "p_true_end_real", "p_true_end_imagined"):
            assert 0.0 <= g[key] <= 1.0
    import imageio.v3 as iio
    picture = iio.imread(result["paths"]["examples"])
    # Rows: 1 + 1 + 3 + 1 transitions, each a 6 x 16 + 2 pixel tall panel, 4 pixels apart.
    panel = 6 * SIZE + 2
    assert picture.shape == (6 * panel + 5 * 4, (N + 2) * panel + (N - 1) * 1 + 2 * 8, 3)
    assert "reward +1" in capsys.readouterr().out


def test_bad_workdir(tmp_path, debug_config, debug_agent):
    save_agent(tmp_path / "agent", debug_config, debug_agent[1], step=0)
    with pytest.raises(SystemExit, match="holds replay/ and agent/"):
        diagnose.main([f"--workdir={tmp_path}"])
