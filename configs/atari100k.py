"""DIAMOND on Atari 100k: the configuration of the paper and of the official release.

    python -m diamond_jax.main --config=configs/atari100k.py --workdir=runs/Breakout-0
    python -m diamond_jax.main --config=configs/atari100k.py:game=Pong --config.seed=3 --workdir=runs/Pong-3
    python -m diamond_jax.main --config=configs/atari100k.py:game=Pong,debug --workdir=/tmp/smoke

The argument after ':' takes comma-separated presets: `game=<Name>` (one of the 26 games) and `debug`
(tiny models and a short schedule for tests and CPU smoke runs). Any field can then be overridden with
`--config.<field>=<value>`; values are checked before anything is computed.
"""

from ml_collections import config_dict

from diamond_jax import config as config_lib
from diamond_jax import envs


def get_config(arg: str = "") -> config_dict.ConfigDict:
    presets = config_lib.parse_presets(arg, envs.game_names("envpool"))
    c = config_dict.ConfigDict()

    c.game = "Breakout"  # one of the 26 Atari 100k games (diamond_jax.envs.games.ATARI_100K_GAMES)
    c.seed = 0  # seeds every random draw: model init, sampling, collection, envs
    # Seeds trained as one group in one process, e.g. (0, 1, 2, 3, 4): every model vmapped over a seed axis, each
    # seed a run of its own in <workdir>/seed_<s> (training/group.py). () = one run, with `seed`.
    c.seeds = ()
    c.num_devices = 0  # local devices to shard batches over; 0 = all of them
    # Dtype of the models' matrix products, convolutions and activations (diamond_jax/models/precision.py):
    # "float32" (the paper's) or "bfloat16" (for GPUs and TPUs; parameters, optimiser states,
    # normalisation statistics, losses and the sampler stay float32).
    c.precision = "float32"

    # Shared numbers, referenced by several sections so that one override changes them everywhere.
    horizon = config_dict.FieldReference(15)
    num_steps_conditioning = config_dict.FieldReference(4)
    sample_weights = config_dict.FieldReference((0.1, 0.1, 0.1, 0.7), field_type=tuple)

    c.env = config_dict.ConfigDict()
    c.env.backend = "envpool"  # diamond_jax.envs: envpool's Atari with DIAMOND's preprocessing
    c.env.size = 64  # frames are resized to size x size RGB (area interpolation)
    c.env.frame_skip = 4  # emulator frames per agent step, max-pooled over the last two
    c.env.noop_max = 30  # up to this many random no-ops at reset
    c.env.repeat_action_probability = 0.0  # sticky actions (0 = none, as in the paper)
    c.env.full_action_space = False  # False: the game's minimal action set
    c.env.max_episode_steps = 27_000  # agent steps per episode (108k emulator frames, NoFrameskip-v4 cap)
    c.env.train_done_on_life_loss = True  # a life loss ends a training episode
    c.env.test_done_on_life_loss = False  # ...but not a test episode
    # "official": a loss is counted against the lives at the last loss, so losing a bonus life ends nothing (the
    # official wrapper); "every_decrease": every decrease of the counter ends a training episode.
    c.env.life_loss_rule = "official"

    c.collection = config_dict.ConfigDict()
    c.collection.train = config_dict.ConfigDict()
    c.collection.train.num_envs = 1  # parallel environments for training collection
    c.collection.train.epsilon = 0.01  # epsilon-greedy exploration while collecting
    c.collection.train.num_steps_total = 100_000  # the Atari 100k budget of agent steps
    c.collection.train.steps_per_epoch = 100  # agent steps collected at the start of each epoch
    c.collection.train.first_epoch = config_dict.ConfigDict()
    c.collection.train.first_epoch.min = 5_000  # initial collection: at least this many steps
    c.collection.train.first_epoch.max = 10_000  # ...and at most this many
    c.collection.train.first_epoch.threshold_rew = 10  # ...until the two rarest reward classes reach this count
    c.collection.test = config_dict.ConfigDict()
    c.collection.test.num_envs = 1  # parallel environments for test episodes
    c.collection.test.epsilon = 0.0  # epsilon-greedy in test episodes
    c.collection.test.temperature = 1.0  # policy temperature in test episodes: 1 samples (the paper), 0 = greedy
    c.collection.test.num_episodes = 4  # test episodes at each evaluation
    c.collection.test.num_final_episodes = 100  # test episodes at the end of the run

    c.training = config_dict.ConfigDict()
    c.training.num_final_epochs = 50  # training-only epochs after collection has stopped
    c.training.steps_per_call = 100  # updates per compiled call when it scans; saves happen between calls
    # How a compiled call loops over updates: "scan" (steps_per_call updates in one lax.scan), "python" (one
    # update per call, the host loops: XLA's CPU backend differentiates convolutions 10-70x slower inside a
    # loop), "auto" (scan on GPU/TPU, python on CPU). Both compute the same updates from the same keys.
    c.training.phase_loop = "auto"
    # How a seed group (seeds) trains its seeds: "vmap" (one program vmapped over the seeds: one launch per
    # kernel for all of them), "sequential" (each seed's own program, one seed after another, call by call), "auto"
    # (vmap on GPU/TPU; sequential on CPU, where XLA runs the vmapped convolutions of different weights about 2x
    # slower than the seeds one by one: docs/benchmarks.md). Both compute the same updates from the same keys.
    c.training.seed_loop = "auto"

    c.evaluation = config_dict.ConfigDict()
    c.evaluation.every = 10  # evaluate every this many epochs

    c.checkpoint = config_dict.ConfigDict()
    c.checkpoint.every_epochs = 1  # save the whole run state every this many epochs...
    c.checkpoint.every_minutes = 30.0  # ...and inside an epoch's training when this long has passed (0 = never)
    c.checkpoint.keep = 3  # checkpoints kept on disk (the newest ones)

    c.denoiser = config_dict.ConfigDict()
    c.denoiser.sigma_data = 0.5  # EDM: standard deviation of the data
    c.denoiser.sigma_offset_noise = 0.3  # offset noise, one draw per image and channel
    c.denoiser.inner_model = config_dict.ConfigDict()
    c.denoiser.inner_model.num_steps_conditioning = num_steps_conditioning  # past frames and actions
    c.denoiser.inner_model.cond_channels = 256  # conditioning vector (noise level + actions)
    c.denoiser.inner_model.depths = (2, 2, 2, 2)  # residual blocks per U-Net level
    c.denoiser.inner_model.channels = (64, 64, 64, 64)  # channels per U-Net level
    c.denoiser.inner_model.attn_depths = (0, 0, 0, 0)  # self-attention per level (1 = on)
    # Conditioning variants (the paper's section 4.2; README "Conditioning variants"). How the past frames enter:
    # "frame_stack" (the paper's main model and the official release's: stacked with the noised frame on the
    # channel axis) or "cross_attention" (the core U-Net sees the noised frame only and cross-attends to the
    # activations of a history encoder run on each past frame with shared parameters).
    c.denoiser.conditioning = "frame_stack"
    # What the denoiser draws: "pixel" (frames, the paper) or "latent" (the latents of the pretrained autoencoder
    # at autoencoder.path; the reward/end model and the actor-critic still see frames, decoded from them;
    # README "Latent world models").
    c.denoiser.space = "pixel"
    # Masked conditioning: the training probability that a row's conditioning is replaced by learned null
    # inputs (the paper: typically 0.2), which lets the model run unconditionally and be sampled with
    # classifier-free guidance (world_model_env.sampler.guidance_scale). 0 = never, and no null parameters
    # (the official model's parameters exactly).
    c.denoiser.condition_dropout = 0.0
    # What a null row loses: "all" (past frames and actions together, the paper's) or "actions" (actions only).
    c.denoiser.condition_dropout_target = "all"
    # Sizes of the "cross_attention" variant (checked and used only with it).
    c.denoiser.cross_attention = config_dict.ConfigDict()
    # U-Net levels (0 = full resolution) whose blocks cross-attend to the history; attention costs grow with
    # the square of a level's pixel count, so the two lowest-resolution levels (16 x 16 and 8 x 8).
    c.denoiser.cross_attention.levels = (2, 3)
    c.denoiser.cross_attention.heads = 4  # heads per cross-attention block; must divide those levels' channels
    # The history encoder's channels, one entry per U-Net level (it downsamples like the U-Net; levels below the
    # deepest cross-attending one are not built). Half the U-Net's: the encoder is the light network.
    c.denoiser.cross_attention.channels = (32, 32, 32, 32)
    c.denoiser.sigma_distribution = config_dict.ConfigDict()
    c.denoiser.sigma_distribution.loc = -0.4  # training sigma: log sigma ~ N(loc, scale^2)...
    c.denoiser.sigma_distribution.scale = 1.2
    c.denoiser.sigma_distribution.sigma_min = 2e-3  # ...clipped to [sigma_min, sigma_max]
    c.denoiser.sigma_distribution.sigma_max = 20.0
    c.denoiser.training = config_dict.ConfigDict()
    c.denoiser.training.num_autoregressive_steps = 1  # extra frames predicted from the model's own output
    c.denoiser.training.steps_first_epoch = 10_000  # updates in the first epoch
    c.denoiser.training.steps_per_epoch = 400  # updates in every later epoch
    c.denoiser.training.batch_size = 32  # segments per update
    c.denoiser.training.lr_warmup_steps = 100  # linear learning-rate warm-up from 0
    c.denoiser.training.max_grad_norm = 1.0  # gradient clipping by global norm
    c.denoiser.training.sample_weights = sample_weights  # episode weights of the 4 age groups
    # Whether a segment may end on an episode's final frame (the frame after its last step), so that the
    # denoiser learns to draw the frames games end on. The official sampler never gives it that frame as a
    # target; the reward/end model then sees few imagined ends (docs/learning.md). False = the paper.
    c.denoiser.training.include_final_frame = False
    c.denoiser.optimizer = config_dict.ConfigDict()
    c.denoiser.optimizer.lr = 1e-4  # AdamW learning rate
    c.denoiser.optimizer.weight_decay = 1e-2  # AdamW weight decay (weights of linear, conv and LSTM layers)
    c.denoiser.optimizer.eps = 1e-8  # AdamW epsilon

    # The autoencoder of denoiser.space "latent" (unused in pixel space), frozen during the run.
    c.autoencoder = config_dict.ConfigDict()
    # Its folder: the --workdir of python -m diamond_jax.autoencoder, or the --out of python -m
    # diamond_jax.convert_vae. It is copied into the run's workdir at the first start.
    c.autoencoder.path = ""
    # EDM's sigma_data in latent units (it replaces denoiser.sigma_data); 0 = measured after the initial
    # collection as the std of every value of the encoded replay, and kept in <workdir>/latent.json.
    c.autoencoder.sigma_data = 0.0
    c.autoencoder.encode_batch = 64  # frames per encoder call when the replay is encoded for that measure

    c.rew_end_model = config_dict.ConfigDict()
    c.rew_end_model.lstm_dim = 512  # LSTM hidden size
    c.rew_end_model.cond_channels = 128  # action embedding, conditions every AdaGroupNorm
    c.rew_end_model.depths = (2, 2, 2, 2)  # residual blocks per encoder level
    c.rew_end_model.channels = (32, 32, 32, 32)  # channels per encoder level
    c.rew_end_model.attn_depths = (0, 0, 0, 0)  # self-attention per level (1 = on)
    c.rew_end_model.training = config_dict.ConfigDict()
    c.rew_end_model.training.seq_length = horizon + num_steps_conditioning  # frames per segment (19)
    c.rew_end_model.training.steps_first_epoch = 10_000  # updates in the first epoch
    c.rew_end_model.training.steps_per_epoch = 400  # updates in every later epoch
    c.rew_end_model.training.batch_size = 32  # segments per update
    c.rew_end_model.training.lr_warmup_steps = 100  # linear learning-rate warm-up from 0
    c.rew_end_model.training.max_grad_norm = 100.0  # gradient clipping by global norm
    c.rew_end_model.training.sample_weights = sample_weights  # episode weights of the 4 age groups
    c.rew_end_model.optimizer = config_dict.ConfigDict()
    c.rew_end_model.optimizer.lr = 1e-4  # AdamW learning rate
    c.rew_end_model.optimizer.weight_decay = 1e-2  # AdamW weight decay
    c.rew_end_model.optimizer.eps = 1e-8  # AdamW epsilon

    c.actor_critic = config_dict.ConfigDict()
    c.actor_critic.lstm_dim = 512  # LSTM cell hidden size
    c.actor_critic.channels = (32, 32, 64, 64)  # channels of the 4 encoder blocks
    c.actor_critic.down = (1, 1, 1, 1)  # 2x2 max-pool after each block (1 = on)
    c.actor_critic.training = config_dict.ConfigDict()
    c.actor_critic.training.steps_first_epoch = 5_000  # updates in the first epoch
    c.actor_critic.training.steps_per_epoch = 400  # updates in every later epoch
    c.actor_critic.training.batch_size = 32  # imagined trajectories per update
    c.actor_critic.training.lr_warmup_steps = 100  # linear learning-rate warm-up from 0
    c.actor_critic.training.max_grad_norm = 100.0  # gradient clipping by global norm
    c.actor_critic.training.sample_weights = sample_weights  # episode weights for initial conditions
    c.actor_critic.loss = config_dict.ConfigDict()
    c.actor_critic.loss.gamma = 0.985  # discount
    c.actor_critic.loss.lambda_ = 0.95  # lambda of the lambda-returns
    c.actor_critic.loss.weight_value_loss = 1.0  # weight of the value MSE
    c.actor_critic.loss.weight_entropy_loss = 0.001  # weight of the entropy bonus
    c.actor_critic.optimizer = config_dict.ConfigDict()
    c.actor_critic.optimizer.lr = 1e-4  # AdamW learning rate
    c.actor_critic.optimizer.weight_decay = 0.0  # AdamW weight decay
    c.actor_critic.optimizer.eps = 1e-8  # AdamW epsilon

    c.world_model_env = config_dict.ConfigDict()
    c.world_model_env.horizon = horizon  # imagined steps per actor-critic update; rows truncate at it
    c.world_model_env.initial_conditions_per_row = 2  # fresh initial conditions per row and rollout, for restarts
    c.world_model_env.sampler = config_dict.ConfigDict()
    c.world_model_env.sampler.num_steps_denoising = 3  # n, denoiser calls per frame with Euler
    c.world_model_env.sampler.sigma_min = 2e-3  # Karras schedule: smallest nonzero sigma
    c.world_model_env.sampler.sigma_max = 5.0  # Karras schedule: first sigma
    c.world_model_env.sampler.rho = 7.0  # Karras schedule: curvature
    c.world_model_env.sampler.order = 1  # 1 = Euler, 2 = Heun
    c.world_model_env.sampler.s_churn = 0.0  # stochastic churn (0 = deterministic ODE steps)
    c.world_model_env.sampler.s_tmin = 0.0  # churn only for sigma in [s_tmin, s_tmax]
    c.world_model_env.sampler.s_tmax = float("inf")
    c.world_model_env.sampler.s_noise = 1.0  # scale of the churn noise
    # Classifier-free guidance weight w (the paper's equation 4): each denoiser call returns
    # (1 + w) D(x | past frames, actions) - w D(x | null inputs); 0 = plain conditional sampling (no extra
    # cost). w > 0 needs denoiser.condition_dropout > 0.
    c.world_model_env.sampler.guidance_scale = 0.0

    if presets.debug:
        shrink_for_debug(c)
    c.game = presets.game or c.game

    config_lib.validate(c)
    envs.check_env_config(c)
    return c.lock()


