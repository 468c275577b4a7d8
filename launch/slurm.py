"""The SLURM side of a sweep: every run is one job of a submitit job array, requeued until the run is complete.

Time limit: SLURM sends USR2 (submitit's signal) `--signal_delay_s` before the limit, to every process of the job.
The run ignores it; submitit's handler in the job calls SlurmRun.checkpoint(), which sends the run SIGTERM and
waits for it to save and exit (75), then submitit requeues the job with the resubmission that checkpoint()
returned: the same run, whose command resumes it from its checkpoint.
Pre-emption: SLURM's SIGTERM reaches the run directly (SlurmRun forwards it too); the run saves and exits 75, and
SlurmRun hands the job to the same submitit handler, which requeues it.
"""

import argparse
import getpass
import os
import signal
import subprocess
import sys
import threading
from typing import Any, Dict, FrozenSet, List, Sequence

import submitit

from launch.runs import (DONE, LOG_FILE, RESULTS_FILE, RESUME, BadInput, LaunchError, Run, failure_message, record_exit,
                         start)

JOB_ID_FILE = "slurm_job_id"  # in the run directory: the job that runs it, so that a second launch leaves it be
# checkpoint() must return, and submitit requeue the job, before SLURM's SIGTERM at the time limit.
REQUEUE_MARGIN_S = 30


class RunFailed(RuntimeError):
    """Raised in the job, so that submitit records the run as failed, with the end of its log."""


def preemption_signal() -> signal.Signals:
    """The signal with which SLURM warns the job, and for which submitit's requeue handler waits (USR2 unless
    SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    return signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


class SlurmRun(submitit.helpers.Checkpointable):
    """One run as a submitit job: runs its command as a child process until the run completes or fails."""

    def __init__(self, run: Run, signal_delay_s: int):
        self.run = run
        self.signal_delay_s = signal_delay_s
        self._process = None
        self._waiter = None

    def __getstate__(self) -> Dict[str, Any]:
        # What a requeued job needs: a child process does not outlive its job.
        return {"run": self.run, "signal_delay_s": self.signal_delay_s}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(**state)

    def __call__(self) -> str:
        warning = preemption_signal()
        previous = signal.signal(signal.SIGTERM, self._forward_sigterm)
        try:
            # SLURM's warning goes to every process of the job; only submitit's handler here may act on it.
            self._process = start(self.run, preexec_fn=lambda: signal.signal(warning, signal.SIG_IGN))
            # A thread waits for the run, so that checkpoint(), which runs in a signal handler of this thread
            # while it waits, can wait for the run too.
            self._waiter = threading.Thread(target=self._process.wait, daemon=True)
            self._waiter.start()
            self._waiter.join()
        finally:
            signal.signal(signal.SIGTERM, previous)
        code = self._process.returncode
        outcome = record_exit(self.run, code)
        if outcome == DONE:
            return self.run.path(RESULTS_FILE)
        if outcome == RESUME:
            self._requeue(warning)
            raise RunFailed(f"{self.run.name} stopped to resume (exit status {code}), but this job was not "
                            "requeued. Fix: launch the sweep again; it resumes the run.")
        raise RunFailed(failure_message(self.run, code))

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """submitit calls this on SLURM's warning, then requeues the job with what it returns: the run saves
        and stops first."""
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
            # Without a waiter yet, the run has only just started and has nothing to save.
            if self._waiter is not None:
                self._waiter.join(max(self.signal_delay_s - REQUEUE_MARGIN_S, 1))
                if self._waiter.is_alive():
                    print(f"{self.run.name} did not stop in time; the requeued job resumes it from its last "
                          "checkpoint.", file=sys.stderr, flush=True)
        return super().checkpoint(*args, **kwargs)

    def _forward_sigterm(self, *_) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGTERM)

    @staticmethod
    def _requeue(warning: signal.Signals) -> None:
        """Raises SLURM's warning here: submitit's handler for it requeues the job and exits. Outside a submitit
        job nothing handles it, and nothing happens."""
        if callable(signal.getsignal(warning)):
            signal.raise_signal(warning)


def job_name(root: str) -> str:
    return f"diamond-{os.path.basename(root)}"


def log_folder(root: str) -> str:
    return os.path.join(root, "slurm_logs", "%j")


def sbatch_parameters(args: argparse.Namespace, root: str) -> Dict[str, Any]:
    """SlurmExecutor's parameters (sbatch options): one run per job, on --gpus_per_run GPUs of one node."""
    parameters = dict(
        job_name=job_name(root), partition=args.partition, nodes=1, ntasks_per_node=1,
        gpus_per_node=args.gpus_per_run, cpus_per_task=args.cpus_per_run, mem=f"{args.mem_gb}GB",
        time=round(args.time_hours * 60), account=args.account, qos=args.qos, constraint=args.constraint,
        array_parallelism=args.array_parallelism, signal_delay_s=args.signal_delay_s)
    return {k: v for k, v in parameters.items() if v is not None}


