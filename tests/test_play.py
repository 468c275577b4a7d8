"""The play tool: key maps of the 26 games, and headless sessions driven by scripted pygame key events."""

import jax
import jax.numpy as jnp
import numpy as np
import imageio.v3 as iio
import pytest

from diamond_jax import play
from diamond_jax.envs.atari import make_atari_env, num_actions
from diamond_jax.envs.games import ATARI_100K_GAMES, ATARI_ACTION_NAMES, MINIMAL_ACTION_SETS, action_names
from diamond_jax.play_env import (
    NOOP, PlaySession, RealPlayEnv, WorldModelPlayEnv, action_from_keys, action_keys, keymap, load_run_agent,
    noop_action)
from diamond_jax.training.agent_checkpoint import save_agent

# imageio-ffmpeg reads an MP4 through an ffmpeg subprocess, which JAX warns about.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork")

RIGHT = 2  # in Breakout's minimal action set: NOOP FIRE RIGHT LEFT
SIZE = 16  # frames of the debug config


def with_end(variables, always: bool):
    """The reward/end model's head rewired so that it samples an end always or never (rewards stay random):
    sessions then follow an exact script."""
    params = variables["rew_end_model"]["params"]
    head_0, head_2 = params["head_0"], params["head_2"]
    sign = -1.0 if always else 1.0
    # head_0 outputs silu(1) in every unit; head_2 turns that into end logits of about +-23.
    kernel_2 = jnp.zeros_like(head_2["kernel"]).at[:, 3].set(sign).at[:, 4].set(-sign)
    params = dict(params, head_0={"kernel": jnp.zeros_like(head_0["kernel"]), "bias": jnp.ones_like(head_0["bias"])},
                  head_2={"kernel": kernel_2})
    return dict(variables, rew_end_model={"params": params, "buffers": {}})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, debug_config, debug_agent):
    """A run directory whose Breakout agent never imagines an end."""
    directory = tmp_path_factory.mktemp("run")
    save_agent(directory / "agent", debug_config, with_end(debug_agent[1], always=False), step=0)
    return directory


