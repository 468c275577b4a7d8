"""DIAMOND on JAX-native pixel games (gymnax): bsuite's Catch and the five MinAtar games, sized for a CPU.

    python -m diamond_jax.main --config=configs/minatar.py:game=Catch --workdir=runs/minatar/Catch-0
    python -m diamond_jax.main --config=configs/minatar.py:game=Asterix --config.seed=1 --workdir=runs/minatar/Asterix-1
    python -m diamond_jax.main --config=configs/minatar.py:game=Catch,debug --workdir=/tmp/smoke

Presets after ':' (comma-separated): `game=<Name>` (Catch, Asterix, Breakout, Freeway, Seaquest, SpaceInvaders;
default Breakout) and `debug` (tiny models, a few updates: a smoke run). Any field can be overridden with
`--config.<field>=<value>`.

The algorithm and every number not set below are the Atari paper configuration's (configs/atari100k.py, each
commented there): the EDM denoiser with its sigma distribution and offset noise, 4 conditioning frames, the
3-step Euler sampler, horizon 15, gamma 0.985, lambda 0.95, batch 32, the optimisers, epsilon 0.01, the age
weights. What differs, and why: the games are 10 x 10 grids (Catch 10 x 5), so frames are 10 x 10 instead of
64 x 64 and the networks are narrower with fewer levels; the budget of environment steps and the updates per
epoch are cut so that a run fits half an hour (Catch) or two hours (MinAtar) of a 2-core CPU (the Atari
paper's schedule takes months there); test episodes are many and vectorised (gymnax steps are cheap).
"""

import importlib.util
import os

from ml_collections import config_dict

from diamond_jax import config as config_lib
from diamond_jax import envs


def _atari_config_module():
    """configs/atari100k.py, loaded from the file beside this one (installed or in a checkout)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "atari100k.py")
    spec = importlib.util.spec_from_file_location("_atari100k_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _atari_paper_config() -> config_dict.ConfigDict:
    """configs/atari100k.py's paper configuration, unlocked."""
    return _atari_config_module().get_config().unlock()


