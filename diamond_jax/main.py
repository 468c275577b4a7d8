"""Trains DIAMOND on one game: Atari 100k (configs/atari100k.py), or Catch and MinAtar (configs/minatar.py).

    python -m diamond_jax.main --config=configs/atari100k.py:game=Pong --config.seed=3 --workdir=runs/Pong-3
    python -m diamond_jax.main --config=configs/atari100k.py:game=Pong --config.seeds=0,1,2,3,4 --workdir=runs/Pong

With --config.seeds, the seeds train as one group in this process (training/group.py), each a run of its own
in <workdir>/seed_<s>.

Starting in a --workdir that holds a run resumes it. Exit status: 0 when the run is complete (results.json
written), 75 when it saved a checkpoint and stopped on SIGTERM or Ctrl-C (run the same command again to
resume), 130 when a second Ctrl-C quit without saving, 2 for bad input (config, workdir, a workdir another run
holds, a platform JAX cannot use), 1 for a failure during training (e.g. a non-finite loss, a full disk).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diamond_jax import cli
from diamond_jax.exit_codes import EXIT_BAD_INPUT

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, with presets after ':' (game=<Name>, debug), e.g. configs/atari100k.py:game=Pong. "
    "Override any field with --config.<field>=<value>.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config snapshot, checkpoints, replay data, TensorBoard logs, evaluations and "
    "results.json. A directory that holds a run is resumed.")
_PLATFORM, _CPU_DEVICES = cli.define_device_flags()
flags.adopt_module_key_flags(cli)  # --help lists them with this module's own flags
def main(argv) -> None:
    cli.start(argv, _PLATFORM)
    # Imported here so that the platform choice above is made before JAX starts.
    import jax

    from diamond_jax import config as config_lib
    from diamond_jax import envs
    from diamond_jax.training import parallel
    from diamond_jax.training.group import GroupTrainer
    from diamond_jax.training.loop import Trainer

    parallel.use_cpu_devices(_CPU_DEVICES.value)
    try:
        if parallel.initialize_distributed():
            logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    cli.check_platform()
    config = _CONFIG.value
    try:
        config_lib.validate(config)
        envs.check_env_config(config)  # the game and frame size, before the workdir is touched
        trainer = GroupTrainer(config, _WORKDIR.value) if config.get("seeds") else Trainer(config, _WORKDIR.value)
    except (config_lib.ConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    devices = trainer.mesh.devices.flat
    logging.info("This run uses %d of the %d %s device(s) JAX sees: %s", trainer.mesh.size, len(jax.devices()),
                 devices[0].platform, ", ".join(map(str, devices)))
    results = cli.run_trainer(trainer, _WORKDIR.value)
    if isinstance(trainer, GroupTrainer):
        for seed, seed_results in results.items():
            _log_results(seed_results, os.path.join(_WORKDIR.value, f"seed_{seed}", "results.json"))
    else:
        _log_results(results, os.path.join(_WORKDIR.value, "results.json"))


def _log_results(results, path: str) -> None:
    # Only an Atari run has a paper to differ from; a MinAtar run's config is its own benchmark's.
    differ = results.get("differs_from_paper", []) if "human_normalized_score" in results else []
    score = ("human-normalised score" if "human_normalized_score" in results else "return above the random "
             "policy's")
    logging.info("Done: mean return %.2f over %d test episodes, %s %.3f%s (%s)", results["mean_return"],
                 len(results["returns"]), score, results["normalized_score"],
                 f", NOT a result: the config differs from the paper's in {len(differ)} field(s) "
                 f"({', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''})" if differ else "", path)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=cli.parse_flags)
