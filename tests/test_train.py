"""The whole training loop on the debug preset: a run end to end, kill-and-resume equality, SIGTERM,
a non-finite loss, and a corrupt checkpoint."""

import glob
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from configs import atari100k
from conftest import stopping_after, with_fields
from diamond_jax.data.replay import ReplayDataset
from diamond_jax.training import loop
from diamond_jax.training.agent_checkpoint import load_agent

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def debug_config(**overrides):
    return with_fields(atari100k.get_config("debug"), **overrides)


def final_state(workdir):
    """The run's last checkpoint (models, imagination state) and its replay dataset."""
    trainer = loop.Trainer(debug_config(), workdir)
    state = jax.device_get(trainer.state)
    trainer.close()
    return state, trainer.replay, trainer.progress


def event_tags(path):
    """Summary tags in a TensorBoard event file (TFRecords: length, its crc, an Event, its crc)."""
    with open(path, "rb") as f:
        data = f.read()
    tags, i = set(), 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        tags |= {v.tag for v in event_pb2.Event.FromString(data[i + 12:i + 12 + n]).summary.value}
        i += 12 + n + 4
    return tags


def scalar_events(workdir):
    """(tag, step, value) of every scalar the run logged, and the number of event files."""
    paths = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    events = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            events += [(v.tag, event.step, v.simple_value) for v in event.summary.value if v.HasField("simple_value")]
            i += 12 + n + 4
    return sorted(events), len(paths)


