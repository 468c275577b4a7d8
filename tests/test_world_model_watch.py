"""The dream and play tools on world models of recorded play: tiny datasets of each action kind, each trained
for two updates of the debug preset (one with the upsampler)."""

import csv

import imageio.v3 as iio
import numpy as np
import pytest

from configs import world_model as wm_configs
from diamond_jax import dream, play
from diamond_jax.data.recorded import ActionSpec, DatasetWriter, RecordedDataset
from diamond_jax.play_env import UsageError, action_keys
from diamond_jax.world_model import watch
from diamond_jax.world_model.train import WorldModelTrainer

# imageio-ffmpeg reads an MP4 through an ffmpeg subprocess, which JAX warns about.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork")

STEPS, ROWS, SCALE = 4, 2, 2
LOW = (16, 16)  # the debug preset's resolution
FULL = (24, 20)  # the frames of the upsampler's dataset, which it draws at their size
N = 2  # the debug preset's num_steps_conditioning
SPECS = {"discrete": ActionSpec("discrete", 3, ("NOOP", "FIRE", "LEFT")),
         "multi_hot": ActionSpec("multi_hot", 3, ("jump", "duck", "run")),
         "continuous": ActionSpec("continuous", 2, ("x", "y"))}


def recorded_actions(kind: str, rng: np.random.Generator, length: int) -> np.ndarray:
    if kind == "discrete":
        return rng.integers(0, 3, length)
    if kind == "multi_hot":
        return rng.integers(0, 2, (length, 3))
    return rng.normal(size=(length, 2))


def make_dataset(path, kind: str, frame_shape=LOW) -> RecordedDataset:
    rng = np.random.default_rng(0)
    with DatasetWriter(str(path), SPECS[kind], test_fraction=0.5) as writer:
        for _ in range(4):
            writer.add_episode(rng.integers(0, 256, (20, *frame_shape, 3), dtype=np.uint8),
                               recorded_actions(kind, rng, 20))
        return writer.commit()


def train(tmp_path_factory, kind: str, frame_shape=LOW, upsampler: bool = False):
    """(workdir, dataset) of a world model trained for two updates."""
    root = tmp_path_factory.mktemp(kind)
    dataset = make_dataset(root / "data", kind, frame_shape)
    config = wm_configs.get_config("upsampler,debug" if upsampler else "debug")
    config.action_kind = kind
    config.training.num_steps = 2
    WorldModelTrainer(config, dataset.path, str(root / "run")).run()
    return root / "run", dataset


@pytest.fixture(scope="module")
def discrete_run(tmp_path_factory):
    return train(tmp_path_factory, "discrete")


@pytest.fixture(scope="module")
def multi_hot_run(tmp_path_factory):
    return train(tmp_path_factory, "multi_hot", FULL, upsampler=True)


@pytest.fixture(scope="module")
def continuous_run(tmp_path_factory):
    return train(tmp_path_factory, "continuous")