def shrink_for_debug(c: config_dict.ConfigDict) -> None:
    """Tiny models and a short schedule: the whole loop runs in a few minutes on a 2-core CPU."""
    c.env.size = 16
    c.env.max_episode_steps = 100
    c.collection.train.num_steps_total = 120
    c.collection.train.steps_per_epoch = 20
    c.collection.train.first_epoch.min = 60
    c.collection.train.first_epoch.max = 100
    c.collection.test.num_episodes = 1
    c.collection.test.num_final_episodes = 2
    c.training.num_final_epochs = 1
    c.training.steps_per_call = 4
    c.evaluation.every = 2
    c.denoiser.inner_model.cond_channels = 16
    c.denoiser.inner_model.depths = (1, 1)
    c.denoiser.inner_model.channels = (8, 8)
    c.denoiser.inner_model.attn_depths = (0, 0)
    c.denoiser.cross_attention.levels = (0, 1)
    c.denoiser.cross_attention.heads = 2
    c.denoiser.cross_attention.channels = (8, 8)
    c.rew_end_model.lstm_dim = 16
    c.rew_end_model.cond_channels = 8
    c.rew_end_model.depths = (1, 1)
    c.rew_end_model.channels = (8, 8)
    c.rew_end_model.attn_depths = (0, 0)
    c.actor_critic.lstm_dim = 16
    c.actor_critic.channels = (8, 8)
    c.actor_critic.down = (1, 1)
    c.world_model_env.horizon = 5
    for name in ("denoiser", "rew_end_model", "actor_critic"):
        c[name].training.batch_size = 4
        c[name].training.steps_first_epoch = 8
        c[name].training.steps_per_epoch = 4
        c[name].training.lr_warmup_steps = 2
