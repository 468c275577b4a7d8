"""Sweeps of the Atari 100k benchmark: one DIAMOND run per (game, seed), on a SLURM cluster or on this machine.

    python -m launch.sweep --games=all --seeds=5 --root=runs/atari100k --launcher=slurm --partition=gpu
    python -m launch.sweep --games=Pong,Breakout --seeds=1 --root=runs/smoke --preset=debug --launcher=local

Run <Game>-<seed> lives in <root>/<Game>-<seed> and is diamond_jax.main with that --workdir, so launching a sweep
again skips the runs that finished (results.json) and resumes the others from their checkpoints. With
--seeds_per_process=N, N seeds of a game train in one process (--config.seeds): run <Game>-<s1>_..._<sN>, each
seed in its seed_<s> directory; the group is done when every seed is, and a resumed group skips its finished
seeds. The SLURM side
(submitit) is in launch/slurm.py, the run-state model both use in launch/runs.py.

Exit status: 0 when every run is done (local) or submitted (slurm), 1 when a run failed, 2 for bad input, 75 when
the local launcher was stopped (its runs saved; launch again to resume them).
"""

import argparse
import collections
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from absl import flags as absl_flags
from ml_collections import config_dict, config_flags

from configs import atari100k
from diamond_jax import config as config_lib
from diamond_jax.envs.games import ATARI_100K_GAMES
from diamond_jax.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_PREEMPTED
from launch.runs import (CONFIG_FILE, DONE, FAILED, LOG_FILE, NEW, QUEUED, RESULTS_FILE, RESUME, BadInput, LaunchError,
                         Run, failure_message, plan, record_exit, start, state)

POLL_S = 1.0  # how often the local launcher looks at its runs


# ---- Flags.

def parse_games(text: str) -> Tuple[str, ...]:
    if text.strip() == "all":
        return ATARI_100K_GAMES
    games = tuple(dict.fromkeys(g.strip() for g in text.split(",") if g.strip()))
    unknown = [g for g in games if g not in ATARI_100K_GAMES]
    if unknown or not games:
        by_lower = {g.lower(): g for g in ATARI_100K_GAMES}
        hints = [f"{g} -> {by_lower[g.lower()]}" for g in unknown if g.lower() in by_lower]
        raise BadInput(
            f"--games={text!r}: {', '.join(unknown) or 'no game given'} "
            f"{'is not an Atari 100k game' if len(unknown) == 1 else 'are not Atari 100k games'}"
            f"{' (names are case-sensitive: ' + ', '.join(hints) + ')' if hints else ''}. The 26 games: "
            f"{', '.join(ATARI_100K_GAMES)}. Fix: --games=all, or some of these names, e.g. --games=Pong,Breakout.")
    return games


def parse_seeds(text: str) -> Tuple[int, ...]:
    """'5' means seeds 0 to 4; a comma-separated list ('0,3,7', or '3,' for seed 3 alone) means those seeds."""
    fix = ("Fix: --seeds=5 for seeds 0 to 4, or a comma-separated list of seeds >= 0 such as --seeds=0,3,7 "
           "(--seeds=3, for seed 3 alone).")
    items = [s.strip() for s in text.split(",")]
    if len(items) == 1:
        if not items[0].isdigit() or int(items[0]) < 1:
            raise BadInput(f"--seeds={text!r} is not a number of seeds >= 1. {fix}")
        return tuple(range(int(items[0])))
    items = [s for s in items if s]
    if not items or not all(s.isdigit() for s in items):
        raise BadInput(f"--seeds={text!r}: seeds are integers >= 0. {fix}")
    seeds = tuple(int(s) for s in items)
    if len(set(seeds)) < len(seeds):
        raise BadInput(f"--seeds={text!r} names a seed twice. {fix}")
    return seeds


