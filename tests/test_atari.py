"""envpool Atari with DIAMOND's preprocessing: every game starts, frames have the right form, and the
envpool behaviours documented in diamond_jax/envs/atari.py (auto-reset, life loss) hold."""

import envpool
import numpy as np
import pytest

from configs import atari100k
from diamond_jax.envs.atari import AtariEnv, make_atari_env, num_actions
from diamond_jax.envs.games import ATARI_100K_GAMES

NOOP, FIRE = 0, 1

# Sizes of ALE's minimal action sets, as listed in ALE's documentation of each game.
MINIMAL_ACTION_SET_SIZES = {
    "Alien": 18, "Amidar": 10, "Assault": 7, "Asterix": 9, "BankHeist": 18, "BattleZone": 18, "Boxing": 18,
    "Breakout": 4, "ChopperCommand": 18, "CrazyClimber": 9, "DemonAttack": 6, "Freeway": 3, "Frostbite": 18,
    "Gopher": 8, "Hero": 18, "Jamesbond": 18, "Kangaroo": 18, "Krull": 18, "KungFuMaster": 14, "MsPacman": 9,
    "Pong": 6, "PrivateEye": 18, "Qbert": 6, "RoadRunner": 18, "Seaquest": 18, "UpNDown": 6,
}


def env_config(**overrides):
    c = atari100k.get_config("debug").env
    for k, v in overrides.items():
        c[k] = v
    return c


def raw_breakout(seed=0, **kw):
    """Breakout straight from envpool, to observe envpool's own behaviour."""
    return envpool.make("Breakout-v5", env_type="gymnasium", num_envs=1, batch_size=1, seed=seed, img_height=16,
                        img_width=16, gray_scale=False, stack_num=1, use_fire_reset=False, noop_max=30, **kw)


def breakout_until_life_loss(step, lives):
    """Launches the ball with FIRE and waits with NOOP: the paddle misses and a life is lost."""
    for t in range(300):
        out = step(np.array([FIRE if t == 0 else NOOP], np.int32))
        if out[-1] < lives:
            return out
    raise AssertionError("Breakout with FIRE then NOOP lost no life in 300 steps")


def test_every_game_starts_and_steps():
    size = 16
    for game in ATARI_100K_GAMES:
        env = make_atari_env(game, env_config(), num_envs=2, train=True, seed=0)
        assert env.num_actions == num_actions(game, env_config()) == MINIMAL_ACTION_SET_SIZES[game], game
        obs = env.reset()
        assert obs.shape == (2, size, size, 3) and obs.dtype == np.uint8, game
        for t in range(3):
            s = env.step(np.array([t % env.num_actions, 0], np.int32))
            assert s.obs.shape == s.final_obs.shape == (2, size, size, 3) and s.obs.dtype == np.uint8, game
            assert s.rew.dtype == np.float32 and s.end.dtype == bool and s.trunc.dtype == bool, game
        assert s.obs.max() > 0, f"{game}: black frames"  # real frames, not zero padding


def test_unknown_game_names_the_valid_ones():
    with pytest.raises(ValueError, match="Breakout.*UpNDown"):
        make_atari_env("breakout", env_config(), 1, True, 0)


def test_noop_max_zero_is_refused_clearly():
    with pytest.raises(ValueError, match="noop_max"):
        make_atari_env("Pong", env_config(noop_max=0), 1, True, 0)


def area_resize_reference(frame, size):
    """Area interpolation: each output pixel averages the input pixels it covers, weighted by overlap."""

    def weights(n_in):
        scale = n_in / size
        w = np.zeros((size, n_in))
        for i in range(size):
            lo, hi = i * scale, (i + 1) * scale
            for j in range(int(np.floor(lo)), int(np.ceil(hi))):
                w[i, j] = min(hi, j + 1) - max(lo, j)
        return w / scale

    return np.einsum("ij,jkc,lk->ilc", weights(frame.shape[0]), frame.astype(np.float64), weights(frame.shape[1]))


