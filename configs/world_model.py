"""A diffusion world model trained on recorded play, without reinforcement learning.

    python -m diamond_jax.world_model --config=configs/world_model.py --dataset=data/pong --workdir=runs/wm-pong
    python -m diamond_jax.world_model --config=configs/world_model.py:upsampler --dataset=D --workdir=W
    python -m diamond_jax.world_model --config=configs/world_model.py:debug --dataset=D --workdir=/tmp/wm

The denoiser is DIAMOND's (the Atari configuration's numbers) and draws frames at `resolution`: the dataset's
frames are resized to it. With the `upsampler` preset (or --config.upsampler.enabled=True) a second denoiser,
the official CS:GO model's upsampler in kind, draws the full-resolution frame from the low-resolution one.
Presets after ':' (comma-separated): `upsampler`, `debug` (tiny models and a short schedule for tests and CPU
smoke runs). Any field can then be overridden with --config.<field>=<value>.
"""

from ml_collections import config_dict

from diamond_jax.world_model import config as wm_config

PRESETS = ("upsampler", "debug")


def _sampler(num_steps: int, sigma_min: float, order: int, s_churn: float, s_tmin: float, s_tmax: float,
             s_noise: float) -> config_dict.ConfigDict:
    s = config_dict.ConfigDict()
    s.num_steps_denoising = num_steps  # denoiser calls per frame (twice that with Heun)
    s.sigma_min = sigma_min  # Karras schedule: smallest nonzero sigma
    s.sigma_max = 5.0  # Karras schedule: first sigma
    s.rho = 7.0  # Karras schedule: curvature
    s.order = order  # 1 = Euler, 2 = Heun
    s.s_churn = s_churn  # stochastic churn (0 = deterministic ODE steps)
    s.s_tmin = s_tmin  # churn only for sigma in [s_tmin, s_tmax]
    s.s_tmax = s_tmax
    s.s_noise = s_noise  # scale of the churn noise
    return s


def _model(num_steps_conditioning: int, cond_channels: int, channels, attn_depths, sigma_offset_noise: float,
           lr: float) -> config_dict.ConfigDict:
    m = config_dict.ConfigDict()
    m.sigma_data = 0.5  # EDM: standard deviation of the data
    m.sigma_offset_noise = sigma_offset_noise  # offset noise, one draw per image and channel
    m.inner_model = config_dict.ConfigDict()
    m.inner_model.num_steps_conditioning = num_steps_conditioning  # past frames (and actions) it sees
    m.inner_model.cond_channels = cond_channels  # conditioning vector (noise level + actions)
    m.inner_model.depths = (2,) * len(channels)  # residual blocks per U-Net level
    m.inner_model.channels = tuple(channels)  # channels per U-Net level
    m.inner_model.attn_depths = tuple(attn_depths)  # self-attention per level (1 = on)
    m.sigma_distribution = config_dict.ConfigDict()
    m.sigma_distribution.loc = -0.4  # training sigma: log sigma ~ N(loc, scale^2)...
    m.sigma_distribution.scale = 1.2
    m.sigma_distribution.sigma_min = 2e-3  # ...clipped to [sigma_min, sigma_max]
    m.sigma_distribution.sigma_max = 20.0
    m.training = config_dict.ConfigDict()
    m.training.batch_size = 32  # segments per update
    m.training.lr_warmup_steps = 100  # linear learning-rate warm-up from 0
    m.training.max_grad_norm = 1.0  # gradient clipping by global norm
    m.optimizer = config_dict.ConfigDict()
    m.optimizer.lr = lr  # AdamW learning rate
    m.optimizer.weight_decay = 1e-2  # AdamW weight decay (weights of linear and conv layers)
    m.optimizer.eps = 1e-8  # AdamW epsilon
    return m


