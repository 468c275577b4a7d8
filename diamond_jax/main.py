"""Trains DIAMOND on one game: Atari 100k (configs/atari100k.py), or Catch and MinAtar (configs/minatar.py).

    python -m diamond_jax.main --config=configs/atari100k.py:game=Pong --config.seed=3 --workdir=runs/Pong-3

Starting in a --workdir that holds a run resumes it. Exit status: 0 when the run is complete (results.json
written), 75 when it saved a checkpoint and stopped on SIGTERM or Ctrl-C (run the same command again to
resume), 130 when a second Ctrl-C quit without saving, 2 for bad input (config, workdir, a workdir another run
holds, a platform JAX cannot use), 1 for a failure during training (e.g. a non-finite loss, a full disk).
"""

import os
import re
import shutil
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diamond_jax.config import CPU_DEVICES_HELP
from diamond_jax.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PREEMPTED

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, with presets after ':' (game=<Name>, debug), e.g. configs/atari100k.py:game=Pong. "
    "Override any field with --config.<field>=<value>.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config snapshot, checkpoints, replay data, TensorBoard logs, evaluations and "
    "results.json. A directory that holds a run is resumed.")
_PLATFORM = flags.DEFINE_enum(
    "platform", None, ["cpu", "cuda", "rocm", "tpu"], "Platform for JAX (default: the best one available).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, CPU_DEVICES_HELP, lower_bound=1)
_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")
# What to install for each platform: JAX's own builds, through this package's extras (setup.py).
_INSTALL = {"cuda": 'pip install -e ".[cuda12]" (CUDA 12; ".[cuda13]" for CUDA 13)',
            "tpu": 'pip install -e ".[tpu]"',
            "rocm": 'pip install -e ".[rocm]" (with ROCm 7 installed on the machine)',
            "cpu": "pip install -e ."}


def _parse_flags(argv):
    """absl's parsing, with config errors (an unknown field, a bad preset) reported without a traceback."""
    from diamond_jax.config import ConfigError

    try:
        return flags.FLAGS(argv)
    except SystemExit:
        # absl prints the help asked for, then exits with status 1: asking for help is no failure.
        if any(a.lstrip("-").split("=")[0] in _HELP_FLAGS for a in argv[1:] if a.startswith("-")):
            sys.exit(0)
        raise
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


class _AboveBars:
    """The log's stream: each line goes above tqdm's progress bars instead of onto the end of a bar's line."""

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr, end="")

    def flush(self) -> None:
        sys.stderr.flush()

    def close(self) -> None:
        """logging closes its streams at exit; sys.stderr is not this one's to close."""


def _quiet_orbax(record) -> bool:
    """orbax logs every step of every save at INFO; keep its warnings and errors only."""
    return "orbax" not in record.pathname or record.levelno >= 30


def _check_platform() -> None:
    """Lists JAX's devices now, so that a platform JAX cannot use stops the run with the install that fixes it
    (JAX itself fails on first use, deep in the run, with an AssertionError)."""
    import jax

    platform = os.environ.get("JAX_PLATFORMS", "")
    try:
        jax.devices()
    except (RuntimeError, AssertionError) as error:
        cause = str(error).split("(set JAX_PLATFORMS")[0].strip() or "its jaxlib has no such backend"
        print(f"error: --platform={platform or '(JAX default)'}: JAX cannot use it ({cause}). Fix: install JAX's "
              f"{platform} build, "
              f"{_INSTALL.get(platform, 'see the README')}; or drop --platform to use the best platform there is.",
              file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _report_disk_full(error: OSError, workdir: str) -> None:
    path = os.fsdecode(error.filename) if error.filename else workdir
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    print(f"error: no space left on the device writing {path} ({free / 2 ** 20:.1f} MiB free on its file system). "
          "The run stopped; its last complete checkpoint is kept. Fix: free some space there, or move --workdir "
          "to a larger disk, then run the same command to resume.", file=sys.stderr)


def main(argv) -> None:
    if len(argv) > 1:
        print(f"error: unexpected argument(s) {' '.join(argv[1:])}. Flags take the form --name=value; pass --help "
              "to see them.", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    logging.get_absl_handler().addFilter(_quiet_orbax)
    logging.get_absl_handler().python_handler.stream = _AboveBars()
    if _PLATFORM.value:
        os.environ["JAX_PLATFORMS"] = _PLATFORM.value
    # Imported here so that the platform choice above is made before JAX starts.
    import jax

    from diamond_jax import config as config_lib
    from diamond_jax import envs
    from diamond_jax.training import parallel
    from diamond_jax.training.checkpoint import disk_full
    from diamond_jax.training.loop import NonFiniteLoss, Preempted, Trainer

    parallel.use_cpu_devices(_CPU_DEVICES.value)
    try:
        if parallel.initialize_distributed():
            logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    _check_platform()
    config = _CONFIG.value
    try:
        config_lib.validate(config)
        envs.check_env_config(config)  # the game and frame size, before the workdir is touched
        trainer = Trainer(config, _WORKDIR.value)
    except (config_lib.ConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    devices = trainer.mesh.devices.flat
    logging.info("This run uses %d of the %d %s device(s) JAX sees: %s", trainer.mesh.size, len(jax.devices()),
                 devices[0].platform, ", ".join(map(str, devices)))
    try:
        results = trainer.run()
    except Preempted as stop:
        logging.warning("Pre-empted: %s. Run the same command to resume.", stop)
        sys.exit(EXIT_PREEMPTED)
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:  # a second Ctrl-C: the user asked to quit without saving
        print("Quit without saving: run the same command to resume from the last checkpoint.", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as error:
        full = disk_full(error)
        if full is None:
            raise
        _report_disk_full(full, os.path.abspath(_WORKDIR.value))
        # Without space, every writer still open fails again at exit (TensorBoard's, orbax's pending tasks),
        # each with a traceback that would bury the line above; there is nothing left to save.
        sys.stderr.flush()
        os._exit(1)
    # Only an Atari run has a paper to differ from; a MinAtar run's config is its own benchmark's.
    differ = results.get("differs_from_paper", []) if "human_normalized_score" in results else []
    score = ("human-normalised score" if "human_normalized_score" in results else "return above the random "
             "policy's")
    logging.info("Done: mean return %.2f over %d test episodes, %s %.3f%s (%s)", results["mean_return"],
                 len(results["returns"]), score, results["normalized_score"],
                 f", NOT a result: the config differs from the paper's in {len(differ)} field(s) "
                 f"({', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''})" if differ else "",
                 os.path.join(_WORKDIR.value, "results.json"))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)
