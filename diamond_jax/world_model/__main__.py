"""Trains a diffusion world model on a dataset of recorded play (python -m diamond_jax.dataset makes one).

    python -m diamond_jax.world_model --config=configs/world_model.py --dataset=data/pong --workdir=runs/wm-pong
    python -m diamond_jax.world_model ... --config.denoiser.space=latent --config.autoencoder.path=A --prepare_only

Starting in a --workdir that holds a run resumes it. Exit status: 0 when training is complete (results.json
written), 75 when it saved a checkpoint and stopped on SIGTERM or Ctrl-C (run the same command again to
resume), 130 when a second Ctrl-C quit without saving, 2 for bad input (config, dataset, workdir), 1 for a
failure during training (a non-finite loss, a full disk).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diamond_jax import cli
from diamond_jax.exit_codes import EXIT_BAD_INPUT

CONFIG_FILE = "configs/world_model.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"Config file, with presets after ':' (upsampler, debug), e.g. {CONFIG_FILE}:upsampler. "
    "Override any field with --config.<field>=<value>.", lock_config=True)
_DATASET = flags.DEFINE_string("dataset", None, "A dataset of recorded play (python -m diamond_jax.dataset).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config snapshot, checkpoints, TensorBoard logs and results.json. A directory "
    "that holds a run is resumed.")
_PREPARE = flags.DEFINE_bool(
    "prepare_only", False, "Prepare the run and stop before training: with --config.denoiser.space=latent, encode "
    "the dataset into <workdir>/latents.npz and measure sigma_data (latent.json), once; the same command without "
    "this flag then trains from them.")
_PLATFORM, _CPU_DEVICES = cli.define_device_flags()
flags.adopt_module_key_flags(cli)  # --help lists them with this module's own flags


def main(argv) -> None:
    cli.start(argv, _PLATFORM)
    import jax  # after the platform choice above

    from diamond_jax.config import ConfigError
    from diamond_jax.data.recorded import DatasetError
    from diamond_jax.training import parallel
    from diamond_jax.world_model import config as wm_config
    from diamond_jax.world_model.train import WorldModelTrainer

    parallel.use_cpu_devices(_CPU_DEVICES.value)
    cli.check_platform()
    config = _CONFIG.value
    try:
        wm_config.validate(config)
        trainer = WorldModelTrainer(config, _DATASET.value, _WORKDIR.value)
    except (ConfigError, DatasetError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    logging.info("Training on %s (%d train / %d test episodes, frames %s, %s actions) with %d %s device(s)",
                 trainer.dataset.path, len(trainer.dataset.episode_ids("train")),
                 len(trainer.dataset.episode_ids("test")), trainer.dataset.frame_shape, trainer.dataset.action.kind,
                 trainer.mesh.size, jax.devices()[0].platform)
    if _PREPARE.value:
        trainer.close()
        logging.info("Prepared %s; run the same command without --prepare_only to train.", _WORKDIR.value)
        return
    results = cli.run_trainer(trainer, _WORKDIR.value)
    logging.info("Done: %d updates, test losses %s (%s)", results["steps"], results["test_loss"],
                 os.path.join(_WORKDIR.value, "results.json"))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "dataset", "workdir"])
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, CONFIG_FILE))