@pytest.fixture
def headless(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")


def numpy_psnr(real, drawn):
    mse = ((real.astype(np.float64) - drawn.astype(np.float64)) ** 2).mean(axis=(-3, -2, -1))
    return 10 * np.log10(255.0 ** 2 / mse)


def check_dream(result, dataset, shape):
    """Videos of STEPS + 1 frames of the given size; the real side is the recorded frames after the context, the
    actions are those recorded with them, and psnr.csv holds the PSNR of the written frames."""
    h, w = shape
    imagination = iio.imread(result["paths"]["imagination"], index=None)
    assert imagination.shape == (STEPS + 1, h * SCALE, ROWS * w * SCALE + 2 * (ROWS - 1), 3)
    comparison = iio.imread(result["paths"]["real_vs_imagined"], index=None)
    assert comparison.shape == (STEPS + 1, ROWS * h * SCALE + 2 * (ROWS - 1), 2 * w * SCALE + 2, 3)
    c = result["comparison"]
    assert c.real.shape == c.imagined.shape == (ROWS, STEPS + 1, h, w, 3)
    for row, (episode, start) in enumerate(result["starts"]):
        recorded = dataset.episode(episode)
        # Frames at the size the model draws them are shown as recorded: the last context frame, then the rest.
        np.testing.assert_array_equal(c.real[row], recorded.obs[start + N - 1:start + N + STEPS])
        np.testing.assert_array_equal(c.act[row], recorded.act[start + N - 1:start + N - 1 + STEPS])
    np.testing.assert_array_equal(c.imagined[:, 0], c.real[:, 0])
    with open(result["paths"]["csv"]) as f:
        table = np.array(list(csv.reader(f))[1:], float)
    expected = numpy_psnr(c.real[:, 1:], c.imagined[:, 1:])
    np.testing.assert_array_equal(table[:, 0], np.arange(1, STEPS + 1))
    np.testing.assert_allclose(table[:, 2:].T, expected, atol=1e-4)
    np.testing.assert_allclose(table[:, 1], expected.mean(axis=0), atol=1e-4)


def test_dream_with_the_episodes_actions(discrete_run, tmp_path):
    workdir, dataset = discrete_run
    result = dream.main([f"--workdir={workdir}", f"--steps={STEPS}", f"--rows={ROWS}", f"--scale={SCALE}",
                         f"--out={tmp_path}"])
    check_dream(result, dataset, LOW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagination.mp4", "psnr.csv", "psnr.json", "psnr.png",
                                                          "real_vs_imagined.mp4"]


def test_dream_with_the_upsampler_shows_full_resolution(multi_hot_run, tmp_path):
    workdir, dataset = multi_hot_run
    result = dream.main([f"--workdir={workdir}", f"--steps={STEPS}", f"--rows={ROWS}", f"--scale={SCALE}",
                         f"--out={tmp_path}", f"--dataset={dataset.path}"])
    check_dream(result, dataset, FULL)


def test_dream_with_random_and_file_actions(discrete_run, tmp_path):
    workdir, _ = discrete_run
    result = dream.main([f"--workdir={workdir}", f"--steps={STEPS}", f"--rows={ROWS}", f"--scale={SCALE}",
                         f"--out={tmp_path / 'random'}", "--actions=random", "--seed=3"])
    assert sorted(p.name for p in (tmp_path / "random").iterdir()) == ["imagination.mp4"]
    assert iio.imread(result["paths"]["imagination"], index=None).shape[0] == STEPS + 1
    assert result["act"].shape == (ROWS, STEPS) and set(result["act"].ravel()) <= {0, 1, 2}
    file = tmp_path / "steps.csv"
    file.write_text("action\n2\n0\n1\n1\n")
    result = dream.main([f"--workdir={workdir}", f"--steps={STEPS}", f"--rows={ROWS}", f"--out={tmp_path / 'file'}",
                         f"--actions={file}"])
    np.testing.assert_array_equal(result["act"], [[2, 0, 1, 1]] * ROWS)


def test_random_actions_are_valid_for_each_kind(tmp_path):
    for kind, spec in SPECS.items():
        dataset = make_dataset(tmp_path / kind, kind)
        acts = watch.random_actions(dataset, np.random.default_rng(0), (50, 7))
        again = watch.random_actions(dataset, np.random.default_rng(0), (50, 7))
        np.testing.assert_array_equal(acts, again)  # seeded
        if kind == "discrete":
            assert acts.dtype == np.int32 and acts.shape == (50, 7) and set(acts.ravel()) == {0, 1, 2}
            continue
        assert acts.dtype == np.float32 and acts.shape == (50, 7, spec.size)
        if kind == "multi_hot":
            assert set(acts.ravel()) == {0.0, 1.0}
        else:
            recorded = np.concatenate([dataset.episode(e).act for e in dataset.episode_ids("train")])
            low, high = recorded.min(axis=0), recorded.max(axis=0)
            assert (acts >= low).all() and (acts <= high).all()
            # spread over the recorded range, not a constant
            assert (acts.max(axis=(0, 1)) - acts.min(axis=(0, 1)) > 0.8 * (high - low)).all()


def test_actions_files_that_do_not_fit(tmp_path, discrete_run):
    def write(name, content):
        path = tmp_path / name
        np.save(path, content) if name.endswith(".npy") else path.write_text(content)
        return str(path)

    discrete, multi_hot = SPECS["discrete"], SPECS["multi_hot"]
    np.testing.assert_array_equal(watch.read_actions(write("a.npy", np.array([2, 0])), discrete), [2, 0])
    np.testing.assert_array_equal(watch.read_actions(write("k.csv", "key_jump,key_duck,key_run\n1,0,1\n"),
                                                     multi_hot), [[1, 0, 1]])
    bad = [
        (write("v.npy", np.ones((3, 2), np.float32)), discrete, "holds actions of shape \\(3, 2\\).*plays discrete"),
        (write("k2.csv", "key_jump,key_duck\n1,0\n"), discrete, "holds the components jump, duck.*plays discrete"),
        (write("k3.csv", "key_a,key_b,key_c\n1,0,1\n"), multi_hot, "components a, b, c.*plays multi_hot.*key_<name>"),
        (write("i.csv", "action\n1\n3\n"), discrete, "step 1 .*is 3, not an index in \\[0, 3\\)"),
        (write("h.csv", "key_jump,key_duck,key_run\n1,2,0\n"), multi_hot, "step 0 .*not components of 0 or 1"),
        (write("a.txt", "1\n"), discrete, "neither episode, random nor an actions file"),
    ]
    for path, spec, message in bad:
        with pytest.raises(UsageError, match=message):
            watch.read_actions(path, spec)
    workdir, _ = discrete_run
    with pytest.raises(SystemExit, match=f"has 2 steps but --steps={STEPS}. Fix: --steps=2"):
        dream.main([f"--workdir={workdir}", f"--steps={STEPS}", f"--actions={tmp_path / 'a.npy'}",
                    f"--out={tmp_path}"])


def test_errors_name_the_fix(tmp_path, discrete_run):
    with pytest.raises(SystemExit, match="--actions is for world models of recorded play.*Fix: drop --actions"):
        dream.main([f"--workdir={tmp_path}", "--steps=2", "--actions=random"])
    workdir, _ = discrete_run
    with pytest.raises(SystemExit, match="cannot open the dataset.*Fix: pass the --out"):
        dream.main([f"--workdir={workdir}", "--steps=2", f"--dataset={tmp_path / 'moved'}"])
    with pytest.raises(SystemExit, match="no test episode .* has 100 frames.*Fix: --steps=18 or fewer"):
        dream.main([f"--workdir={workdir}", "--steps=98", f"--out={tmp_path}"])


def test_keys_of_small_action_sets():
    keys = set(watch.NUMBERED_KEYS)
    assert len(keys) == len(watch.NUMBERED_KEYS) == 18
    assert not keys & set(play.COMMAND_OF_KEY) and not keys & {"w", "a", "s", "d", "space"}
    twelve = watch.controls(ActionSpec("discrete", 12), LOW, "d", "episode")
    assert [twelve.key_action({k}, set()) for k in ("1", "9", "f", "h")] == [0, 8, 9, 11]
    assert twelve.key_action(set(), set()) == 0 and twelve.act_name(11) == "action 11"
    atari = watch.controls(SPECS["discrete"], LOW, "d", "episode")
    assert atari.key_action({"a"}, set()) == 2 and atari.key_action(set(), {"space"}) == 1
    assert "LEFT" in atari.keys_text and action_keys("LEFT")[0] in atari.keys_text
    for spec in (ActionSpec("discrete", 19), ActionSpec("multi_hot", 19), SPECS["continuous"]):
        none = watch.controls(spec, LOW, "d", "episode")
        assert none.key_action is None and "keyboard cannot play" in none.keys_text


def received_actions(monkeypatch):
    """The action windows the world model is given, recorded as it draws each frame."""
    windows = []
    draw = watch.RecordedPlayEnv.draw

    def recording(self, key, window):
        windows.append(np.array(window))
        return draw(self, key, window)

    monkeypatch.setattr(watch.RecordedPlayEnv, "draw", recording)
    return windows


def run_play(workdir, max_steps, script, *flags):
    args = play.parse_args([f"--workdir={workdir}", f"--max_steps={max_steps}", "--fps=1000", "--size=32",
                            f"--script={script}", *flags])
    return play.play(args)


def check_windows(windows, last):
    """Each window ends with the action played; the next one drops its oldest action and appends the next."""
    np.testing.assert_array_equal([w[-1] for w in windows], last)
    for before, after in zip(windows, windows[1:]):
        np.testing.assert_array_equal(after[:-1], before[1:])


def test_play_discrete_with_the_atari_keys(discrete_run, headless, monkeypatch):
    windows = received_actions(monkeypatch)
    summary = run_play(discrete_run[0], 6, "1:m,2:+a,4:-a,5:space")
    # NOOP FIRE LEFT: nothing held, then a (LEFT) held over two frames, released, then space (FIRE) tapped.
    expected = [0, 2, 2, 0, 1]
    assert [(x.event, x.control, x.act) for x in summary["log"]] == [("reset", "policy", None)] + [
        ("step", "human", a) for a in expected]
    assert all(len(w) == N for w in windows)
    check_windows(windows, expected)


def test_play_multi_hot_toggles(multi_hot_run, headless, monkeypatch):
    windows = received_actions(monkeypatch)
    summary = run_play(multi_hot_run[0], 5, "1:1,3:3,4:1", "--human")
    expected = [(1, 0, 0), (1, 0, 0), (1, 0, 1), (0, 0, 1)]
    assert [x.act for x in summary["log"][1:]] == expected
    check_windows(windows, np.array(expected, np.float32))


def test_play_continuous_from_an_actions_file(continuous_run, tmp_path, headless, monkeypatch):
    workdir, _ = continuous_run
    rows = np.array([[0.5, -1.0], [2.0, 0.0], [-0.25, 1.5]], np.float32)
    np.save(tmp_path / "steps.npy", rows)
    windows = received_actions(monkeypatch)
    summary = run_play(workdir, 6, "2:m", f"--actions={tmp_path / 'steps.npy'}", "--horizon=0")
    # m does nothing (no keyboard play); the episode truncates when the file's rows run out, then restarts.
    assert [(x.event, x.control, x.trunc) for x in summary["log"]] == [
        ("reset", "policy", False), ("step", "policy", False), ("step", "policy", False), ("step", "policy", True),
        ("reset", "policy", False), ("step", "policy", False)]
    np.testing.assert_array_equal([w[-1] for w in windows], rows[[0, 1, 2, 0]])
    assert summary["commands"] == []
    with pytest.raises(UsageError, match="keyboard cannot play.*Fix: drop --human"):
        run_play(workdir, 2, "", "--human")