def _has_field(config: config_dict.ConfigDict, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not isinstance(node, config_dict.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def parse_overrides(items: Sequence[str], preset: Optional[str]) -> Tuple[str, ...]:
    """`key=value` -> `--config.key=value`, once the config is known to have the field and to accept the values
    as diamond_jax.main parses and checks them: a bad value would otherwise fail every run of the sweep, on the
    cluster, one by one."""
    config = atari100k.get_config(preset or "")
    for item in items:
        key, equals, _ = item.partition("=")
        if not equals or not key:
            raise BadInput(f"--config_override={item!r} is not key=value. Fix: e.g. "
                           "--config_override=training.num_final_epochs=10")
        if key in ("game", "seed", "seeds"):
            raise BadInput(f"--config_override={item!r}: the sweep sets {key} for each run. Fix: use "
                           f"--{key.rstrip('s')}s (and --seeds_per_process).")
        if not _has_field(config, key):
            raise BadInput(f"--config_override={item!r}: the config has no field {key!r}. Fix: use a field of "
                           f"{CONFIG_FILE}, e.g. --config_override=training.num_final_epochs=10")
    overrides = tuple(f"--config.{item}" for item in items)
    # The runs' own parser (the value's type from the config's field) and checks, on a flag set of its own.
    argv = ["launch.sweep", f"--config={CONFIG_FILE}:{preset or ''}", *overrides]
    parsed = absl_flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=parsed, lock_config=True, sys_argv=argv)
    try:
        parsed(argv)
        config_lib.validate(parsed.config)
    except (absl_flags.Error, config_lib.ConfigError, ValueError, TypeError) as error:
        raise BadInput(f"--config_override: {str(error).splitlines()[0]}") from error
    return overrides


def check_root(root: str) -> str:
    """The absolute root, once this user can create it or write in it (a dry run must create nothing)."""
    path = existing = os.path.abspath(root)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        why = "a file, not a directory" if not os.path.isdir(existing) else "not writable by this user"
        raise BadInput(f"--root={root} is not writable ({existing} is {why}). Fix: pick a directory you can "
                       "write to, e.g. --root=runs/atari100k.")
    return path


# ---- Presenting the runs.

def summary(root: str, runs: Sequence[Run], states: Sequence[str]) -> str:
    n = collections.Counter(states)
    text = f"Sweep of {len(runs)} runs in {root}: {n[DONE]} done, "
    if n[QUEUED]:
        text += f"{n[QUEUED]} queued or running on SLURM, "
    text += (f"{n[NEW] + n[RESUME] + n[FAILED]} to run ({n[NEW]} new, {n[RESUME]} to resume, "
             f"{n[FAILED]} failed before).")
    failed = [run.name for run, s in zip(runs, states) if s == FAILED]
    if failed:
        text += f"\nFailed before, run again (their {LOG_FILE} says why): {', '.join(failed)}"
    return text


def describe(runs: Sequence[Run], states: Sequence[str]) -> str:
    lines = []
    for run, s in zip(runs, states):
        lines.append(f"  {run.name:<18}{s}")
        if s not in (DONE, QUEUED):
            lines.append(f"      {run.shell_command()}")
    return "\n".join(lines)


# ---- The local launcher.

def visible_gpus() -> List[str]:
    """Ids of this machine's GPUs, as CUDA_VISIBLE_DEVICES takes them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and not d.strip().startswith("-")]
    # JAX asked in a process of its own: JAX in this one would hold memory on every GPU while the runs need it.
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; print(*(d.id for d in jax.local_devices() if d.platform == 'gpu'))"],
        capture_output=True, text=True)
    return probe.stdout.split() if probe.returncode == 0 else []


def local_slots(max_parallel: Optional[int]) -> List[Optional[str]]:
    """Where runs go: one GPU id per run at a time, or on a machine without GPUs `max_parallel` (default 1)
    runs sharing the CPU (None)."""
    gpus = visible_gpus()
    if not gpus:
        return [None] * (max_parallel or 1)
    if max_parallel and max_parallel > len(gpus):
        raise BadInput(f"--max_parallel={max_parallel}, but this machine shows {len(gpus)} GPUs ({','.join(gpus)}); "
                       f"each run takes one. Fix: --max_parallel={len(gpus)} or less.")
    return gpus[:max_parallel or len(gpus)]


class LocalLauncher:
    """Runs a sweep on this machine, one run per slot (a GPU id, or None for a share of the CPU) at a time.

    A run that stops to resume (exit 75) is started again. SIGINT or SIGTERM asks every running run to save and
    stop (SIGTERM); the launcher then waits for them and returns 75. Runs start in sessions of their own, so that
    Ctrl-C in a terminal reaches the launcher alone.
    """

    def __init__(self, runs: Sequence[Run], slots: Sequence[Optional[str]]):
        self.pending = collections.deque(runs)
        self.slots = list(slots)
        self.running: Dict[int, Tuple[Run, subprocess.Popen]] = {}
        self.done: List[Run] = []
        self.failed: List[Run] = []
        self.stopped: List[Run] = []
        self.stopping = False

    def launch(self) -> int:
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        announced = False
        try:
            while self.running or (self.pending and not self.stopping):
                self._fill_slots()
                time.sleep(POLL_S)
                if self.stopping and not announced:
                    announced = True
                    print(f"Stop requested: {len(self.running)} running runs save and stop; "
                          f"{len(self.pending)} runs not started.", flush=True)
                self._reap()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self._report()

    def _request_stop(self, *_) -> None:
        # A signal handler: no printing here, the main loop may be printing.
        self.stopping = True
        for _, process in list(self.running.values()):
            process.send_signal(signal.SIGTERM)

    def _fill_slots(self) -> None:
        for slot, device in enumerate(self.slots):
            if slot in self.running or not self.pending or self.stopping:
                continue
            run = self.pending.popleft()
            env = None if device is None else dict(os.environ, CUDA_VISIBLE_DEVICES=device)
            self.running[slot] = (run, start(run, env, start_new_session=True))
            if self.stopping:  # the stop came after the check above, before the handler could see this run
                self.running[slot][1].send_signal(signal.SIGTERM)
            where = "the CPU" if device is None else f"GPU {device}"
            print(f"Started {run.name} on {where} (log: {run.path(LOG_FILE)})", flush=True)

    def _reap(self) -> None:
        for slot, (run, process) in list(self.running.items()):
            code = process.poll()
            if code is None:
                continue
            del self.running[slot]
            outcome = record_exit(run, code)
            if outcome == DONE:
                self.done.append(run)
                print(f"Done: {run.name} ({run.path(RESULTS_FILE)})", flush=True)
            elif outcome == RESUME and self.stopping:
                self.stopped.append(run)
                print(f"Stopped: {run.name} saved; launch the sweep again to resume it.", flush=True)
            elif outcome == RESUME:
                self.pending.appendleft(run)
                print(f"{run.name} stopped to resume (exit status {code}): starting it again.", flush=True)
            else:
                self.failed.append(run)
                print(f"FAILED: {failure_message(run, code)}", file=sys.stderr, flush=True)

    def _report(self) -> int:
        not_started = len(self.pending) if self.stopping else 0
        print(f"Local sweep: {len(self.done)} done, {len(self.failed)} failed, {len(self.stopped)} stopped, "
              f"{not_started} not started.", flush=True)
        if self.failed:
            print(f"Failed: {', '.join(r.name for r in self.failed)}. Their {LOG_FILE} says why; launching the "
                  "sweep again runs them again.", file=sys.stderr, flush=True)
            return EXIT_FAILED
        return EXIT_PREEMPTED if self.stopped or not_started else 0


# ---- Command line.

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.sweep", description=__doc__.split("\n\n")[0],
        epilog="Launching the same sweep again skips finished runs and resumes the others. See launch/README.md.")
    p.add_argument("--games", required=True,
                   help="'all' (the 26 Atari 100k games) or comma-separated names, e.g. Pong,Breakout.")
    p.add_argument("--seeds", required=True,
                   help="N for seeds 0 to N-1, or comma-separated seeds, e.g. 0,3,7 ('3,' for seed 3 alone).")
    p.add_argument("--seeds_per_process", type=int, default=1,
                   help="Seeds of a game trained together in one process (one job, one GPU), every model vmapped "
                        "over them: the run <Game>-<s1>_<s2>_... with a seed_<s> directory per seed "
                        "(default: %(default)s, one run per seed).")
    p.add_argument("--root", default="runs/atari100k",
                   help="Directory of the sweep; run <Game>-<seed> lives in <root>/<Game>-<seed> "
                        "(default: %(default)s).")
    p.add_argument("--preset", choices=["debug"],
                   help=f"Config preset added to game=<Game> in {CONFIG_FILE}: debug = tiny models and schedule.")
    p.add_argument("--config_override", action="append", default=[], metavar="KEY=VALUE",
                   help="Passed to every run as --config.KEY=VALUE; repeat the flag for several.")
    p.add_argument("--launcher", required=True, choices=["slurm", "local"],
                   help="slurm: one job per run (a job array, submitit), requeued after pre-emption or time limit "
                        "until the run is complete. local: runs on this machine; this command waits for them.")
    p.add_argument("--dry_run", action="store_true",
                   help="Print every run with its command (and for slurm the job resources); start nothing.")
    local = p.add_argument_group("local launcher")
    local.add_argument("--max_parallel", type=int,
                       help="Runs at once: each on its own GPU (default: one per GPU), or on a machine without GPUs "
                            "sharing the CPU (default: 1, one after another).")
    slurm = p.add_argument_group("slurm launcher (one run per job)")
    slurm.add_argument("--partition", help="SLURM partition (default: the cluster's).")
    slurm.add_argument("--gpus_per_run", type=int, default=1, help="GPUs of one node per run (default: %(default)s).")
    slurm.add_argument("--cpus_per_run", type=int, default=8, help="CPUs per run (default: %(default)s).")
    slurm.add_argument("--mem_gb", type=int, default=64, help="Memory per run in GB (default: %(default)s).")
    slurm.add_argument("--time_hours", type=float, default=24.0,
                       help="Time limit of one job; a run that needs longer is requeued and resumes "
                            "(default: %(default)s).")
    slurm.add_argument("--account", help="SLURM account to charge.")
    slurm.add_argument("--qos", help="SLURM quality of service.")
    slurm.add_argument("--constraint", help="SLURM node features, e.g. a GPU type.")
    slurm.add_argument("--array_parallelism", type=int, default=256,
                       help="At most this many runs of the job array at once (default: %(default)s).")
    slurm.add_argument("--signal_delay_s", type=int, default=180,
                       help="SLURM warns a job (USR2) this many seconds before its time limit; the run then "
                            "finishes its current compiled call, saves, and the job is requeued "
                            "(default: %(default)s, at least 60).")
    slurm.add_argument("--max_timeouts", type=int, default=10,
                       help="How many times a run may reach --time_hours and be requeued (pre-emptions do not "
                            "count) (default: %(default)s).")
    return p


def _check_numbers(args: argparse.Namespace) -> None:
    minimum = {"seeds_per_process": 1, "max_parallel": 1, "gpus_per_run": 1, "cpus_per_run": 1, "mem_gb": 1, "array_parallelism": 1,
               "signal_delay_s": 60, "max_timeouts": 0}
    for name, low in minimum.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise BadInput(f"--{name}={value} is below {low}. Fix: --{name}={low} or more.")
    if not args.time_hours > 0:
        raise BadInput(f"--time_hours={args.time_hours} must be > 0. Fix: e.g. --time_hours=24.")


def _import_slurm():
    try:
        from launch import slurm
    except ModuleNotFoundError as error:
        if error.name != "submitit":
            raise
        raise BadInput('--launcher=slurm needs submitit, which is not installed. Fix: pip install -e ".[sweep]"') \
            from error
    return slurm


def _launch(args: argparse.Namespace) -> int:
    _check_numbers(args)
    games, seeds = parse_games(args.games), parse_seeds(args.seeds)
    overrides = parse_overrides(args.config_override, args.preset)
    root = check_root(args.root)
    slurm = _import_slurm() if args.launcher == "slurm" else None
    runs = plan(games, seeds, root, args.preset, overrides, seeds_per_process=args.seeds_per_process)
    queued = slurm.queued(runs) if slurm else frozenset()
    states = [state(run, queued) for run in runs]
    to_run = [run for run, s in zip(runs, states) if s in (NEW, RESUME, FAILED)]
    print(summary(root, runs, states))
    if args.dry_run:
        print(describe(runs, states))
        if slurm:
            print(slurm.describe_resources(args, root, len(to_run)))
        print("Dry run: nothing was started.")
        return 0
    if not to_run:
        print("Nothing to run.")
        return 0
    if slurm:
        print(slurm.launch(args, root, to_run))
        return 0
    return LocalLauncher(to_run, local_slots(args.max_parallel)).launch()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _launch(args)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(error, BadInput) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
