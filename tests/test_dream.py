"""The dream tool: videos of imagination and of real vs imagined frames, and their PSNR."""

import csv
import json
import math

import imageio.v3 as iio
import jax
import numpy as np
import pytest

from configs import atari100k
from diamond_jax import comparison, dream
from diamond_jax.training.agent_checkpoint import save_agent

# imageio-ffmpeg reads an MP4 through an ffmpeg subprocess, which JAX warns about.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork")

STEPS, ROWS, SCALE, SIZE = 6, 2, 4, 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, debug_config, debug_agent):
    directory = tmp_path_factory.mktemp("run")
    save_agent(directory / "agent", debug_config, debug_agent[1], step=0)
    return directory


@pytest.fixture(scope="module")
def result(workdir):
    return dream.main([f"--workdir={workdir}", f"--steps={STEPS}", f"--rows={ROWS}", f"--scale={SCALE}"])


def test_psnr_by_hand():
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 10  # MSE = 100 / 12
    assert dream.psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 * 12 / 100))  # 38.9226 dB
    assert dream.psnr(a, b) == pytest.approx(38.9226, abs=1e-4)
    assert dream.psnr(a, np.full_like(a, 255)) == 0.0  # no uint8 wrap-around: the largest error is 0 dB
    assert dream.psnr(a, a) == math.inf
    frames = np.stack([a, b])  # per frame over the last three axes
    np.testing.assert_allclose(dream.psnr(frames, np.stack([b, b])), [38.9226, math.inf], atol=1e-4)


def test_videos(result, workdir):
    paths = result["paths"]
    assert paths["imagination"] == workdir / "dream" / "imagination.mp4"
    panel = SIZE * SCALE
    # --steps + 1 frames: the last frame of the initial condition, then one per step.
    imagination = iio.imread(paths["imagination"], index=None)
    assert imagination.shape == (STEPS + 1, panel, ROWS * panel + 2 * (ROWS - 1), 3)
    comparison = iio.imread(paths["real_vs_imagined"], index=None)
    assert comparison.shape == (STEPS + 1, ROWS * panel + 2 * (ROWS - 1), 2 * panel + 2, 3)
    # Both sides start from the same real frame; the untrained world model then drifts away.
    c = result["comparison"]
    np.testing.assert_array_equal(c.real[:, 0], c.imagined[:, 0])
    assert c.real.shape == c.imagined.shape == (ROWS, STEPS + 1, SIZE, SIZE, 3) and c.act.shape == (ROWS, STEPS)
    np.testing.assert_array_equal(np.asarray(result["rollout"].obs[:, 0]).shape, (ROWS, SIZE, SIZE, 3))


def test_the_psnr_plot_starts_at_0_db(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **_: figures.append(fig))
    # PSNR around 30 dB: an axis fitted to the data would start near 29.
    comparison.plot_psnr(tmp_path / "psnr.png", np.array([[30.0, 31.0, 29.5], [30.5, math.inf, 30.0]]), "Pong")
    (ax,) = figures[0].axes
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 31


def test_psnr_files(result):
    values = result["psnr"]
    c = result["comparison"]
    assert values.shape == (ROWS, STEPS) and np.isfinite(values).all()
    error = c.real[:, 1:].astype(np.float64) - c.imagined[:, 1:].astype(np.float64)
    np.testing.assert_allclose(values, 10 * np.log10(255.0 ** 2 / np.mean(error ** 2, axis=(2, 3, 4))))
    paths = result["paths"]
    with open(paths["csv"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "mean"] + [f"row_{i}" for i in range(ROWS)] and len(rows) == STEPS + 1
    table = np.array(rows[1:], float)
    np.testing.assert_array_equal(table[:, 0], np.arange(1, STEPS + 1))
    np.testing.assert_allclose(table[:, 1], values.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(table[:, 2:].T, values, atol=1e-4)
    saved = json.loads(paths["json"].read_text())
    assert saved["game"] == "Breakout" and saved["steps"] == STEPS and saved["rows"] == ROWS
    np.testing.assert_allclose(saved["psnr"], values)
    assert iio.imread(paths["png"]).ndim == 3


def test_gif_and_out(workdir, tmp_path):
    out = dream.dream(str(workdir), STEPS, out=str(tmp_path / "gifs"), fmt="gif", rows=ROWS, scale=1)
    video = iio.imread(out["paths"]["imagination"], index=None)
    assert out["paths"]["imagination"] == tmp_path / "gifs" / "imagination.gif"
    # pillow merges repeated frames of a GIF
    assert 1 <= len(video) <= STEPS + 1 and video.shape[1:3] == (SIZE, ROWS * SIZE + 2 * (ROWS - 1))


def test_comparison_stops_at_a_real_episode_end(workdir, debug_agent, capsys):
    config = atari100k.get_config("debug")
    # The initial condition takes 3 steps: 6 of the 10 steps are in the same episode (the shapes of the
    # other tests, whose compiled programs this one reuses).
    config.env.max_episode_steps = 3 + STEPS
    agent, variables = debug_agent
    placed = jax.device_put(variables, jax.devices()[0])  # as load_agent places them
    c = dream.compare_open_loop(config, agent, placed, ROWS, 10, jax.random.key(0), 0)
    assert c.real.shape[:2] == c.imagined.shape[:2] == (ROWS, STEPS + 1) and c.act.shape == (ROWS, STEPS)
    assert f"ended after {STEPS} of the 10 steps" in capsys.readouterr().err


def test_errors(tmp_path, workdir, capsys):
    with pytest.raises(SystemExit, match="No agent checkpoint.*diamond_jax.main.*diamond_jax.convert"):
        dream.main([f"--workdir={tmp_path}", "--steps=2"])
    for flags, message in ((["--steps=0"], "--steps=0 must be positive"), (["--format=avi"], "invalid choice"),
                           ([], "--steps")):
        with pytest.raises(SystemExit):
            dream.parse_args([f"--workdir={workdir}", *flags])
        assert message in capsys.readouterr().err
