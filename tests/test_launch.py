"""Sweeps (launch/): the local launcher on real debug runs, restarts and stops, the SLURM submission through
submitit (a stand-in sbatch), requeueing through submitit's own handler, dry runs and bad input."""

import json
import os
import pickle
import signal
import sys
import threading
import time

import pytest
import submitit

import launch
from diamond_jax.envs.games import ATARI_100K_GAMES
from launch import slurm, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_RUN = '''\
"""Stands in for diamond_jax.main: the same arguments, the same exit statuses. $FAKE_RUN says what it does:
resume_once (exits 75, completes when started again), fail, or stop_on_sigterm (waits for SIGTERM, then
saves and exits 75; completes when started again)."""
import json, os, signal, sys

args = dict(a.split("=", 1) for a in sys.argv[1:])
workdir = args["--workdir"]
starts = os.path.join(workdir, "starts.jsonl")
with open(starts, "a") as f:
    f.write(json.dumps({"parent": os.getppid(), "argv": sys.argv[1:],
                        "usr2_ignored": signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN}) + "\\n")
with open(starts) as f:
    first = len(f.readlines()) == 1
mode = os.environ["FAKE_RUN"]
if mode == "fail":
    print("fake run: failing on purpose")
    sys.exit(1)
if first and mode == "resume_once":
    sys.exit(75)
if first and mode == "stop_on_sigterm":
    def save(*_):
        open(os.path.join(workdir, "saved"), "w").close()
        sys.exit(75)
    signal.signal(signal.SIGTERM, save)
    open(os.path.join(workdir, "waiting"), "w").close()
    while True:
        signal.pause()
with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"seed": int(args["--config.seed"])}, f)
'''

# A debug run made shorter still: 60 steps of initial collection, one epoch, one test episode.
SHORT_DEBUG = ["collection.train.num_steps_total=80", "collection.train.first_epoch.min=60",
               "collection.train.first_epoch.max=60", "training.num_final_epochs=0",
               "collection.test.num_final_episodes=1"]


@pytest.fixture
def fake_program(tmp_path):
    path = tmp_path / "fake_run.py"
    path.write_text(FAKE_RUN)
    return (sys.executable, str(path))


def starts(run):
    with open(run.path("starts.jsonl")) as f:
        return [json.loads(line) for line in f]


def wait_until(condition, what, limit_s=300):
    """A safety net against a hang, not a timing check."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.1)


# ---- Local launcher.

def test_local_launcher_runs_two_debug_runs_one_after_another_then_skips_them(tmp_path, capsys, monkeypatch):
    root = tmp_path / "sweep"
    argv = [f"--root={root}", "--games=Pong,Breakout", "--seeds=1", "--preset=debug", "--launcher=local",
            *(f"--config_override={o}" for o in SHORT_DEBUG)]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    for game in ("Pong", "Breakout"):
        with open(root / f"{game}-0" / "results.json") as f:
            assert json.load(f)["game"] == game
    events = [" ".join(line.split()[:2]) for line in out.splitlines() if line.startswith(("Started", "Done:"))]
    assert events == ["Started Pong-0", "Done: Pong-0", "Started Breakout-0", "Done: Breakout-0"], out
    assert "--config.collection.train.num_steps_total=80" in (root / "Pong-0" / "log.txt").read_text()

    def no_start(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(sweep, "start", no_start)
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 done, 0 to run" in out and "Nothing to run." in out


def test_a_run_that_stops_to_resume_is_started_again(tmp_path, fake_program, monkeypatch):
    monkeypatch.setenv("FAKE_RUN", "resume_once")
    runs = sweep.plan(["Pong", "Breakout"], [3], str(tmp_path), program=fake_program)
    assert sweep.LocalLauncher(runs, [None]).launch() == 0
    for run in runs:
        assert len(starts(run)) == 2
        assert sweep.state(run) == sweep.DONE
        assert starts(run)[1]["argv"] == list(run.command[2:])


def test_a_failed_run_is_reported_with_its_log_and_run_again_at_the_next_launch(tmp_path, fake_program, monkeypatch,
                                                                                capsys):
    monkeypatch.setenv("FAKE_RUN", "fail")
    runs = sweep.plan(["Pong"], [0], str(tmp_path), program=fake_program)
    assert sweep.LocalLauncher(runs, [None]).launch() == sweep.EXIT_FAILED
    err = capsys.readouterr().err
    assert "Pong-0 failed with exit status 1" in err and "fake run: failing on purpose" in err
    assert sweep.state(runs[0]) == sweep.FAILED
    assert "1 failed before" in sweep.summary(str(tmp_path), runs, [sweep.FAILED])

    monkeypatch.setenv("FAKE_RUN", "resume_once")
    assert sweep.LocalLauncher(runs, [None]).launch() == 0
    assert sweep.state(runs[0]) == sweep.DONE


def test_sigterm_to_the_local_launcher_makes_its_runs_save_and_stops_it(tmp_path, fake_program, monkeypatch):
    monkeypatch.setenv("FAKE_RUN", "stop_on_sigterm")
    runs = sweep.plan(["Pong", "Breakout"], [0], str(tmp_path), program=fake_program)

    def stop_the_launcher():
        wait_until(lambda: os.path.exists(runs[0].path("waiting")), "the first run")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_the_launcher, daemon=True).start()
    assert sweep.LocalLauncher(runs, [None]).launch() == sweep.EXIT_PREEMPTED
    assert os.path.exists(runs[0].path("saved")) and len(starts(runs[0])) == 1
    assert sweep.state(runs[0]) == sweep.NEW  # the stand-in keeps no checkpoints
    assert not os.path.exists(runs[1].workdir)


def test_each_local_run_gets_its_own_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert sweep.local_slots(None) == ["2", "5"]
    assert sweep.local_slots(1) == ["2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sweep.local_slots(None) == [None] and sweep.local_slots(3) == [None] * 3


# ---- SLURM.

@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch, srun and squeue stand-ins: sbatch keeps each submission file and answers job ids 4242, 4243, ..."""
    bin_dir, submissions = tmp_path / "bin", tmp_path / "submissions"
    bin_dir.mkdir()
    submissions.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\nn=$(ls {submissions} | wc -l)\nid=$((4242 + n))\ncp "$1" {submissions}/$id.sh\n'
        'echo "Submitted batch job $id"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "squeue").write_text(f"#!/bin/sh\ncat {tmp_path}/queue 2>/dev/null\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return submissions, tmp_path / "queue"


