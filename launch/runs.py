"""The run-state model of a sweep: a run (game, seed, directory, command), what its directory says about it,
starting it and reading its exit status. The launchers (launch/sweep.py, launch/slurm.py) build on it."""

import collections
import dataclasses
import datetime
import os
import shlex
import signal
import subprocess
import sys
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

from diamond_jax.exit_codes import EXIT_PREEMPTED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = "configs/atari100k.py"  # relative to REPO, where runs start
# The run's entry point. Tests put in its place a stand-in that takes the same arguments and exits the same way.
DIAMOND_MAIN = (sys.executable, "-m", "diamond_jax.main")
LOG_FILE, FAILED_FILE, RESULTS_FILE = "log.txt", "failed.txt", "results.json"

# What a run directory says about its run.
DONE, QUEUED, FAILED, RESUME, NEW = "done", "queued", "failed before", "resume", "new"


class LaunchError(Exception):
    """Reported as `error: <message>`, exit status 1; the message says what to do."""


class BadInput(LaunchError):
    """A flag that cannot work; exit status 2."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One job of a sweep: a game and its seed (or, with --seeds_per_process, a group of seeds trained in one
    process), its run directory and the command that starts, or resumes, it there."""

    game: str
    seeds: Tuple[int, ...]
    workdir: str
    command: Tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.game}-{'_'.join(map(str, self.seeds))}"

    @property
    def is_group(self) -> bool:
        return len(self.seeds) > 1

    def path(self, filename: str) -> str:
        return os.path.join(self.workdir, filename)

    def seed_dirs(self) -> List[str]:
        """Where each seed's run lives: the run directory, or a group's seed_<s> directories."""
        if not self.is_group:
            return [self.workdir]
        return [os.path.join(self.workdir, f"seed_{s}") for s in self.seeds]

    def results_paths(self) -> List[str]:
        return [os.path.join(d, RESULTS_FILE) for d in self.seed_dirs()]

    def finished(self) -> bool:
        return all(os.path.exists(p) for p in self.results_paths())

    def shell_command(self) -> str:
        """The command as a person would type it."""
        return f"cd {shlex.quote(REPO)} && {shlex.join(self.command)}"


def plan(games: Sequence[str], seeds: Sequence[int], root: str, preset: Optional[str] = None,
         overrides: Sequence[str] = (), program: Sequence[str] = DIAMOND_MAIN, seeds_per_process: int = 1
         ) -> List[Run]:
    """Every (game, seed), seed after seed: the first seed of every game comes first, so that a sweep cut short
    still covers the whole benchmark. `overrides` are --config.<key>=<value> arguments. With seeds_per_process
    N > 1, consecutive seeds go N by N into one job (--config.seeds), the run <Game>-<s1>_<s2>_... whose seeds
    live in its seed_<s> directories."""
    groups = [tuple(seeds[i:i + seeds_per_process]) for i in range(0, len(seeds), seeds_per_process)]
    runs = []
    for group in groups:
        for game in games:
            workdir = os.path.join(root, f"{game}-{'_'.join(map(str, group))}")
            presets = ",".join([f"game={game}"] + ([preset] if preset else []))
            seed_flag = f"--config.seeds={','.join(map(str, group))}" if len(group) > 1 else f"--config.seed={group[0]}"
            command = (*program, f"--config={CONFIG_FILE}:{presets}", seed_flag, f"--workdir={workdir}", *overrides)
            runs.append(Run(game, group, workdir, command))
    return runs


def state(run: Run, queued: FrozenSet[str] = frozenset()) -> str:
    """`queued`: names of runs whose SLURM job is still pending or running."""
    if run.finished():  # a group: every seed (it resumes the others alone and skips the finished ones)
        return DONE
    if run.name in queued:
        return QUEUED
    if os.path.exists(run.path(FAILED_FILE)):
        return FAILED
    if any(os.path.isdir(os.path.join(d, "checkpoints")) and os.listdir(os.path.join(d, "checkpoints"))
           for d in run.seed_dirs()):
        return RESUME
    return NEW


def start(run: Run, env: Optional[Dict[str, str]] = None, **popen_kwargs) -> subprocess.Popen:
    """Starts (or resumes) a run, its output appended to <workdir>/log.txt."""
    os.makedirs(run.workdir, exist_ok=True)
    if os.path.exists(run.path(FAILED_FILE)):
        os.remove(run.path(FAILED_FILE))
    with open(run.path(LOG_FILE), "a") as log:
        log.write(f"\n===== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} launch.sweep: {run.shell_command()}\n")
        log.flush()
        return subprocess.Popen(run.command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, **popen_kwargs)


def record_exit(run: Run, code: int) -> str:
    """DONE, RESUME (the run saved and stopped: start it again) or FAILED, which <workdir>/failed.txt records."""
    if code == 0 and run.finished():
        return DONE
    # A SIGTERM that comes while the run starts, before it handles SIGTERM, kills it; it had done nothing yet
    # since its last checkpoint.
    if code in (EXIT_PREEMPTED, -signal.SIGTERM):
        return RESUME
    with open(run.path(FAILED_FILE), "w") as f:
        f.write(f"exit status {code} at {datetime.datetime.now():%Y-%m-%d %H:%M:%S}; its output is in {LOG_FILE}\n")
    return FAILED


def failure_message(run: Run, code: int, num_lines: int = 30) -> str:
    with open(run.path(LOG_FILE), errors="replace") as f:
        tail = "".join(collections.deque(f, maxlen=num_lines))
    if code == 0:
        return f"{run.name} exited with status 0 but wrote no {RESULTS_FILE}. The end of {run.path(LOG_FILE)}:\n{tail}"
    return f"{run.name} failed with exit status {code}. The end of {run.path(LOG_FILE)}:\n{tail}"