def get_config(arg: str = "") -> config_dict.ConfigDict:
    presets = config_lib.parse_presets(arg, envs.game_names("gymnax"), "configs/minatar.py",
                                       "a gymnax game of this config")
    c = _atari_paper_config()
    c.game = "Breakout"  # Catch, Asterix, Breakout, Freeway, Seaquest or SpaceInvaders (MinAtar's, not Atari's)

    c.env = config_dict.ConfigDict()
    c.env.backend = "gymnax"  # diamond_jax.envs.gymnax_env: JAX-native, rendered to RGB with a fixed palette
    c.env.size = 10  # one pixel per cell of MinAtar's 10 x 10 grid (Catch's 10 x 5: 1 x 2 pixels); Atari: 64
    c.env.max_episode_steps = 1_000  # agent steps per episode (gymnax's MinAtar default cap)
    # MinAtar's own default is 0.1; 0 as in the Atari paper configuration (no sticky actions).
    c.env.repeat_action_probability = 0.0
    # Overlapping objects show the colour of the highest channel, as MinAtar's display draws them, which puts the
    # player (channel 0) under everything: in Asterix it is hidden in 2% of the frames (on gold, trails and
    # enemies), and imagined rollouts lose it for good (docs/learning.md). True draws it on top instead (alone it
    # did not make Asterix learn: its other objects fade in imagination too); False keeps the documented runs'
    # frames.
    c.env.player_on_top = False

    t = c.collection.train
    # Environment steps of the whole run (Atari: 100k): 60 epochs, about 40 minutes of the 2-core CPU for one
    # MinAtar run alone, within the 2-hour target with room for the machine's other work. Catch's: below.
    t.num_steps_total = 6_000
    t.steps_per_epoch = 100  # steps collected per epoch, as Atari
    t.first_epoch.min = 1_000  # initial collection (Atari: 5,000 to 10,000)
    t.first_epoch.max = 2_000
    c.collection.test.num_envs = 16  # test episodes in parallel (Atari: 1); gymnax steps them in one call
    c.collection.test.num_episodes = 32  # per evaluation (Atari: 4): short episodes, a tighter estimate
    c.collection.test.num_final_episodes = 256  # at the end (Atari: 100)
    c.training.num_final_epochs = 10  # training-only epochs at the end (Atari: 50)
    c.evaluation.every = 5  # evaluate every 5 epochs (Atari: 10), for learning curves with more points

    # Networks: the same architectures, narrower and with fewer levels for 10 x 10 frames. On one core of the
    # 2-core CPU an update takes about 50 ms (denoiser), 160-230 ms (reward/end) and 400-550 ms (actor-critic,
    # 15 imagined steps).
    im = c.denoiser.inner_model
    im.cond_channels = 64  # Atari: 256
    im.depths = (1, 1)  # two U-Net levels, 10 -> 5 (Atari: four levels of 2 blocks, 64 -> 8)
    im.channels = (16, 16)  # Atari: 64
    im.attn_depths = (0, 0)
    ca = c.denoiser.cross_attention  # used with --config.denoiser.conditioning=cross_attention
    # The 5 x 5 level only (Atari: (2, 3)): attending from all 100 pixels to the 4 x 100 history tokens made the
    # forward pass 13x the frame stack's on the CPU (107 vs 8 ms, batch 32; the softmax over 32 x 4 x 100 x 400
    # scores dominates), the 5 x 5 level alone 2x (17 ms).
    ca.levels = (1,)
    ca.channels = (16, 16)  # Atari: 32 per level
    r = c.rew_end_model
    r.lstm_dim = 64  # Atari: 512
    r.cond_channels = 32  # Atari: 128
    r.depths = (1, 1)  # Atari: (2, 2, 2, 2)
    r.channels = (8, 8)  # Atari: 32 per level
    r.attn_depths = (0, 0)
    a = c.actor_critic
    a.lstm_dim = 64  # Atari: 512
    a.channels = (8, 16)  # Atari: (32, 32, 64, 64)
    a.down = (1, 0)  # one max-pool, 10 -> 5 (Atari: four, 64 -> 4)
    # Updates per epoch: far fewer than Atari's 10k/10k/5k in the first epoch and 400 later, so the small
    # networks learn faster per update. With the paper's 1e-4 the reward/end model had not yet told a caught
    # ball from a missed one after 1,150 updates on Catch (its reward recall for +1 was 0, so imagination never
    # rewarded a catch and the policy stayed random); at 1e-3 it had after 1,000 (loss 0.0002).
    c.denoiser.optimizer.lr = 3e-4  # Atari: 1e-4 (MinAtar's games: 1e-3, below)
    c.rew_end_model.optimizer.lr = 1e-3  # Atari: 1e-4
    c.actor_critic.optimizer.lr = 3e-4  # Atari: 1e-4
    c.denoiser.training.steps_first_epoch = 500  # updates in the first epoch (Atari: 10,000; MinAtar's: below)
    c.rew_end_model.training.steps_first_epoch = 1_000  # (Atari: 10,000)
    c.actor_critic.training.steps_first_epoch = 300  # (Atari: 5,000)
    c.denoiser.training.steps_per_epoch = 50  # updates per later epoch (Atari: 400 for each model)
    c.rew_end_model.training.steps_per_epoch = 100
    c.actor_critic.training.steps_per_epoch = 50

    if presets.game == "Catch":
        # A 9-step game: a smaller budget, so that a run takes under half an hour on 2 cores.
        t.num_steps_total = 3_000
        c.training.num_final_epochs = 5
    else:
        # MinAtar's grids hold 4 to 10 kinds of objects whose cells must come out exactly right (Breakout's
        # reward is a brick cell turning black). With Catch's 500 + 50 per epoch at 3e-4, a Breakout world
        # model imagined no frame exactly right after 700 updates, so the reward/end model, which was right
        # on real frames (P(+1) 0.997 on rewarded transitions), saw no reward in imagination (P(+1) 0.003)
        # and the policy had nothing to learn. Trained alone on that replay, the denoiser drew 87-91% of
        # rewarded transitions exactly after 3,000 updates at 3e-4 or 1,500 at 1e-3 (docs/learning.md). A
        # denoiser update costs a tenth of an actor-critic update, so it gets 4x the updates.
        c.denoiser.optimizer.lr = 1e-3
        c.denoiser.training.steps_first_epoch = 2_000
        c.denoiser.training.steps_per_epoch = 200
        # The official segments never end on an episode's final frame, so the denoiser never learnt to draw the
        # ball lost past the paddle: 3% of Breakout's imagined final frames were right, the reward/end model
        # saw an end after 22% of them (100% after real ones), and the returns fell back after epoch 30. Trained
        # on final frames too (a deviation from the paper), it drew 100% of them right, P(end) 1.00, and the three
        # Breakout seeds kept rising (docs/learning.md).
        c.denoiser.training.include_final_frame = True

    if presets.debug:
        _shrink_for_debug(c)
    c.game = presets.game or c.game

    config_lib.validate(c)
    envs.check_env_config(c)
    return c.lock()


def _shrink_for_debug(c: config_dict.ConfigDict) -> None:
    """The Atari config's debug sizes and schedule (tiny models, a 120-step budget; a minute or two on a
    2-core CPU), on frames these games can draw."""
    _atari_config_module().shrink_for_debug(c)
    c.env.size = 10  # Atari's debug frames are 16 x 16: not a multiple of the 10-cell grids
    c.env.max_episode_steps = 50
    c.actor_critic.down = (1, 0)  # 10 -> 5
    c.collection.test.num_envs = 2
    c.collection.test.num_final_episodes = 4