def sbatch_options(text):
    return dict(line[len("#SBATCH --"):].split("=", 1) for line in text.splitlines() if line.startswith("#SBATCH"))


def test_slurm_submits_one_job_array_of_the_unfinished_runs(tmp_path, fake_slurm, capsys):
    submissions, queue = fake_slurm
    root = tmp_path / "atari100k"
    (root / "Pong-0").mkdir(parents=True)
    (root / "Pong-0" / "results.json").write_text("{}")
    argv = [f"--root={root}", "--games=Pong,Breakout", "--seeds=0,2", "--launcher=slurm", "--partition=gpu_p",
            "--gpus_per_run=2", "--cpus_per_run=6", "--mem_gb=48", "--time_hours=12", "--account=rl",
            "--qos=high", "--constraint=a100", "--array_parallelism=2", "--config_override=training.num_final_epochs=5"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "1 done, 3 to run" in out

    (script,) = submissions.iterdir()
    options = sbatch_options(script.read_text())
    logs = f"{root}/slurm_logs/%A_%a/%A_%a_0_log"
    assert options == {
        "array": "0-2%2", "partition": "gpu_p", "gpus-per-node": "2", "cpus-per-task": "6", "mem": "48GB",
        "time": "720", "account": "rl", "qos": "high", "constraint": "a100", "job-name": "diamond-atari100k",
        "nodes": "1", "ntasks-per-node": "1", "signal": "USR2@180", "output": f"{logs}.out", "error": f"{logs}.err",
        "open-mode": "append", "wckey": "submitit"}
    assert f"-m submitit.core._submit {root}/slurm_logs/%j" in script.read_text()

    expected = [run for run in sweep.plan(["Pong", "Breakout"], [0, 2], str(root),
                                          overrides=["--config.training.num_final_epochs=5"])
                if run.name != "Pong-0"]
    for index, run in enumerate(expected):
        submission = submitit.helpers.DelayedSubmission.load(
            root / "slurm_logs" / f"4242_{index}" / f"4242_{index}_submitted.pkl")
        assert isinstance(submission.function, slurm.SlurmRun) and submission.function.run == run
        assert submission.function.signal_delay_s == 180 and submission._timeout_countdown == 10
        assert (root / run.name / "slurm_job_id").read_text() == f"4242_{index}"
        assert [f"4242_{index}", run.name] in [line.split() for line in out.splitlines()]
    assert run.command[-4:] == ("--config=configs/atari100k.py:game=Breakout", "--config.seed=2",
                                f"--workdir={root}/Breakout-2", "--config.training.num_final_epochs=5")

    # Launched again while one job is still queued: only the two others are submitted.
    queue.write_text("4242_1\n999_3\n")
    assert sweep.main(argv) == 0
    assert "1 done, 1 queued or running on SLURM, 2 to run" in capsys.readouterr().out
    assert sbatch_options((submissions / "4243.sh").read_text())["array"] == "0-1%2"
    assert (root / "Pong-2" / "slurm_job_id").read_text() == "4242_1"
    assert (root / "Breakout-0" / "slurm_job_id").read_text() == "4243_0"


def test_checkpoint_resubmits_the_same_run(tmp_path):
    run = sweep.plan(["Qbert"], [4], str(tmp_path))[0]
    resubmission = slurm.SlurmRun(run, signal_delay_s=120).checkpoint()
    assert isinstance(resubmission, submitit.helpers.DelayedSubmission)
    again = pickle.loads(pickle.dumps(resubmission)).function
    assert isinstance(again, slurm.SlurmRun) and again.run == run and again.signal_delay_s == 120
    assert resubmission.args == () and resubmission.kwargs == {}


@pytest.fixture
def local_submitit(tmp_path, monkeypatch):
    """submitit's LocalExecutor: real submitit jobs (signal handlers, checkpoint and requeue) on this machine."""
    monkeypatch.setenv("PYTHONPATH", REPO)  # the job unpickles launch.slurm.SlurmRun
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=30)
    return executor


