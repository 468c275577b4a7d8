"""A KL autoencoder of frames (Stable Diffusion's architecture family), trained on recorded play, for latent
world models.

    python -m diamond_jax.autoencoder --config=configs/autoencoder.py --dataset=data/breakout --workdir=runs/ae
    python -m diamond_jax.autoencoder --config=configs/autoencoder.py:debug --dataset=D --workdir=/tmp/ae

The trained autoencoder is written to <workdir>/export at every checkpoint; a latent world model reads it with
--config.denoiser.space=latent --config.autoencoder.path=<workdir>. Presets after ':': `debug` (a tiny model
and a short schedule for tests and CPU smoke runs). Any field can then be overridden with --config.<field>=...
"""

from ml_collections import config_dict

from diamond_jax.autoencoder import config as ae_config

PRESETS = ("debug",)


def get_config(arg: str = "") -> config_dict.ConfigDict:
    presets = ae_config.parse_presets(arg, PRESETS)
    c = config_dict.ConfigDict()
    c.seed = 0  # seeds initialisation, batch sampling and the posterior's noise
    c.num_devices = 0  # local devices to shard batches over; 0 = all of them
    # (height, width) of the frames it encodes: the dataset's frames are resized to it (antialiased, as the world
    # model's). A latent world model must draw at the same resolution. The downsampling factor must divide it.
    c.resolution = (128, 128)

    c.model = config_dict.ConfigDict()
    # Channels per level, diffusers' block_out_channels (SD's ch * ch_mult: SD 1.x is (128, 256, 512, 512)).
    # One level per entry; each level but the last halves the frame: downsampling 2^(len - 1), here 4.
    c.model.block_out_channels = (32, 64, 64)
    c.model.layers_per_block = 1  # residual blocks per encoder level (the decoder has one more); SD: 2
    c.model.latent_channels = 4  # channels of the latent; SD: 4
    c.model.norm_num_groups = 16  # GroupNorm groups; must divide every block_out_channels entry (SD: 32)
    c.model.mid_block_add_attention = True  # self-attention in the middle blocks (SD: True)
    # Latents are (mean - shift) * scaling_factor. 0 = measured at every export as 1 / the std of the posterior
    # means of `training.scaling_frames` training frames (SD's recipe for its 0.18215); > 0 = this value.
    c.model.scaling_factor = 0.0

    c.loss = config_dict.ConfigDict()
    c.loss.pixel = "l1"  # reconstruction loss per pixel: "l1" (SD's) or "l2"
    # KL to N(0, I), weighted as SD's autoencoder (kl_weight 1e-6 there): the KL summed over a frame's latent
    # elements, divided by the frame's pixel values (our losses are means over pixels where SD's are sums).
    c.loss.kl_weight = 1e-6
    # LPIPS (perceptual) loss weight, added per frame; > 0 needs --lpips_weights (README: "Metrics"). SD: 1.0.
    c.loss.lpips_weight = 0.0

    c.optimizer = config_dict.ConfigDict()
    c.optimizer.lr = 3e-4  # AdamW learning rate
    c.optimizer.weight_decay = 0.0  # AdamW weight decay (SD's autoencoder: Adam, none)
    c.optimizer.eps = 1e-8  # AdamW epsilon

    c.training = config_dict.ConfigDict()
    c.training.batch_size = 16  # frames per update
    c.training.num_steps = 20_000  # updates
    c.training.lr_warmup_steps = 100  # linear learning-rate warm-up from 0
    c.training.max_grad_norm = 1.0  # gradient clipping by global norm
    c.training.log_every = 50  # updates between training-loss summaries
    c.training.test_every = 1_000  # updates between test scores (loss, PSNR, SSIM) and reconstruction images
    c.training.test_frames = 64  # test-episode frames (fixed) scored at each test
    c.training.scaling_frames = 256  # training frames (fixed) whose latents measure scaling_factor

    c.checkpoint = config_dict.ConfigDict()
    c.checkpoint.every_steps = 1_000  # updates between checkpoints (and exports)
    c.checkpoint.every_minutes = 10.0  # ...and at least this often (0 = only every_steps)
    c.checkpoint.keep = 2  # checkpoints kept on disk

    if presets.debug:
        c.resolution = (16, 16)
        c.model.block_out_channels = (4, 8)
        c.model.norm_num_groups = 4
        c.training.batch_size = 4
        c.training.num_steps = 6
        c.training.lr_warmup_steps = 2
        c.training.log_every = 2
        c.training.test_every = 3
        c.training.test_frames = 4
        c.training.scaling_frames = 8
        c.checkpoint.every_steps = 4
    return c