def get_config(arg: str = "") -> config_dict.ConfigDict:
    presets = wm_config.parse_presets(arg, PRESETS)
    c = config_dict.ConfigDict()
    c.seed = 0  # seeds model init, batch sampling and the sampler's noise
    c.num_devices = 0  # local devices to shard batches over; 0 = all of them
    c.precision = "float32"  # or "bfloat16" (diamond_jax/models/precision.py)
    # (height, width) the denoiser draws: the dataset's frames are resized to it (antialiased). DIAMOND's Atari
    # frames are 64x64; the CS:GO model drew 30x56 and upsampled 5x.
    c.resolution = (64, 64)
    # The dataset's kind of actions, checked against its metadata: "discrete" (an index, embedded as in the
    # paper), "multi_hot" (several keys held at once) or "continuous" (a vector); the last two enter through a
    # learned linear embedding.
    c.action_kind = "discrete"

    # The denoiser: the Atari configuration's model and optimiser (SPEC.md); lr as the official trainer's.
    c.denoiser = _model(4, 256, (64, 64, 64, 64), (0, 0, 0, 0), sigma_offset_noise=0.3, lr=1e-4)
    c.denoiser.training.num_autoregressive_steps = 1  # frames predicted from the model's own output
    # Conditioning variants, as configs/atari100k.py (README "Conditioning variants"): "frame_stack" (the
    # paper's main model) or "cross_attention" (the core U-Net cross-attends to a history encoder).
    c.denoiser.conditioning = "frame_stack"
    # Masked conditioning: training probability of a row on learned null inputs (the paper: typically 0.2);
    # it makes the model runnable unconditionally and with guidance (sampler.guidance_scale). 0 = none.
    c.denoiser.condition_dropout = 0.0
    c.denoiser.condition_dropout_target = "all"  # what a null row loses: "all" (frames and actions) or "actions"
    c.denoiser.cross_attention = config_dict.ConfigDict()  # sizes of "cross_attention" (checked only with it)
    c.denoiser.cross_attention.levels = (2, 3)  # U-Net levels (0 = full resolution) that cross-attend
    c.denoiser.cross_attention.heads = 4  # heads per cross-attention block; must divide those levels' channels
    c.denoiser.cross_attention.channels = (32, 32, 32, 32)  # history encoder channels, one per U-Net level
    # Dual-purpose training for drift recovery (README "Long rollouts"; models/interpolation.py). steps 0 = off:
    # the official denoiser, exactly.
    c.denoiser.interpolation = config_dict.ConfigDict()
    c.denoiser.interpolation.steps = 0  # m: steps of an interpolation toward a target frame (the paper's 10)
    c.denoiser.interpolation.p_interpolate = 0.25  # training probability that a batch interpolates (the paper's)
    c.denoiser.interpolation.motion_weighting = False  # weigh segments with large frame differences more
    c.denoiser.interpolation.motion_floor = 0.1  # ...a still segment's weight, relative to (1 + an average one)
    c.denoiser.interpolation.intermediate_targets = False  # step s sees a blend of current frame and target
    c.denoiser.interpolation.intermediate_power = 2.0  # ...the target's weight ((s + 1) / m) ** power (2: quadratic)
    # What the denoiser draws: "pixel" (frames at `resolution`) or "latent" (the latents of the autoencoder at
    # autoencoder.path, decoded into the frames shown and scored; README "Latent world models").
    c.denoiser.space = "pixel"
    c.sampler = _sampler(3, 2e-3, 1, 0.0, 0.0, float("inf"), 1.0)  # DIAMOND's: 3 Euler steps
    # Classifier-free guidance weight w (the paper's equation 4); 0 = plain conditional sampling. w > 0 needs
    # denoiser.condition_dropout > 0.
    c.sampler.guidance_scale = 0.0

    # The upsampler: the official CS:GO upsampler's shape (one past full-resolution frame, channels
    # 64-64-128-256, attention at the lowest level, offset noise 0.1) with cond_channels 256 instead of 2,048.
    c.upsampler = _model(1, 256, (64, 64, 128, 256), (0, 0, 0, 1), sigma_offset_noise=0.1, lr=1e-4)
    c.upsampler.enabled = False  # True: train it beside the denoiser, and chain it after it when sampling
    # (height, width) it draws; () = the dataset's own frame size.
    c.upsampler.resolution = ()
    # The official CS:GO release's upsampling sampler: one Heun step with churn.
    c.upsampler.sampler = _sampler(1, 1.0, 2, 10.0, 1.0, 5.0, 0.9)

    # The autoencoder of denoiser.space "latent" (unused in pixel space).
    c.autoencoder = config_dict.ConfigDict()
    # Its folder: the --workdir of python -m diamond_jax.autoencoder, or the --out of python -m
    # diamond_jax.convert_vae. It is copied into the run's workdir at the first start.
    c.autoencoder.path = ""
    # EDM's sigma_data in latent units (it replaces denoiser.sigma_data); 0 = measured at the first start as the
    # std of every value of the encoded training frames, and kept in <workdir>/latent.json.
    c.autoencoder.sigma_data = 0.0
    c.autoencoder.encode_batch = 32  # frames per encoder call when the dataset is encoded at the start

    c.training = config_dict.ConfigDict()
    c.training.num_steps = 50_000  # updates of each model
    c.training.log_every = 50  # updates between training-loss summaries
    c.training.test_every = 1_000  # updates between test losses and sampled videos in TensorBoard
    c.training.test_batches = 8  # batches of test episodes per test loss
    c.training.video_rows = 4  # test segments per video
    c.training.video_steps = 32  # frames each video imagines after its real context

    c.checkpoint = config_dict.ConfigDict()
    c.checkpoint.every_steps = 5_000  # updates between checkpoints
    c.checkpoint.every_minutes = 20.0  # ...and at least this often (0 = only every_steps)
    c.checkpoint.keep = 2  # checkpoints kept on disk

    if presets.upsampler:
        c.upsampler.enabled = True
    if presets.debug:
        shrink_for_debug(c)
    return c


def shrink_for_debug(c: config_dict.ConfigDict) -> None:
    """Tiny models and a short schedule: a whole run in seconds on a CPU."""
    c.resolution = (16, 16)
    for name in ("denoiser", "upsampler"):
        m = c[name]
        m.inner_model.cond_channels = 16
        m.inner_model.depths = (1, 1)
        m.inner_model.channels = (8, 8)
        m.inner_model.attn_depths = (0, 0)
        m.training.batch_size = 4
        m.training.lr_warmup_steps = 2
    c.denoiser.inner_model.num_steps_conditioning = 2
    c.denoiser.cross_attention.levels = (0, 1)
    c.denoiser.cross_attention.heads = 2
    c.denoiser.cross_attention.channels = (8, 8)
    c.training.num_steps = 6
    c.training.log_every = 2
    c.training.test_every = 3
    c.training.test_batches = 1
    c.training.video_rows = 2
    c.training.video_steps = 3
    c.checkpoint.every_steps = 4
    c.autoencoder.encode_batch = 8