def test_a_job_whose_run_stops_to_resume_is_requeued_by_submitit(tmp_path, fake_program, monkeypatch,
                                                                 local_submitit):
    monkeypatch.setenv("FAKE_RUN", "resume_once")
    run = sweep.plan(["Pong"], [1], str(tmp_path / "sweep"), program=fake_program)[0]
    job = local_submitit.submit(slurm.SlurmRun(run, signal_delay_s=120))
    assert job.result() == run.path("results.json")
    assert len(starts(run)) == 2 and "Requeued" in job.stdout()


def test_slurms_warning_makes_the_run_save_and_the_job_requeue(tmp_path, fake_program, monkeypatch, local_submitit):
    monkeypatch.setenv("FAKE_RUN", "stop_on_sigterm")
    run = sweep.plan(["Pong"], [1], str(tmp_path / "sweep"), program=fake_program)[0]
    job = local_submitit.submit(slurm.SlurmRun(run, signal_delay_s=120))
    wait_until(lambda: os.path.exists(run.path("waiting")), "the run")
    first = starts(run)[0]
    # The warning goes to the job's process (SLURM sends it to the run too, which ignores it).
    assert first["usr2_ignored"]
    os.kill(first["parent"], signal.SIGUSR2)
    assert job.result() == run.path("results.json")
    assert os.path.exists(run.path("saved")) and len(starts(run)) == 2
    assert "Calling checkpoint method" in job.stdout() and "Requeued" in job.stdout()


def test_a_slurm_run_that_fails_raises_with_the_end_of_its_log(tmp_path, fake_program, monkeypatch):
    monkeypatch.setenv("FAKE_RUN", "fail")
    run = sweep.plan(["Pong"], [0], str(tmp_path), program=fake_program)[0]
    with pytest.raises(slurm.RunFailed, match=r"(?s)Pong-0 failed with exit status 1.*failing on purpose"):
        slurm.SlurmRun(run, signal_delay_s=120)()
    assert sweep.state(run) == sweep.FAILED
    # Outside a submitit job, a run that stops to resume cannot be requeued: the job says so.
    monkeypatch.setenv("FAKE_RUN", "resume_once")
    with pytest.raises(slurm.RunFailed, match="was not requeued. Fix: launch the sweep again"):
        slurm.SlurmRun(sweep.plan(["Pong"], [1], str(tmp_path), program=fake_program)[0], signal_delay_s=120)()


# ---- Dry run and bad input.

