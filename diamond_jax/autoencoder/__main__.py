"""Trains the autoencoder of latent world models on a dataset of recorded play (python -m diamond_jax.dataset).

    python -m diamond_jax.autoencoder --config=configs/autoencoder.py --dataset=data/breakout --workdir=runs/ae

Starting in a --workdir that holds a run resumes it. The autoencoder is exported to <workdir>/export at every
checkpoint; a latent world model reads it with --config.denoiser.space=latent --config.autoencoder.path=<workdir>.
Exit status: 0 when training is complete (results.json written), 75 when it saved a checkpoint and stopped on
SIGTERM or Ctrl-C (run the same command again to resume), 130 when a second Ctrl-C quit without saving, 2 for bad
input (config, dataset, workdir, LPIPS weights), 1 for a failure during training (a non-finite loss, a full disk).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diamond_jax import cli
from diamond_jax.exit_codes import EXIT_BAD_INPUT

CONFIG_FILE = "configs/autoencoder.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"Config file, with presets after ':' (debug), e.g. {CONFIG_FILE}:debug. Override any field "
    "with --config.<field>=<value>.", lock_config=True)
_DATASET = flags.DEFINE_string("dataset", None, "A dataset of recorded play (python -m diamond_jax.dataset).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config snapshot, checkpoints, the exported autoencoder (export/), TensorBoard "
    "logs and results.json. A directory that holds a run is resumed.")
_LPIPS = flags.DEFINE_string("lpips_weights", None, "LPIPS weights (.npz of python -m "
                             "diamond_jax.world_model.metric_weights), needed when config.loss.lpips_weight > 0.")
_PLATFORM, _CPU_DEVICES = cli.define_device_flags()
flags.adopt_module_key_flags(cli)  # --help lists them with this module's own flags


def main(argv) -> None:
    cli.start(argv, _PLATFORM)
    import jax  # after the platform choice above

    from diamond_jax.autoencoder import config as ae_config
    from diamond_jax.autoencoder.train import AutoencoderTrainer
    from diamond_jax.config import ConfigError
    from diamond_jax.data.recorded import DatasetError
    from diamond_jax.training import parallel

    parallel.use_cpu_devices(_CPU_DEVICES.value)
    cli.check_platform()
    config = _CONFIG.value
    try:
        ae_config.validate(config)
        trainer = AutoencoderTrainer(config, _DATASET.value, _WORKDIR.value, _LPIPS.value)
    except (ConfigError, DatasetError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    logging.info("Training an autoencoder on %s (frames %s -> %s, latents %s) with %d %s device(s)",
                 trainer.dataset.path, trainer.dataset.frame_shape, tuple(config.resolution),
                 trainer.autoencoder.latent_shape(tuple(config.resolution)), trainer.mesh.size,
                 jax.devices()[0].platform)
    results = cli.run_trainer(trainer, _WORKDIR.value)
    logging.info("Done: %d updates, test %s, scaling factor %.4f (%s)", results["steps"], results["test"],
                 results["scaling_factor"], os.path.join(_WORKDIR.value, "results.json"))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "dataset", "workdir"])
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, CONFIG_FILE))
