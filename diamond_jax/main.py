"""Trains DIAMOND on one Atari 100k game.

    python -m diamond_jax.main --config=configs/atari100k.py:game=Pong --config.seed=3 --workdir=runs/Pong-3

Starting in a --workdir that holds a run resumes it. Exit status: 0 when the run is complete (results.json
written), 75 when it saved a checkpoint and stopped on SIGTERM (run the same command again to resume),
2 for bad input (config, workdir), 1 for a failure during training (e.g. a non-finite loss).
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diamond_jax.config import CPU_DEVICES_HELP
from diamond_jax.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_PREEMPTED

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, with presets after ':' (game=<Name>, debug), e.g. configs/atari100k.py:game=Pong. "
    "Override any field with --config.<field>=<value>.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config snapshot, checkpoints, replay data, TensorBoard logs, evaluations and "
    "results.json. A directory that holds a run is resumed.")
_PLATFORM = flags.DEFINE_enum(
    "platform", None, ["cpu", "cuda", "rocm", "tpu"], "Platform for JAX (default: the best one available).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, CPU_DEVICES_HELP, lower_bound=1)


def _initialize_distributed() -> None:
    """Multi-host clusters: jax.distributed reads the cluster from the environment (SLURM, or
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
    import jax

    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def _parse_flags(argv):
    """absl's parsing, with config errors (an unknown field, a bad preset) reported without a traceback."""
    from diamond_jax.config import ConfigError

    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        # ml_collections reports an error raised in the config file as the text of its traceback.
        raised = re.search(rf"{ConfigError.__module__}\.ConfigError: (.*)", str(error))
        print(f"error: {raised.group(1) if raised else error}\nPass --help to see the flags.", file=sys.stderr)
    except (AttributeError, KeyError) as error:
        overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        hint = re.search(r'Did you mean "(\w+)"', str(error))
        hint = f' (did you mean "{hint.group(1)}"?)' if hint else ""
        print(f"error: unknown config field in {' '.join(overrides)}{hint}. Fix: use a field of the config file "
              "(each is listed with a comment in configs/atari100k.py).", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _quiet_orbax(record) -> bool:
    """orbax logs every step of every save at INFO; keep its warnings and errors only."""
    return "orbax" not in record.pathname or record.levelno >= 30


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_quiet_orbax)
    if _PLATFORM.value:
        os.environ["JAX_PLATFORMS"] = _PLATFORM.value
    # Imported here so that the platform choice above is made before JAX starts.
    from diamond_jax import config as config_lib
    from diamond_jax.training import parallel
    from diamond_jax.training.loop import NonFiniteLoss, Preempted, Trainer

    parallel.use_cpu_devices(_CPU_DEVICES.value)
    _initialize_distributed()
    config = _CONFIG.value
    try:
        config_lib.validate(config)
        trainer = Trainer(config, _WORKDIR.value)
    except (config_lib.ConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    try:
        results = trainer.run()
    except Preempted as stop:
        logging.warning("Pre-empted: %s. Run the same command to resume.", stop)
        sys.exit(EXIT_PREEMPTED)
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    logging.info("Done: mean return %.2f over %d test episodes, human-normalised score %.3f (%s)",
                 results["mean_return"], len(results["returns"]), results["human_normalized_score"],
                 os.path.join(_WORKDIR.value, "results.json"))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)