def replay_contents(replay: ReplayDataset):
    return [replay.episode(i) for i in range(replay.num_episodes)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    results = loop.Trainer(debug_config(), workdir).run()
    return workdir, results


def test_a_run_trains_evaluates_checkpoints_and_writes_results(reference_run):
    workdir, results = reference_run
    config = debug_config()
    with open(os.path.join(workdir, "results.json")) as f:
        on_disk = json.load(f)
    assert on_disk == results
    assert on_disk["game"] == "Breakout" and len(on_disk["returns"]) == config.collection.test.num_final_episodes
    assert on_disk["mean_return"] == pytest.approx(np.mean(on_disk["returns"]))
    assert on_disk["env_steps"] == config.collection.train.num_steps_total
    # The debug preset's numbers are marked as not the paper's.
    assert on_disk["paper_config"] is False and "env.max_episode_steps" in on_disk["differs_from_paper"]
    # HNS of Breakout: (score - 1.7) / (30.5 - 1.7).
    assert on_disk["human_normalized_score"] == pytest.approx((on_disk["mean_return"] - 1.7) / 28.8)
    with open(os.path.join(workdir, "evaluations.jsonl")) as f:
        evaluations = [json.loads(line) for line in f]
    assert evaluations[-1]["final"] and not evaluations[0]["final"]
    assert all(e["epoch"] % config.evaluation.every == 0 for e in evaluations)

    state, replay, progress = final_state(workdir)
    assert progress.finished and replay.num_steps == config.collection.train.num_steps_total
    epochs = progress.num_epochs_collect + config.training.num_final_epochs
    for name in ("denoiser", "rew_end_model", "actor_critic"):
        t = config[name].training
        assert int(state["models"][name].step) == t.steps_first_epoch + (epochs - 1) * t.steps_per_epoch
    # The actor-critic's heads start at zero; training moved them.
    assert np.abs(state["models"]["actor_critic"].params["actor_linear"]["kernel"]).max() > 0

    assert os.path.isdir(os.path.join(workdir, "checkpoints"))
    tags = set()
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
        tags |= event_tags(path)
    for tag in ("denoiser/train/loss_denoising", "rew_end_model/train/loss_total", "actor_critic/train/loss_total",
                "test/return_mean", "imagination/rollout", "train/episode_return"):
        assert tag in tags, (tag, sorted(tags))
    agent_config, agent, variables = load_agent(os.path.join(workdir, "agent"))
    chex.assert_trees_all_close(variables["actor_critic"]["params"], state["models"]["actor_critic"].params)


def test_a_finished_run_is_not_trained_again(reference_run):
    workdir, results = reference_run
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    events = scalar_events(workdir)
    assert loop.Trainer(debug_config(), workdir).run() == results
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    assert scalar_events(workdir) == events  # and no empty event file beside it


StopsAfter = stopping_after(loop.Trainer)


@pytest.mark.parametrize("stop_after", [3, 7])
def test_killed_and_resumed_equals_uninterrupted(reference_run, tmp_path, stop_after):
    workdir = str(tmp_path)
    with pytest.raises(loop.Preempted):
        StopsAfter(debug_config(), workdir, stop_after=stop_after).run()
    results = loop.Trainer(debug_config(), workdir).run()
    assert results == reference_run[1]
    got, want = final_state(workdir), final_state(reference_run[0])
    chex.assert_trees_all_equal(got[0], want[0])
    for a, b in zip(replay_contents(got[1]), replay_contents(want[1]), strict=True):
        chex.assert_trees_all_equal(a, b)
    # TensorBoard shows what the uninterrupted run logged: no step twice, one event file.
    events, files = scalar_events(workdir)
    assert (events, files) == scalar_events(reference_run[0]) and files == 1
    # The first denoiser call comes after the initial collection (100 steps) and epoch 1's collection (20).
    assert ("denoiser/train/env_steps", 4, 120.0) in events


class StopsDuringFinalEvaluation(loop.Trainer):
    def _final_evaluation(self):
        self.request_stop()
        super()._final_evaluation()


def test_a_stop_during_the_final_evaluation_resumes_before_it(reference_run, tmp_path):
    workdir = str(tmp_path)
    with pytest.raises(loop.Preempted, match="evaluation stopped after 0 of 2 episodes"):
        StopsDuringFinalEvaluation(debug_config(), workdir).run()
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    assert loop.Trainer(debug_config(), workdir).run() == reference_run[1]
    with open(os.path.join(workdir, "evaluations.jsonl")) as f, \
            open(os.path.join(reference_run[0], "evaluations.jsonl")) as g:
        assert f.read() == g.read()


def start_until_first_checkpoint(command, workdir):
    """Starts a training command and waits until it has saved its first checkpoint; returns the process."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not glob.glob(os.path.join(workdir, "checkpoints", "1")) and time.time() < deadline:
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    return process


def test_sigterm_saves_and_exits_with_the_resume_code(tmp_path):
    workdir = str(tmp_path / "run")
    command = [sys.executable, "-m", "diamond_jax.main", "--config=configs/atari100k.py:debug", f"--workdir={workdir}",
               "--cpu_devices=2"]
    process = start_until_first_checkpoint(command, workdir)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 75, output
    assert "Pre-empted" in output
    assert "on 2 cpu device(s)" in output
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    assert len(os.listdir(os.path.join(workdir, "checkpoints"))) >= 2
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert os.path.exists(os.path.join(workdir, "results.json"))


def test_ctrl_c_saves_and_exits_like_sigterm_without_a_traceback(tmp_path):
    workdir = str(tmp_path / "run")
    command = [sys.executable, "-m", "diamond_jax.main", "--config=configs/atari100k.py:debug", f"--workdir={workdir}"]
    process = start_until_first_checkpoint(command, workdir)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 75, output
    assert "SIGINT received" in output and "Pre-empted" in output and "Traceback" not in output
    assert len(os.listdir(os.path.join(workdir, "checkpoints"))) >= 2


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path)
    config = debug_config(**{"denoiser.optimizer.lr": 1e30, "denoiser.training.lr_warmup_steps": 0})
    trainer = loop.Trainer(config, workdir)
    with pytest.raises(loop.NonFiniteLoss, match=r"The denoiser loss became (nan|inf|-inf) at update \d+ of epoch 1"):
        trainer.run()
    # The checkpoint taken after the initial collection is intact and resumes the run at the denoiser phase.
    resumed = loop.Trainer(config, workdir)
    assert (resumed.progress.epoch, resumed.progress.phase) == (1, "collect")
    assert resumed.replay.num_steps == config.collection.train.first_epoch.max
    resumed.close()


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(reference_run, tmp_path, caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_run[0], workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    newest = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    for path in glob.glob(os.path.join(checkpoints, str(newest), "state", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"corrupt")
    os.remove(os.path.join(workdir, "results.json"))
    trainer = loop.Trainer(debug_config(), workdir)
    assert any(f"checkpoints/{newest} is unreadable" in r.getMessage() for r in caplog.records)
    assert not trainer.progress.finished
    # Run again from the checkpoint before: the same results, the same final models.
    assert trainer.run() == reference_run[1]
    chex.assert_trees_all_equal(final_state(workdir)[0], final_state(reference_run[0])[0])


def truncate_largest_array_file(checkpoint):
    """A checkpoint cut short, as a crash or a full disk during a copy leaves it: its largest data file loses
    its end."""
    files = [p for p in glob.glob(os.path.join(checkpoint, "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(p)]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 4)


def test_a_truncated_checkpoint_is_reported_in_one_line_on_resume(reference_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_run[0], workdir)
    os.remove(os.path.join(workdir, "results.json"))
    checkpoints = os.path.join(workdir, "checkpoints")
    indices = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    truncate_largest_array_file(os.path.join(checkpoints, str(indices[-1])))
    command = [sys.executable, "-m", "diamond_jax.main", "--config=configs/atari100k.py:debug", f"--workdir={workdir}"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:  # up to the line that says where the run resumed; then stop it
        lines.append(line.rstrip("\n"))
        if "Resumed" in line or len(lines) > 200:
            break
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=300)
    messages = [line.split("] ", 1)[-1] for line in lines]
    assert messages[-1].startswith(f"Resumed {workdir} from checkpoint {indices[-2]}:"), lines[-20:]
    unreadable = [m for m in messages if "is unreadable" in m]
    assert len(unreadable) == 1 and unreadable[0].startswith(
        f"Checkpoint {checkpoints}/{indices[-1]} is unreadable (ValueError: "), lines
    assert "Error reading" in unreadable[0] and "TensorStore" not in unreadable[0]  # TensorStore's cause, not its spec
    assert unreadable[0].endswith(f"; using checkpoint {indices[-2]}, the newest readable one.")
    assert len(lines) <= 6, lines  # the TPU probe, the line above, where the run resumed: no library's output


DISK_FULL_RUN = """
import runpy, sys
import orbax.checkpoint as ocp

def save(self, *args, **kwargs):
    # What a full disk looks like from orbax: TensorStore's threads print their tracebacks, then the save
    # raises TensorStore's error, whose text alone names the cause.
    for i in range(300):
        print(f"Traceback (most recent call last): event loop {i}", file=sys.stderr)
    raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": [OS error 28: No space left on device]')

ocp.CheckpointManager.save = save
sys.argv = ["diamond_jax.main"] + sys.argv[1:]
runpy.run_module("diamond_jax.main", run_name="__main__")
"""


def test_a_full_disk_stops_the_run_with_one_line_naming_the_path_and_the_free_space(tmp_path):
    workdir = str(tmp_path / "run")
    result = subprocess.run([sys.executable, "-c", DISK_FULL_RUN, "--config=configs/atari100k.py:debug",
                             f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    free_mib = shutil.disk_usage(workdir).free / 2 ** 20
    match = re.fullmatch(rf"error: no space left on the device writing {re.escape(workdir)}/checkpoints "
                         r"\((\d+\.\d) MiB free on its file system\)\. The run stopped; .* Fix: free some space "
                         r"there, or move --workdir to a larger disk, then run the same command to resume\.", last)
    assert match, last
    assert float(match.group(1)) == pytest.approx(free_mib, abs=64)  # other processes write meanwhile
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("change, match", [
    ({"denoiser.inner_model.channels": (16, 16)}, r"another config \(denoiser.inner_model.channels: \[8, 8\] -> "
                                                   r"\[16, 16\]\)"),
    ({"game": "Pong"}, r"another config \(game: 'Breakout' -> 'Pong'\)"),
    ({"seed": 1, "denoiser.optimizer.lr": 3e-4}, r"another config \(seed: 0 -> 1\)\. A resume may change only"),
])
def test_resuming_with_another_model_game_or_seed_is_refused(reference_run, change, match):
    with pytest.raises(ValueError, match=match):
        loop.Trainer(debug_config(**change), reference_run[0])


def test_a_stopped_run_resumes_with_a_new_learning_rate_which_takes_effect(tmp_path, caplog):
    workdir = str(tmp_path)
    with pytest.raises(loop.Preempted):
        StopsAfter(debug_config(), workdir, stop_after=1).run()
    # The advice after a non-finite loss, followed the other way round: a learning rate that no update survives
    # shows that the resumed run trains with the new rate, not with the one its optimiser state was made with.
    config = debug_config(**{"denoiser.optimizer.lr": 1e30, "rew_end_model.training.max_grad_norm": 5.0})
    trainer = loop.Trainer(config, workdir)
    notes = [r.getMessage() for r in caplog.records if "changed config" in r.getMessage()]
    assert notes == [f"Resuming {workdir} with a changed config: denoiser.optimizer.lr: 0.0001 -> 1e+30, "
                     "rew_end_model.training.max_grad_norm: 100.0 -> 5.0."]
    with pytest.raises(loop.NonFiniteLoss, match="The denoiser loss became"):
        trainer.run()
    # The snapshot now holds the new values: resuming again with them needs no note.
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["denoiser"]["optimizer"]["lr"] == 1e30


def test_a_second_run_in_the_same_workdir_is_refused_while_the_first_lives(tmp_path):
    workdir = str(tmp_path / "run")
    first = loop.Trainer(debug_config(), workdir)
    command = [sys.executable, "-m", "diamond_jax.main", "--config=configs/atari100k.py:debug", f"--workdir={workdir}"]
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"--workdir={workdir} is in use by another run (pid {os.getpid()} on host " in second.stderr
    assert "Traceback" not in second.stderr
    first.close()
    # Released: the next run takes the directory.
    loop.Trainer(debug_config(), workdir).close()


def test_a_lock_left_by_a_killed_run_is_reported_and_taken_over(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    # What a run killed with SIGKILL leaves: its text, and no lock (the kernel released it with the process).
    with open(os.path.join(workdir, "run.lock"), "w") as f:
        f.write("pid 999999 on host elsewhere, started 2026-01-01T00:00:00+00:00")
    loop.Trainer(debug_config(), workdir).close()
    assert any("Stale lock" in r.getMessage() and "pid 999999 on host elsewhere" in r.getMessage()
               for r in caplog.records)


def test_an_unwritable_workdir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="is not writable.*Fix"):
        loop.Trainer(debug_config(), str(blocker / "run"))
