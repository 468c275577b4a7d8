"""The environment interface and its gymnax backend (Catch, MinAtar): rendering against hand-built frames,
Catch's rules against a plain Python model of the game, seeds, truncation, sticky actions, bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest

from configs import atari100k, minatar
from diamond_jax import baselines, envs
from diamond_jax.config import ConfigError
from diamond_jax.envs import gymnax_env
from diamond_jax.envs.atari import AtariEnv

WHITE, RED, GREEN, YELLOW = gymnax_env.PALETTE[:4]


def catch_config(**env):
    c = minatar.get_config("game=Catch").unlock()
    for k, v in env.items():
        c.env[k] = v
    return c.lock()


def test_render_draws_the_highest_active_channel_in_blocks():
    grid = np.zeros((2, 3, 3), np.float32)
    grid[0, 0, 0] = 1  # white alone
    grid[0, 1, 0] = grid[0, 1, 2] = 1  # white under green: green
    grid[1, 2, 1] = 1  # red
    frame = np.asarray(gymnax_env.render(grid, 6))
    assert frame.shape == (6, 6, 3) and frame.dtype == np.uint8
    expected = np.zeros((6, 6, 3), np.uint8)
    expected[0:3, 0:2] = WHITE  # each cell is 3 rows x 2 columns of pixels
    expected[0:3, 2:4] = GREEN
    expected[3:6, 4:6] = RED
    np.testing.assert_array_equal(frame, expected)


def test_render_can_draw_the_player_above_the_other_channels():
    grid = np.zeros((1, 3, 4), np.float32)
    grid[0, 0, 0] = grid[0, 0, 3] = 1  # the player on gold: white on top
    grid[0, 1, 1] = grid[0, 1, 2] = 1  # red under green, as without the option
    grid[0, 2, 0] = 1  # the player alone
    frame = np.asarray(gymnax_env.render(grid, 3, player_on_top=True))
    np.testing.assert_array_equal(frame[0], [WHITE, GREEN, WHITE])
    assert (np.asarray(gymnax_env.render(grid, 3))[0, 0] == YELLOW).all()  # MinAtar's order: gold over the player


def test_every_game_makes_uint8_rgb_frames_with_its_actions():
    expected_actions = {"Catch": ("LEFT", "NOOP", "RIGHT"), "Breakout": ("NOOP", "LEFT", "RIGHT"),
                        "Asterix": ("NOOP", "LEFT", "UP", "RIGHT", "DOWN"), "Freeway": ("NOOP", "UP", "DOWN"),
                        "Seaquest": ("NOOP", "LEFT", "UP", "RIGHT", "DOWN", "FIRE"),
                        "SpaceInvaders": ("NOOP", "LEFT", "RIGHT", "FIRE")}
    assert set(envs.game_names("gymnax")) == set(expected_actions)
    for game, names in expected_actions.items():
        config = minatar.get_config(f"game={game}")
        assert envs.action_names(config) == names and envs.num_actions(config) == len(names)
    for game in ("Catch", "Breakout"):  # stepping compiles each game's program: two stand for all
        config = minatar.get_config(f"game={game}")
        env = envs.make_env(config, 3, train=True, seed=0)
        obs = env.reset()
        assert obs.shape == (3, config.env.size, config.env.size, 3) and obs.dtype == np.uint8
        assert env.action_names == expected_actions[game]
        step = env.step(np.zeros(3, np.int32))
        assert step.obs.shape == step.final_obs.shape == obs.shape and step.rew.dtype == np.float32
        assert step.end.dtype == step.trunc.dtype == bool and not step.lives.any()


def catch_cells(frame):
    """The lit cells of a Catch frame of size 10 (cells are 1 x 2 pixels), as {(row, column)}."""
    return {tuple(int(i) for i in rc) for rc in np.argwhere(frame[:, ::2].any(axis=-1))}


def test_catch_follows_its_rules():
    """Against a plain model of bsuite's Catch: the paddle moves by action - 1 within the 5 columns, the
    ball falls one row per step, the episode ends after 9 steps with +1 if the paddle is under the ball."""
    env = envs.make_env(catch_config(), 1, train=True, seed=3)
    rng = np.random.default_rng(0)
    obs = env.reset()
    for _ in range(5):  # episodes
        (ball,) = catch_cells(obs[0]) - {(9, 2)}  # the paddle starts in the middle of the bottom row
        ball_x, paddle = ball[1], 2
        assert ball[0] == 0
        for t in range(9):
            act = int(rng.integers(0, 3))
            step = env.step(np.array([act]))
            paddle = min(4, max(0, paddle + act - 1))
            assert catch_cells(step.final_obs[0]) == {(t + 1, ball_x), (9, paddle)}
            if t < 8:
                assert not step.end[0] and step.rew[0] == 0
        assert step.end[0] and not step.trunc[0] and step.rew[0] == (1.0 if paddle == ball_x else -1.0)
        obs = step.obs  # the next episode's first frame
        assert (9, 2) in catch_cells(obs[0])


def test_seeds_are_honoured_and_envs_differ():
    def frames(seed, num_envs=4):
        env = envs.make_env(minatar.get_config("game=Catch"), num_envs, train=True, seed=seed)
        out = [env.reset()]
        for t in range(20):
            out.append(env.step(np.full(num_envs, t % 3)).obs)
        return np.stack(out)

    a, b, c = frames(0), frames(0), frames(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[:, 0], a[:, 1])  # env i is seeded seed + i
    np.testing.assert_array_equal(a[:, 1], frames(1)[:, 0])


def test_truncation_at_the_episode_cap():
    config = minatar.get_config("game=Breakout").unlock()
    config.env.max_episode_steps = 3
    env = envs.make_env(config.lock(), 2, train=True, seed=0)
    first = env.reset()
    for t in range(3):
        step = env.step(np.zeros(2, np.int32))  # the ball needs more than 3 steps to fall from row 3
        assert not step.end.any()
        assert step.trunc.all() == (t == 2)
    np.testing.assert_array_equal(step.obs, first)  # Breakout always starts in one of two states: NOOP keeps
    assert not np.array_equal(step.final_obs, first)  # ...the paddle, so the new episode's frame is the first


def test_sticky_actions_repeat_the_previous_action():
    """With repeat_action_probability 1 every step plays the episode's first previous action, 0 = LEFT in
    Catch: the paddle goes left whatever is chosen."""
    env = envs.make_env(catch_config(repeat_action_probability=1.0), 1, train=True, seed=0)
    env.reset()
    paddles = [{c for r, c in catch_cells(env.step(np.array([2])).final_obs[0]) if r == 9} for _ in range(4)]
    assert paddles == [{1}, {0}, {0}, {0}]


def test_bad_input_is_refused_before_anything_runs():
    config = minatar.get_config("game=Catch").unlock()
    config.game = "Pong"
    with pytest.raises(ConfigError, match="Unknown game 'Pong' for the gymnax backend.*Catch, Asterix"):
        envs.make_env(config, 1, True, 0)
    catch = minatar.get_config("game=Catch").unlock()
    catch.env.size = 16
    with pytest.raises(ConfigError, match="env.size=16.*multiple of 10"):
        envs.num_actions(catch)
    config = atari100k.get_config("debug").unlock()
    config.env.backend = "gym"
    with pytest.raises(ConfigError, match="backend='gym'.*envpool, gymnax"):
        envs.make_env(config, 1, True, 0)
    with pytest.raises(ConfigError, match="not a gymnax game of this config.*Catch"):
        minatar.get_config("game=Pong")
    env = envs.make_env(catch_config(), 2, True, 0)
    env.reset()
    with pytest.raises(ValueError, match="one action per env"):
        env.step(np.zeros(3, np.int32))


def test_atari_goes_through_the_same_interface(debug_config):
    env = envs.make_env(debug_config, 1, train=True, seed=0)
    assert isinstance(env, AtariEnv) and env.action_names == ("NOOP", "FIRE", "RIGHT", "LEFT")
    assert envs.num_actions(debug_config) == 4 == len(envs.action_names(debug_config))


def catch_random_return() -> float:
    """The uniformly random policy's expected Catch return: the ball falls in a uniform column, independent of
    where the random paddle ends, so the paddle is under it with probability 1/5: 2/5 - 1 = -0.6."""
    return 2 * (1 / 5) - 1


def test_random_baseline_matches_the_exact_random_return():
    returns = np.asarray(baselines.random_policy_returns(catch_config(), "Catch", 1000, 32, seed=1))
    assert set(np.unique(returns)) <= {-1.0, 1.0}
    expected = catch_random_return()
    assert abs(returns.mean() - expected) < 4 * returns.std() / np.sqrt(len(returns)), (returns.mean(), expected)


def test_grids_known_without_an_environment_are_gymnax_s():
    import gymnax

    assert set(gymnax_env.GRIDS) == set(gymnax_env.GAMES)
    for game, env_id in gymnax_env.GAMES.items():
        env, params = gymnax.make(env_id)
        assert gymnax_env.GRIDS[game] == tuple(env.observation_space(params).shape[:2]), game


def test_reading_a_gymnax_config_leaves_jax_unstarted():
    """--cpu_devices and jax.distributed set JAX up after the config is read: reading it must not start JAX."""
    code = ("from configs import minatar; minatar.get_config('game=Catch'); import jax; "
            "jax.config.update('jax_num_cpu_devices', 3); print(len(jax.devices('cpu')))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "3"