def describe_resources(args: argparse.Namespace, root: str, num_jobs: int) -> str:
    options = " ".join(f"{k}={v}" for k, v in sbatch_parameters(args, root).items())
    return (f"SLURM: a job array of {num_jobs} jobs, one run each: {options} (time in minutes)\n"
            f"Logs of the jobs: {log_folder(root)}. A run reaching the time limit is requeued, at most "
            f"{args.max_timeouts} times.")


def queued(runs: Sequence[Run]) -> FrozenSet[str]:
    """Names of runs whose job (the one a launch recorded) is still pending or running."""
    recorded = {}
    for run in runs:
        if os.path.exists(run.path(JOB_ID_FILE)):
            with open(run.path(JOB_ID_FILE)) as f:
                recorded[f.read().strip()] = run.name
    if not recorded:
        return frozenset()
    try:
        listing = subprocess.run(["squeue", "--noheader", "--array", "--format=%i", f"--user={getpass.getuser()}"],
                                 capture_output=True, text=True, timeout=120)
    except FileNotFoundError:  # no SLURM on this machine, so nothing of it is queued
        return frozenset()
    if listing.returncode:
        raise LaunchError(f"squeue failed ({listing.stderr.strip()}), so the runs already queued are "
                                "unknown and could be submitted twice. Fix: try again when squeue answers.")
    return frozenset(name for job_id, name in recorded.items() if job_id in set(listing.stdout.split()))


def submit(runs: Sequence[Run], parameters: Dict[str, Any], folder: str, max_timeouts: int,
           signal_delay_s: int) -> List[submitit.Job]:
    """Submits the runs as one job array and records each job's id in its run directory."""
    try:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_timeouts)
    except RuntimeError as error:  # submitit found no srun
        raise BadInput(f"{error} Fix: launch from a machine of the SLURM cluster, or use --launcher=local.") \
            from error
    executor.update_parameters(**parameters)
    jobs = executor.submit_array([SlurmRun(run, signal_delay_s) for run in runs])
    for run, job in zip(runs, jobs):
        os.makedirs(run.workdir, exist_ok=True)
        with open(run.path(JOB_ID_FILE), "w") as f:
            f.write(job.job_id)
    return jobs


def launch(args: argparse.Namespace, root: str, runs: Sequence[Run]) -> str:
    """Submits the runs; returns what to tell the user."""
    jobs = submit(runs, sbatch_parameters(args, root), log_folder(root), args.max_timeouts, args.signal_delay_s)
    lines = [f"Submitted {len(jobs)} jobs (job name {job_name(root)}):"]
    lines += [f"  {job.job_id:<14}{run.name}" for run, job in zip(runs, jobs)]
    lines.append(f"Logs: each run's output in <run>/{LOG_FILE}; submitit's in "
                 f"{os.path.dirname(log_folder(root))}")
    return "\n".join(lines)