def test_frames_are_rgb_area_resized():
    """A 210x160 env (no resize) and a 16x16 env see the same game: the small frame is the area-resize of
    the full one (up to rounding), so the frames are RGB in HWC order and resized with area interpolation."""
    size = 16
    small = make_atari_env("MsPacman", env_config(size=size), 1, True, 0)
    # make_atari_env makes square frames; the raw screen is 210x160, so build that env by hand.
    full = AtariEnv(envpool.make("MsPacman-v5", env_type="gymnasium", num_envs=1, batch_size=1, seed=0,
                                 img_height=210, img_width=160, gray_scale=False, stack_num=1, use_fire_reset=False,
                                 noop_max=30), num_envs=1, num_actions=9, done_on_life_loss=True)
    f, s = full.reset(), small.reset()
    for t in range(40):
        a = np.array([t % 9], np.int32)
        f, s = full.step(a).obs, small.step(a).obs
    assert f.shape == (1, 210, 160, 3)
    diff = np.abs(np.round(area_resize_reference(f[0], size)) - s[0])
    assert diff.max() <= 1, diff.max()


def test_envpool_auto_reset_ignores_the_action_of_the_next_call():
    """Pins envpool's auto-reset, which AtariEnv works around: after done, the next step call returns
    a new episode's first frame (elapsed_step 0, full lives) whatever the action."""
    envs = [raw_breakout(episodic_life=False) for _ in range(2)]
    for env in envs:
        env.reset()
    lives, t = 5, 0
    while True:  # play both games identically until game over
        act = np.array([FIRE if t == 0 else NOOP], np.int32)
        outs = [env.step(act) for env in envs]
        t += 1
        if outs[0][4]["lives"][0] < lives:
            lives, t = outs[0][4]["lives"][0], 0
        if outs[0][2][0]:
            break
        assert t < 300
    assert lives == 0
    after = [env.step(np.array([a], np.int32)) for env, a in zip(envs, (FIRE, 3))]
    for _, rew, term, trunc, info in after:
        assert info["elapsed_step"][0] == 0 and info["lives"][0] == 5 and rew[0] == 0 and not term[0]
    np.testing.assert_array_equal(after[0][0], after[1][0])


def test_envpool_episodic_life_soft_reset_ignores_the_action():
    """Pins why AtariEnv does not use envpool's episodic_life: after a life loss the next call ignores the
    action and is not a step (elapsed_step unchanged), though the game goes on (lives not restored)."""
    envs = [raw_breakout(episodic_life=True) for _ in range(2)]
    for env in envs:
        env.reset()
    elapsed = []
    for env in envs:
        for t in range(300):
            _, _, term, _, info = env.step(np.array([FIRE if t == 0 else NOOP], np.int32))
            if info["lives"][0] < 5:
                break
        assert term[0], "episodic_life reports done on a life loss"
        elapsed.append(info["elapsed_step"][0])
    after = [env.step(np.array([a], np.int32)) for env, a in zip(envs, (FIRE, 3))]
    for steps_before, (_, _, term, _, info) in zip(elapsed, after):
        assert info["elapsed_step"][0] == steps_before and info["lives"][0] == 4 and not term[0]
    np.testing.assert_array_equal(after[0][0], after[1][0])


def play_breakout_life_loss(train):
    env = make_atari_env("Breakout", env_config(max_episode_steps=27_000), 1, train=train, seed=0)
    env.reset()

    def step(act):
        s = env.step(act)
        return s, s.lives[0]

    return env, breakout_until_life_loss(step, 5)[0]


def test_life_loss_ends_a_training_episode_and_the_game_goes_on():
    (env_a, s), (env_b, _) = play_breakout_life_loss(train=True), play_breakout_life_loss(train=True)
    assert s.lives[0] == 4 and s.end[0] and not s.trunc[0]
    # No reset: the next training episode starts from the frame reached by the life-loss step...
    np.testing.assert_array_equal(s.obs, s.final_obs)
    # ...and the agent acts at once: FIRE launches a new ball, NOOP does not (envpool's soft reset would
    # have ignored both actions), while the game keeps its 4 lives.
    for _ in range(5):
        a, b = env_a.step(np.array([FIRE], np.int32)), env_b.step(np.array([NOOP], np.int32))
        assert a.lives[0] == b.lives[0] == 4 and not a.end[0] and not b.end[0]
    assert not np.array_equal(a.obs, b.obs)


