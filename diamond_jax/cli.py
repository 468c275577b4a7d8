"""What the entry points that train (main, world_model) share: flag parsing that reports config errors in one
line, the log above the progress bars, the platform check, and running a trainer to its exit status."""

import os
import re
import shutil
import sys

from absl import flags, logging

from diamond_jax.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PREEMPTED


def define_device_flags():
    """--platform and --cpu_devices, the flags of the entry points that train; returns their holders."""
    from diamond_jax.config import CPU_DEVICES_HELP

    platform = flags.DEFINE_enum("platform", None, ["cpu", "cuda", "rocm", "tpu"],
                                 "Platform for JAX (default: the best one available).")
    return platform, flags.DEFINE_integer("cpu_devices", None, CPU_DEVICES_HELP, lower_bound=1)


def start(argv, platform: "flags.FlagHolder") -> None:
    """Before JAX starts: refuses positional arguments, puts the log above the bars and picks the platform."""
    if len(argv) > 1:
        print(f"error: unexpected argument(s) {' '.join(argv[1:])}. Flags take the form --name=value; pass --help "
              "to see them.", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    setup_logging()
    if platform.value:
        os.environ["JAX_PLATFORMS"] = platform.value


def setup_logging() -> None:
    """absl's log above tqdm's bars, without orbax's INFO lines."""
    logging.get_absl_handler().addFilter(quiet_orbax)
    logging.get_absl_handler().python_handler.stream = AboveBars()


HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")
# What to install for each platform: JAX's own builds, through this package's extras (setup.py).
INSTALL = {"cuda": 'pip install -e ".[cuda12]" (CUDA 12; ".[cuda13]" for CUDA 13)',
           "tpu": 'pip install -e ".[tpu]"',
           "rocm": 'pip install -e ".[rocm]" (with ROCm 7 installed on the machine)',
           "cpu": "pip install -e ."}


def parse_flags(argv, config_file: str = "configs/atari100k.py"):
    """absl's parsing, with config errors (an unknown field, a bad preset) reported without a traceback."""
    from diamond_jax.config import ConfigError

    try:
        return flags.FLAGS(argv)
    except SystemExit:
        # absl prints the help asked for, then exits with status 1: asking for help is no failure.
        if any(a.lstrip("-").split("=")[0] in HELP_FLAGS for a in argv[1:] if a.startswith("-")):
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
              f"(each is listed with a comment in {config_file}).", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


class AboveBars:
    """The log's stream: each line goes above tqdm's progress bars instead of onto the end of a bar's line."""

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr, end="")

    def flush(self) -> None:
        sys.stderr.flush()

    def close(self) -> None:
        """logging closes its streams at exit; sys.stderr is not this one's to close."""


def quiet_orbax(record) -> bool:
    """orbax logs every step of every save at INFO; keep its warnings and errors only."""
    return "orbax" not in record.pathname or record.levelno >= 30


def check_platform() -> None:
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
              f"{INSTALL.get(platform, 'see the README')}; or drop --platform to use the best platform there is.",
              file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def report_disk_full(error: OSError, workdir: str) -> None:
    path = os.fsdecode(error.filename) if error.filename else workdir
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    print(f"error: no space left on the device writing {path} ({free / 2 ** 20:.1f} MiB free on its file system). "
          "The run stopped; its last complete checkpoint is kept. Fix: free some space there, or move --workdir "
          "to a larger disk, then run the same command to resume.", file=sys.stderr)


def run_trainer(trainer, workdir: str):
    """trainer.run()'s results, or the exit status of how it stopped: 75 after a stop that saved (SIGTERM, a first
    Ctrl-C), 1 for a non-finite loss or a full disk (reported in one line), 130 for a second Ctrl-C."""
    from diamond_jax.training.checkpoint import disk_full
    from diamond_jax.training.loop import NonFiniteLoss, Preempted

    try:
        return trainer.run()
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
        report_disk_full(full, os.path.abspath(workdir))
        # Without space, every writer still open fails again at exit (TensorBoard's, orbax's pending tasks),
        # each with a traceback that would bury the line above; there is nothing left to save.
        sys.stderr.flush()
        os._exit(1)