@pytest.fixture
def headless(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")


def test_key_map_table_matches_envpool_action_sets(debug_config):
    assert set(MINIMAL_ACTION_SETS) == set(ATARI_100K_GAMES) and len(MINIMAL_ACTION_SETS) == 26
    for game in ATARI_100K_GAMES:
        names = action_names(game)
        assert len(names) == num_actions(game, debug_config.env), game
        assert names[0] == "NOOP" and len(set(names)) == len(names)
        # ALE lists a minimal set in the order of its action enum.
        assert list(names) == sorted(names, key=ATARI_ACTION_NAMES.index), game
        combos = keymap(names)
        assert len(combos) == len(names) - 1 and sorted(combos.values()) == list(range(1, len(names)))
    assert action_names("Breakout", full_action_space=True) == ATARI_ACTION_NAMES
    action_key_names = {key for name in ATARI_ACTION_NAMES for key in action_keys(name)}
    assert action_key_names == {"w", "a", "s", "d", "space"}
    assert not action_key_names & set(play.COMMAND_OF_KEY), "a control key would also be an action key"
    with pytest.raises(ValueError, match="Unknown game 'breakout'"):
        action_names("breakout")


def test_action_from_keys():
    breakout, full = keymap(action_names("Breakout")), keymap(action_names("Breakout", full_action_space=True))
    assert action_from_keys(breakout, []) == NOOP
    assert action_from_keys(breakout, ["d"]) == RIGHT
    assert action_from_keys(breakout, ["space", "a"]) in (1, 3)  # Breakout has no LEFTFIRE: one of its parts
    assert action_from_keys(breakout, ["w", "d"]) == RIGHT  # no UP nor UPRIGHT in Breakout
    assert action_from_keys(full, ["w", "d"]) == ATARI_ACTION_NAMES.index("UPRIGHT")
    assert action_from_keys(full, ["w", "d", "space"]) == ATARI_ACTION_NAMES.index("UPRIGHTFIRE")
    assert action_from_keys(full, ["m", "s"]) == ATARI_ACTION_NAMES.index("DOWN")
    pong = play.describe_keys("Pong", action_names("Pong"))
    assert "space" in pong and "RIGHTFIRE" in pong
    # Catch's actions are LEFT NOOP RIGHT: no key held plays its NOOP, 1, not action 0.
    catch = ("LEFT", "NOOP", "RIGHT")
    assert action_from_keys(keymap(catch), [], noop_action(catch)) == 1 == noop_action(catch)
    assert action_from_keys(keymap(catch), ["d"], noop_action(catch)) == 2


def test_parse_script():
    assert play.parse_script("0:m, 2:+d,6:-d,7:page up,8:.") == [
        play.ScriptedKey(0, "m", "tap"), play.ScriptedKey(2, "d", "down"), play.ScriptedKey(6, "d", "up"),
        play.ScriptedKey(7, "page up", "tap"), play.ScriptedKey(8, ".", "tap")]
    assert play.parse_script("3:-") == [play.ScriptedKey(3, "-", "tap")]
    for bad in ("m", "x:m", "3:"):
        with pytest.raises(play.UsageError, match="FRAME:KEY"):
            play.parse_script(bad)


def test_scripted_session_records_every_frame(workdir, tmp_path, headless):
    """12 frames of scripted keys: human control, an action key held, pause and a single step, a reset while
    paused, the real game and back, the horizon; every frame recorded."""
    record = tmp_path / "session.mp4"
    script = "1:m,2:+d,4:-d,5:.,6:e,7:return,8:.,9:right,10:left,11:up"
    args = play.parse_args([f"--workdir={workdir}", f"--record={record}", "--max_steps=12", "--fps=1000",
                            f"--script={script}"])
    summary = play.play(args)
    log = [(x.env, x.control, x.event, x.t, x.act, x.horizon) for x in summary["log"]]
    wm = "world model"
    assert log == [
        (wm, "policy", "reset", 0, None, 50),
        (wm, "human", "step", 1, NOOP, 50),
        (wm, "human", "step", 2, RIGHT, 50),  # d held from frame 2...
        (wm, "human", "step", 3, RIGHT, 50),
        (wm, "human", "step", 4, NOOP, 50),  # ...released before frame 4
        (wm, "human", "paused", 4, None, 50),
        (wm, "human", "step", 5, NOOP, 50),  # e: one step while paused
        (wm, "human", "reset", 0, None, 50),  # return: a new initial condition, at once though paused
        (wm, "human", "step", 1, NOOP, 50),  # resumed
        ("real", "human", "reset", 0, None, 50),  # the real game starts on its first visit
        (wm, "human", "step", 2, NOOP, 50),  # back in the world model's own episode
        (wm, "human", "step", 3, NOOP, 51),
    ]
    assert summary["steps"] == {wm: 8, "real": 0} and summary["resets"] == {wm: 2, "real": 1}
    assert summary["human_steps"] == 8
    assert [c for _, c in summary["commands"]] == ["control", "pause", "step", "reset", "pause", "env", "env",
                                                   "horizon+1"]
    view = 512  # --size 512: 16-pixel frames scaled by 32
    assert summary["record"] == {"path": str(record), "frames": 12, "height": view + play.HEADER_HEIGHT,
                                 "width": view}
    video = iio.imread(record, index=None)
    assert video.shape == (12, view + play.HEADER_HEIGHT, view, 3)
    game = video[:, play.HEADER_HEIGHT:].astype(float)
    # A paused frame shows the game as before; a step changes it.
    assert np.abs(game[5] - game[4]).mean() < 2 < np.abs(game[6] - game[5]).mean()
    # The real Breakout's frame has a black background, the untrained world model's a noisy grey one.
    assert game[9].mean() < game[8].mean() - 20


def test_gif_recording_and_real_game_under_the_policy(workdir, tmp_path, headless):
    record = tmp_path / "real.gif"
    args = play.parse_args([f"--workdir={workdir}", f"--record={record}", "--max_steps=5", "--fps=1000",
                            "--size=64", "--script=0:right,3:q"])
    summary = play.play(args)
    assert [(x.env, x.event, x.control) for x in summary["log"]] == [
        ("real", "reset", "policy"), ("real", "step", "policy"), ("real", "step", "policy")]  # q quits at frame 3
    assert summary["resets"]["world model"] == 0  # never shown, never started
    video = iio.imread(record, index=None)
    # pillow merges identical consecutive frames of a GIF
    assert 1 <= len(video) <= 3 and video.shape[1:3] == (64 + play.HEADER_HEIGHT, 64)


def test_session_ends_and_horizon(debug_config, debug_agent):
    """Without pygame: an imagined end starts a new episode at the next frame; the horizon truncates, a lower
    one at the next step, 0 never."""
    agent, variables = debug_agent

    def session(always_end, horizon):
        env = make_atari_env("Breakout", debug_config.env, 1, train=False, seed=0)
        # Placed as load_agent places them, so that the programs compiled for the other tests are reused.
        placed = jax.device_put(with_end(variables, always_end), jax.devices()[0])
        wm = WorldModelPlayEnv(agent, placed, env, 4, horizon)
        return PlaySession([wm], jax.random.key(0))

    s = session(always_end=True, horizon=0)
    events = [(x.event, x.end) for x in (s.tick() for _ in range(5))]
    assert events == [("reset", False), ("step", True), ("reset", False), ("step", True), ("reset", False)]

    s = session(always_end=False, horizon=2)
    logs = [s.tick() for _ in range(4)]
    assert [(x.event, x.t, x.trunc) for x in logs] == [("reset", 0, False), ("step", 1, False), ("step", 2, True),
                                                       ("reset", 0, False)]
    assert [s.tick(["horizon+10"] if i == 0 else []).trunc for i in range(3)] == [False] * 3
    log = s.tick(["horizon-10", "horizon-1"])  # at step 4 with a horizon of 1: truncated at once
    assert s.world_model.horizon == 1 and (log.t, log.trunc) == (4, True)
    s.tick(["horizon_unlimited"])
    assert s.world_model.horizon == 0 and not any(s.tick().trunc for _ in range(3))
    with pytest.raises(ValueError, match="unknown command"):
        s.tick(["jump"])


def test_errors(tmp_path, workdir, headless, capsys):
    with pytest.raises(SystemExit, match="No agent checkpoint.*diamond_jax.main.*diamond_jax.convert"):
        play.main([f"--workdir={tmp_path / 'empty'}", "--max_steps=1"])
    with pytest.raises(SystemExit, match="agent directory.*Fix: --workdir="):
        play.main([f"--workdir={workdir / 'agent'}", "--max_steps=1"])
    with pytest.raises(SystemExit, match="not a pygame key name"):
        play.main([f"--workdir={workdir}", "--script=0:nokey"])
    for flags, message in ((["--record=x.avi", "--max_steps=1"], "must end in .mp4 or .gif"),
                           (["--fps=0", "--max_steps=1"], "--fps=0.0 must be positive"),
                           (["--horizon=-1", "--max_steps=1"], "--horizon=-1 must be >= 0"),
                           ([], "SDL_VIDEODRIVER=dummy.*--max_steps")):
        with pytest.raises(SystemExit):
            play.parse_args([f"--workdir={workdir}", *flags])
        assert message.split(".*")[0] in capsys.readouterr().err


def test_help_names_every_flag(capsys):
    with pytest.raises(SystemExit):
        play.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--workdir", "--seed", "--horizon", "--human", "--init_actions", "--fps", "--size", "--record",
                 "--max_steps", "--script"):
        assert flag in text


def test_load_run_agent_and_real_env(workdir, debug_config):
    config, agent, variables = load_run_agent(str(workdir))
    real = RealPlayEnv(agent, variables, make_atari_env(config.game, config.env, 1, train=False, seed=0))
    real.reset(jax.random.key(0))
    assert real.frame.shape == (SIZE, SIZE, 3) and real.frame.dtype == np.uint8
    tr = real.step(RIGHT, jax.random.key(1))
    assert tr.act == RIGHT and real.t == 1