def test_dry_run_prints_every_job_with_its_command_and_starts_nothing(tmp_path, capsys):
    root = tmp_path / "sweep"
    argv = [f"--root={root}", "--games=all", "--seeds=0,7", "--preset=debug", "--launcher=slurm", "--dry_run",
            "--partition=gpu", "--config_override=collection.test.num_final_episodes=3"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    overrides = ["--config.collection.test.num_final_episodes=3"]
    for run in sweep.plan(ATARI_100K_GAMES, [0, 7], str(root), "debug", overrides):
        assert f"{run.name:<18}new\n      {run.shell_command()}\n" in out
    assert "52 runs" in out and "52 to run" in out
    assert "gpus_per_node=1 cpus_per_task=8 mem=64GB time=1440" in out and "partition=gpu" in out
    assert "Dry run: nothing was started." in out
    assert not root.exists()


@pytest.mark.parametrize("flags, message", [
    (["--games=Pong,pong,Tetris"], "pong, Tetris are not Atari 100k games (names are case-sensitive: pong -> Pong)"
                                   ". The 26 games: " + ", ".join(ATARI_100K_GAMES)),
    (["--seeds=0"], "'0' is not a number of seeds >= 1. Fix: --seeds=5 for seeds 0 to 4"),
    (["--seeds=1,-2"], "seeds are integers >= 0"),
    (["--seeds=3,3"], "names a seed twice"),
    (["--config_override=denoiser.lrr=1"], "the config has no field 'denoiser.lrr'"),
    (["--config_override=seed=3"], "the sweep sets seed for each run. Fix: use --seeds"),
    (["--config_override=training"], "is not key=value"),
    # Values are parsed and checked as diamond_jax.main does.
    (["--config_override=env.size=-64"], "--config_override: config.env.size=-64: must be a positive integer. Fix:"),
    (["--config_override=env.size=abc"], "--config_override: flag --config.env.size=abc: invalid literal for int()"),
    (["--config_override=world_model_env.sampler.sigma_min=9"], "sigma_min=9.0: must be < sigma_max (5.0)"),
    (["--mem_gb=0"], "--mem_gb=0 is below 1"),
])
def test_bad_input_says_what_to_fix(tmp_path, capsys, flags, message):
    argv = [f"--root={tmp_path}", "--games=Pong", "--seeds=1", "--launcher=local", "--dry_run", *flags]
    assert sweep.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_root_that_is_not_writable_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert sweep.main([f"--root={tmp_path}/file/runs", "--games=Pong", "--seeds=1", "--launcher=local"]) == 2
    assert f"--root={tmp_path}/file/runs is not writable ({tmp_path}/file is a file" in capsys.readouterr().err


def test_slurm_without_submitit_or_without_slurm_says_how_to_fix(tmp_path, capsys, monkeypatch):
    argv = [f"--root={tmp_path}", "--games=Pong", "--seeds=1", "--launcher=slurm"]
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "submitit", None)
        patch.delitem(sys.modules, "launch.slurm")
        patch.delattr(launch, "slurm")
        assert sweep.main(argv) == 2
    assert 'needs submitit, which is not installed. Fix: pip install -e ".[sweep]"' in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    assert sweep.main(argv) == 2
    assert "Fix: launch from a machine of the SLURM cluster, or use --launcher=local" in capsys.readouterr().err


def test_more_parallel_runs_than_gpus_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert sweep.main([f"--root={tmp_path}", "--games=Pong", "--seeds=2", "--launcher=local",
                       "--max_parallel=2"]) == 2
    assert "--max_parallel=2, but this machine shows 1 GPUs (0)" in capsys.readouterr().err


def test_seeds_per_process_groups_the_seeds_of_a_game_and_tracks_each_seed(tmp_path):
    runs = sweep.plan(["Pong"], [0, 1, 2, 3, 4], str(tmp_path), seeds_per_process=2)
    assert [r.name for r in runs] == ["Pong-0_1", "Pong-2_3", "Pong-4"]
    assert "--config.seeds=0,1" in runs[0].command and f"--workdir={tmp_path}/Pong-0_1" in runs[0].command
    assert "--config.seed=4" in runs[2].command and runs[2].workdir == str(tmp_path / "Pong-4")
    group = runs[0]
    assert launch.runs.state(group) == launch.runs.NEW
    (tmp_path / "Pong-0_1" / "seed_1" / "checkpoints" / "3").mkdir(parents=True)
    assert launch.runs.state(group) == launch.runs.RESUME
    (tmp_path / "Pong-0_1" / "seed_0").mkdir()
    (tmp_path / "Pong-0_1" / "seed_0" / "results.json").write_text("{}")
    assert launch.runs.state(group) == launch.runs.RESUME  # seed 1 is not done: the group runs (seed 0 skipped)
    (tmp_path / "Pong-0_1" / "seed_1" / "results.json").write_text("{}")
    assert launch.runs.state(group) == launch.runs.DONE
    assert launch.runs.record_exit(group, 0) == launch.runs.DONE