def test_life_loss_does_not_end_a_test_episode():
    _, s = play_breakout_life_loss(train=False)
    assert s.lives[0] == 4 and not s.end[0] and not s.trunc[0]


def test_game_over_resets_within_the_same_step():
    env = make_atari_env("Breakout", env_config(max_episode_steps=27_000), 1, train=False, seed=0)
    env.reset()
    lives, t = 5, 0
    while True:
        s = env.step(np.array([FIRE if t == 0 else NOOP], np.int32))
        t += 1
        if s.end[0]:
            break
        if s.lives[0] < lives:
            lives, t = s.lives[0], 0
        assert t < 300
    assert s.lives[0] == 0 and not s.trunc[0]
    assert not np.array_equal(s.obs, s.final_obs), "obs is the new episode's first frame"
    s2 = env.step(np.array([FIRE], np.int32))  # an agent step of the new game, which has 5 lives
    assert s2.lives[0] == 5 and not s2.end[0]


def test_time_limit_truncates_and_resets():
    env = make_atari_env("Pong", env_config(max_episode_steps=7), 2, train=True, seed=0)
    env.reset()
    for t in range(7):
        s = env.step(np.zeros(2, np.int32))
        assert s.trunc.all() == (t == 6) and not s.end.any()
    s = env.step(np.zeros(2, np.int32))
    assert not s.trunc.any()


def test_resetting_one_env_leaves_the_others_alone():
    """Env i of a pool seeded s plays as a lone env seeded s + i, also when another env of the pool is reset:
    env 0 plays to game over (and is reset) while env 1 waits with NOOP (its ball is never launched)."""
    config = env_config(max_episode_steps=27_000)
    pool = make_atari_env("Breakout", config, 2, train=True, seed=5)
    alone = [make_atari_env("Breakout", config, 1, train=True, seed=5 + i) for i in range(2)]
    obs = pool.reset()
    for i, env in enumerate(alone):
        np.testing.assert_array_equal(obs[i], env.reset()[0])
    fire, game_overs = True, 0
    for _ in range(400):
        act = np.array([FIRE if fire else NOOP, NOOP], np.int32)
        s = pool.step(act)
        for i, env in enumerate(alone):
            s_i = env.step(act[i:i + 1])
            np.testing.assert_array_equal(s.obs[i], s_i.obs[0])
            np.testing.assert_array_equal(s.final_obs[i], s_i.final_obs[0])
            assert s.end[i] == s_i.end[0] and s.rew[i] == s_i.rew[0]
        fire = bool(s.end[0])  # a new ball after each life loss
        game_overs += int(s.lives[0] == 0)
    assert game_overs >= 1 and not s.end[1]


class ScriptedLives:
    """A stand-in for an envpool pool whose one env plays a scripted sequence of life counts."""

    def __init__(self, lives):
        self._lives, self._t = list(lives), 0

    def reset(self, env_id=None):
        self._t = 0
        return np.zeros((1, 3, 4, 4), np.uint8), {"lives": np.array([self._lives[0]]), "env_id": np.array([0])}

    def step(self, act):
        self._t += 1
        info = {"lives": np.array([self._lives[self._t]])}
        return np.zeros((1, 3, 4, 4), np.uint8), np.zeros(1), np.zeros(1, bool), np.zeros(1, bool), info


@pytest.mark.parametrize("rule, ends", [
    # 3 -> 2 ends; a bonus life (2 -> 3) and its loss (3 -> 2) end nothing under the official rule, then 2 -> 1.
    ("official", [False, True, False, False, True, False]),
    ("every_decrease", [False, True, False, True, True, False]),
])
def test_life_losses_after_a_bonus_life(rule, ends):
    lives = [3, 3, 2, 3, 2, 1, 1]
    env = AtariEnv(ScriptedLives(lives), 1, 4, done_on_life_loss=True, life_loss_rule=rule)
    env.reset()
    assert [bool(env.step(np.zeros(1, np.int32)).end[0]) for _ in range(6)] == ends


def test_the_official_life_rule_is_the_default():
    assert env_config().life_loss_rule == "official"
