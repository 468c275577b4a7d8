"""The run directory: one run at a time in it, and the config changes a resume accepts.

A run holds an exclusive lock on `<workdir>/run.lock` while it lives: a second command on the same directory
stops with exit status 2 and names the holder (pid and host, written into the file). The operating system
releases the lock when its process ends, however it ends, so a lock is never left behind by a crash; the
file's text then names a run that is gone, which the next run reports and replaces.
"""

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from typing import Any, Dict, List, Optional

from ml_collections import config_dict

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
# Fields that may change when a run resumes: how it learns from here on (learning rates, gradient clipping)
# and how it is saved, logged and evaluated. Model shapes, the game, the seed, the environment, the schedule
# and everything else would make the saved state or its data mean something else, and stay refused.
# An entry ending in "." covers a whole section; a "*" stands for any one model's section.
RESUMABLE_CHANGES = ("num_devices", "checkpoint.", "training.steps_per_call", "training.phase_loop",
                     "training.seed_loop", "evaluation.every", "*.optimizer.lr", "*.training.max_grad_norm")
# Fields that later versions added, with the value that computes what runs saved before them computed: a saved
# config without the field resumes under that value.
# (Runs of the first release ended an episode at every decrease of the life counter.)
# A value of INERT marks a field that computes nothing in a run saved before it (the cross-attention sizes of a
# frame-stack denoiser): whatever the current config says is accepted.
INERT = object()
ADDED_FIELDS = {"env.backend": "envpool", "training.phase_loop": "auto", "collection.test.temperature": 1.0,
                "env.life_loss_rule": "every_decrease", "precision": "float32",
                "denoiser.conditioning": "frame_stack", "denoiser.condition_dropout": 0.0,
                "denoiser.condition_dropout_target": "all", "denoiser.cross_attention.": INERT,
                "world_model_env.sampler.guidance_scale": 0.0, "sampler.guidance_scale": 0.0,
                "denoiser.space": "pixel", "autoencoder.": INERT, "denoiser.training.include_final_frame": False,
                "seeds": (), "training.seed_loop": "auto", "env.player_on_top": False}


class WorkdirInUse(OSError):
    """Another live process holds the run directory."""


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_as_flat_dict(config: config_dict.ConfigDict) -> Dict[str, Any]:
    """The config as config.json holds it (JSON types: tuples become lists), flattened."""
    return flatten(json.loads(config.to_json_best_effort()))


def matches(field: str, pattern: str) -> bool:
    parts, want = field.split("."), pattern.rstrip(".").split(".")
    if pattern.endswith("."):
        parts = parts[:len(want)]
    return len(parts) == len(want) and all(w in ("*", p) for p, w in zip(parts, want))


def resumable(field: str) -> bool:
    return any(matches(field, p) for p in RESUMABLE_CHANGES)


def config_changes(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """Flattened fields whose values differ between two flattened configs, sorted."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k, "<absent>") != current.get(k, "<absent>"))


def _describe(changes: List[str], saved: Dict[str, Any], current: Dict[str, Any]) -> str:
    return ", ".join(f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}" for k in changes)


class WorkdirLock:
    """An exclusive flock on <workdir>/run.lock, held until release() or the end of the process."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "a process that has not written its pid yet"
            self._file.close()
            raise WorkdirInUse(
                f"--workdir={workdir} is in use by another run ({holder}; lock {self.path}). Fix: wait for that "
                "run to end or stop it, or give this run its own --workdir.") from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # Some network file systems have no locks: the lock cannot be enforced there, but it is still
            # written, and read by whoever looks.
            logging.warning("%s cannot be locked on this file system (%s): make sure no other run uses %s.",
                            self.path, error.strerror, workdir)
        self._file.seek(0)
        previous = self._file.read().strip()
        if previous:
            # The lock was free, so its holder ended without releasing it (killed, or its machine went down).
            logging.warning("Stale lock %s (%s) ended without releasing it; this run takes the directory over.",
                            self.path, previous)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {started}")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            # Emptied, not removed: removing a locked file would let a third process lock a new file of the
            # same name while a second one waits on the old one.
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def open_workdir(workdir: str, config: config_dict.ConfigDict, lock: bool = True) -> Optional[WorkdirLock]:
    """Creates the run directory or checks the run it holds, before anything is computed, and locks it.

    Returns the lock (None with lock=False: processes of a multi-host run other than the first). Raises
    OSError (unwritable directory, or one in use) or ValueError (a run with another config, beyond the
    changes that RESUMABLE_CHANGES allows).
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise OSError(f"--workdir={workdir} is not writable ({error.strerror}). Fix: pick a directory you can "
                      "write to, e.g. --workdir=runs/<game>-<seed>.") from error
    held = WorkdirLock(workdir) if lock else None
    try:
        _check_config(workdir, config)
    except BaseException:
        if held is not None:
            held.release()
        raise
    return held


def _check_config(workdir: str, config: config_dict.ConfigDict) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    current = config_as_flat_dict(config)
    if os.path.exists(path):
        with open(path) as f:
            saved = flatten(json.load(f))
        for pattern, value in ADDED_FIELDS.items():
            # Only fields of this config's kind (MinAtar's have no life-loss rule, world models no RL sampler).
            for field in (f for f in current if matches(f, pattern)):
                saved.setdefault(field, current[field] if value is INERT else value)
        changes = config_changes(saved, current)
        refused = [k for k in changes if not resumable(k)]
        if refused:
            raise ValueError(
                f"--workdir={workdir} holds a run with another config ({_describe(refused[:8], saved, current)}"
                f"{', ...' if len(refused) > 8 else ''}). A resume may change only learning rates "
                "(*.optimizer.lr), gradient clipping (*.training.max_grad_norm), checkpoint.*, evaluation.every, "
                "training.steps_per_call, training.phase_loop and num_devices. Fix: resume it with the same "
                "values for the others, or start the new run in a new --workdir.")
        if not changes:
            return
        logging.warning("Resuming %s with a changed config: %s.", workdir, _describe(changes, saved, current))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, path)
