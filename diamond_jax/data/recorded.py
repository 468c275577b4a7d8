"""Datasets of recorded play: episodes of frames and the actions taken on them, for training world models on
gameplay that no agent of ours collected (videos with action logs, arrays, a run's replay, Atari played here).

Conventions. An episode has T frames and T actions: `act[t]` is the action taken on frame t, which leads to
frame t + 1 (as in the replay, data/batch.py); the last action's result is not stored. `rew[t]` and `end[t]`
are the reward and end that followed act[t]. Actions are of one kind per dataset (`ActionSpec`): a discrete
index, a multi-hot vector (several keys held at once) or a continuous vector.

Storage, a directory:

    meta.json                  format version, frame shape, action spec, fps, source, and per episode its
                               name, length, split and the byte size of each file (and the CRC-32 of the
                               small ones)
    episodes/<id>_obs.npy      uint8 [T, H, W, 3]
    episodes/<id>_act.npy      int32 [T] or float32 [T, size]
    episodes/<id>_rew.npy      float32 [T] (datasets with rewards)
    episodes/<id>_end.npy      bool [T] (datasets with ends)

Why this layout: a plain `.npy` per array can be memory-mapped, so frames are read from disk only where a
sample lands and a dataset larger than memory trains by random access; .npy and JSON are read by numpy and
any language without pickle (never used here); one file per episode keeps a damaged file's loss to one
episode and names it. Opening checks every file's size against meta.json (a truncated or missing file) and
the CRC-32 of the actions, rewards and ends, which are read into memory; frames are checked by size only, so
that opening never reads them all.

Writes are atomic: `DatasetWriter` writes everything under a temporary sibling directory and renames it into
place last, so an interrupted import leaves either the previous dataset or nothing at the path.
"""

import dataclasses
import json
import os
import shutil
import tempfile
import zlib
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from diamond_jax.data import files

ACTION_KINDS = ("discrete", "multi_hot", "continuous")
SPLITS = ("train", "test")
FORMAT = "diamond_jax recorded play"
FORMAT_VERSION = 1
READABLE_VERSIONS = (FORMAT_VERSION,)
META_FILE = "meta.json"
EPISODES_DIR = "episodes"
FIELDS = ("obs", "act", "rew", "end")


class DatasetError(ValueError):
    """A dataset or an input that cannot be used; the message names the file or episode and the fix."""


@dataclasses.dataclass(frozen=True)
class ActionSpec:
    kind: str  # one of ACTION_KINDS
    size: int  # discrete: number of actions; multi_hot / continuous: vector length
    names: Tuple[str, ...] = ()  # optional: one per action (discrete) or per component (multi_hot, continuous)

    def __post_init__(self):
        if self.kind not in ACTION_KINDS:
            raise DatasetError(f"action kind {self.kind!r} is not one of {', '.join(ACTION_KINDS)}")
        if not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise DatasetError(f"action size {self.size!r} must be a positive integer")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        if self.names and len(self.names) != self.size:
            raise DatasetError(f"{len(self.names)} action names {self.names} for a {self.kind} action of size "
                               f"{self.size}. Fix: give one name per {self._unit()}, or none.")

    def _unit(self) -> str:
        return "action" if self.kind == "discrete" else "component"

    def to_json(self) -> dict:
        return {"kind": self.kind, "size": self.size, "names": list(self.names)}

    @classmethod
    def from_json(cls, d: dict) -> "ActionSpec":
        return cls(d["kind"], d["size"], tuple(d.get("names", ())))


class Episode(NamedTuple):
    obs: np.ndarray  # uint8 [T, H, W, 3], memory-mapped from disk
    act: np.ndarray  # int32 [T] (discrete) or float32 [T, size] (multi_hot as 0./1., continuous)
    rew: Optional[np.ndarray]  # float32 [T] or None when the dataset has no rewards
    end: Optional[np.ndarray]  # bool [T] or None


class Segments(NamedTuple):
    obs: np.ndarray  # uint8 [b, L, H, W, 3]
    act: np.ndarray  # int32 [b, L] or float32 [b, L, size]
    rew: np.ndarray  # float32 [b, L] (zeros without rewards)
    end: np.ndarray  # bool [b, L] (False without ends)


def _episode_file(directory: str, episode_id: int, field: str) -> str:
    return os.path.join(directory, EPISODES_DIR, f"{episode_id:06d}_{field}.npy")


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).tobytes())


class RecordedDataset:
    """A committed dataset, opened read-only: step data in memory, frames memory-mapped on first use."""

    def __init__(self, path: str, meta: Dict[str, Any], steps: List[Dict[str, np.ndarray]]):
        self.path = path
        self.frame_shape: Tuple[int, int] = tuple(meta["frame_shape"])
        self.action = ActionSpec.from_json(meta["action"])
        self.fps: Optional[float] = meta["fps"]
        self.has_rew: bool = meta["has_rew"]
        self.has_end: bool = meta["has_end"]
        self.source: str = meta["source"]
        self._meta_episodes = meta["episodes"]
        self._steps = steps
        self._frames: Dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, path: str) -> "RecordedDataset":
        path = os.path.abspath(path)
        meta = _read_meta(path)
        steps = [_read_steps(path, e, ep, meta) for e, ep in enumerate(meta["episodes"])]
        return cls(path, meta, steps)

    def episode_ids(self, split: str) -> List[int]:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: use one of {', '.join(SPLITS)}")
        return [e for e, ep in enumerate(self._meta_episodes) if ep["split"] == split]

    def episode_name(self, episode_id: int) -> str:
        """The name the episode was written under (its file, or the recorder's game and number)."""
        return self._meta_episodes[episode_id]["name"]

    def episode(self, episode_id: int) -> Episode:
        if not 0 <= episode_id < len(self._steps):
            raise IndexError(f"episode {episode_id} does not exist ({len(self._steps)} episodes in {self.path})")
        steps = self._steps[episode_id]
        return Episode(self._obs(episode_id), steps["act"], steps.get("rew"), steps.get("end"))

    def lengths(self, split: str) -> np.ndarray:
        return np.array([self._meta_episodes[e]["length"] for e in self.episode_ids(split)], np.int64)

    def num_frames(self, split: str) -> int:
        return int(self.lengths(split).sum())

    def sample_windows(self, rng: np.random.Generator, batch_size: int, seq_length: int,
                       split: str = "train") -> List[Tuple[int, int]]:
        """(episode id, start) of batch_size windows of seq_length consecutive frames, each inside one episode: an
        episode is drawn with probability proportional to its number of windows, T - seq_length + 1 (so that every
        window of the split is equally likely), then a start uniformly."""
        ids, lengths = np.array(self.episode_ids(split), np.int64), self.lengths(split)
        windows = np.maximum(lengths - seq_length + 1, 0)
        if seq_length < 1 or not windows.any():
            raise ValueError(f"no {split} episode has seq_length={seq_length} frames (their lengths: "
                             f"{lengths.tolist()}). Fix: a seq_length of at most {int(lengths.max(initial=0))}, "
                             "or record longer episodes.")
        chosen = rng.choice(len(ids), size=batch_size, p=windows / windows.sum())
        starts = rng.integers(0, windows[chosen])
        return [(int(ids[c]), int(s)) for c, s in zip(chosen, starts)]

    def sample(self, rng: np.random.Generator, batch_size: int, seq_length: int, split: str = "train") -> Segments:
        """batch_size windows of seq_length consecutive frames (sample_windows), with their frames and steps."""
        parts = [self._window(e, s, seq_length) for e, s in self.sample_windows(rng, batch_size, seq_length, split)]
        return Segments(*(np.stack(field) for field in zip(*parts)))

    def _window(self, episode_id: int, start: int, length: int) -> Tuple[np.ndarray, ...]:
        steps, at = self._steps[episode_id], slice(start, start + length)
        rew = steps["rew"][at] if self.has_rew else np.zeros(length, np.float32)
        end = steps["end"][at] if self.has_end else np.zeros(length, bool)
        return np.asarray(self._obs(episode_id)[at]), steps["act"][at], rew, end

    def _obs(self, episode_id: int) -> np.ndarray:
        if episode_id not in self._frames:
            self._frames[episode_id] = np.load(_episode_file(self.path, episode_id, "obs"), mmap_mode="r",
                                               allow_pickle=False)
        return self._frames[episode_id]


def _read_meta(path: str) -> Dict[str, Any]:
    if not os.path.isdir(path):
        raise DatasetError(f"no dataset at {path}: the directory does not exist. Fix: pass the --out directory of "
                           "an import or recording (python -m diamond_jax.dataset).")
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        hint = (" It holds a replay dataset: import it with --import_from=replay --src=<its run directory>."
                if os.path.isfile(os.path.join(path, files.INDEX_FILE)) else "")
        raise DatasetError(f"{path} is not a recorded-play dataset (it has no {META_FILE}).{hint} Fix: make one "
                           "with python -m diamond_jax.dataset --import_from=... or --record=...")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["format"] != FORMAT:
            raise ValueError(f"format {meta['format']!r}")
        version = meta["version"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"{meta_path} is damaged ({type(error).__name__}: {error}). Fix: import or record the "
                           "dataset again (the episode files cannot be read without it).") from error
    if version not in READABLE_VERSIONS:
        raise DatasetError(f"{path} has format version {version}; this code reads {READABLE_VERSIONS}. Fix: open it "
                           "with the version of diamond_jax that wrote it, or import the recordings again.")
    return meta


def _read_steps(path: str, episode_id: int, ep: Dict[str, Any], meta: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """The episode's act (and rew, end), after checking every one of its files against meta.json."""
    steps = {}
    for field, (nbytes, crc) in ep["files"].items():
        file = _episode_file(path, episode_id, field)
        fix = f"Fix: import or record episode {ep['name']!r} again, or restore {file} from a backup."
        if not os.path.isfile(file):
            raise DatasetError(f"{path} is damaged: {file} (episode {ep['name']!r}) is missing. {fix}")
        if os.path.getsize(file) != nbytes:
            raise DatasetError(f"{path} is damaged: {file} (episode {ep['name']!r}) has {os.path.getsize(file)} "
                               f"bytes, {META_FILE} says {nbytes} (truncated or overwritten). {fix}")
        if field == "obs":
            continue
        try:
            array = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise DatasetError(f"{path} is damaged: {file} is not a readable .npy file. {fix}") from error
        if _crc(array) != crc:
            raise DatasetError(f"{path} is damaged: the CRC-32 of {file} differs from {META_FILE}'s. {fix}")
        array.flags.writeable = False  # shared by every episode() and sample() call
        steps[field] = array
    return steps


class DatasetWriter:
    """Writes a dataset episode by episode; `commit()` splits it and puts it in place. A context manager:
    leaving the `with` without a commit (an exception, an interruption) deletes what was written."""

    def __init__(self, path: str, action: ActionSpec, fps: Optional[float] = None, test_fraction: float = 0.1,
                 seed: int = 0, source: str = "", overwrite: bool = False):
        if not isinstance(action, ActionSpec):
            raise TypeError(f"action must be an ActionSpec, got {type(action).__name__}")
        if not 0 <= test_fraction < 1:
            raise DatasetError(f"test_fraction={test_fraction} must lie in [0, 1) (0.1: a tenth of the episodes "
                               "for testing)")
        if fps is not None and not fps > 0:
            raise DatasetError(f"fps={fps} must be positive, or None when unknown")
        self.path = os.path.abspath(path)
        self.action, self.fps, self.test_fraction, self.seed = action, fps, test_fraction, seed
        self.source, self.overwrite = source, overwrite
        _check_replaceable(self.path, overwrite)
        parent, name = os.path.split(self.path)
        os.makedirs(parent, exist_ok=True)
        # A sibling, so that the final rename stays on one file system and is atomic.
        self._tmp: Optional[str] = tempfile.mkdtemp(prefix=f".{name}.incomplete-", dir=parent)
        os.mkdir(os.path.join(self._tmp, EPISODES_DIR))
        self._episodes: List[Dict[str, Any]] = []
        self._frame_shape: Optional[Tuple[int, int]] = None
        self._first_name = ""
        self._has: Dict[str, bool] = {}  # "rew"/"end": whether the episodes carry them (set by the first)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.abort()

    def abort(self) -> None:
        """Deletes what was written, unless committed."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def add_episode(self, obs, act, rew=None, end=None, name: Optional[str] = None) -> None:
        if self._tmp is None:
            raise DatasetError(f"the writer of {self.path} is closed (committed or aborted). Fix: make a new "
                               "DatasetWriter.")
        name = name if name is not None else f"#{len(self._episodes)}"
        arrays = {"obs": self._checked_obs(obs, name), "act": _checked_act(act, self.action, name)}
        for field, value in (("rew", rew), ("end", end)):
            arrays.update(self._checked_optional(field, value, len(arrays["obs"]), name))
        if len(arrays["act"]) != len(arrays["obs"]):
            raise DatasetError(f"episode {name!r}: {len(arrays['obs'])} frames but {len(arrays['act'])} actions. "
                               "Fix: one action per frame, act[t] the action taken on frame t.")
        # The first valid episode sets what the others must match.
        if self._frame_shape is None:
            self._frame_shape, self._first_name = arrays["obs"].shape[1:3], name
            self._has = {field: field in arrays for field in ("rew", "end")}
        episode_id = len(self._episodes)
        saved = {}
        for field, array in arrays.items():
            file = _episode_file(self._tmp, episode_id, field)
            files.write_array_atomic(file, array)  # fsynced: durable before the commit's rename
            saved[field] = [os.path.getsize(file), _crc(array) if field != "obs" else None]
        self._episodes.append({"name": name, "length": len(arrays["obs"]), "files": saved})

    def _checked_obs(self, obs, name: str) -> np.ndarray:
        obs = np.asarray(obs)
        if obs.dtype != np.uint8 or obs.ndim != 4 or obs.shape[-1] != 3 or len(obs) == 0:
            raise DatasetError(f"episode {name!r}: frames are {obs.dtype} {obs.shape}, expected uint8 [T, H, W, 3] "
                               "with T >= 1. Fix: pass RGB frames as uint8 (0-255), time first.")
        if self._frame_shape is not None and obs.shape[1:3] != self._frame_shape:
            (h, w), (fh, fw) = obs.shape[1:3], self._frame_shape
            raise DatasetError(f"episode {name!r} has frames of {h}x{w}, the dataset's are {fh}x{fw} (set by "
                               f"episode {self._first_name!r}). Fix: resize the recordings to one size.")
        return obs

    def _checked_optional(self, field: str, value, length: int, name: str) -> Dict[str, np.ndarray]:
        present = value is not None
        if self._has and self._has[field] != present:
            first = "have" if self._has[field] else "have no"
            raise DatasetError(f"episode {name!r} {'has' if present else 'has no'} {field} but the episodes before "
                               f"it {first} {field}. Fix: give {field} for every episode or for none.")
        if not present:
            return {}
        array = np.asarray(value)
        if array.shape != (length,):
            raise DatasetError(f"episode {name!r}: {field} has shape {array.shape}, expected ({length},), one value "
                               "per frame. Fix: one row per frame.")
        if field == "end":
            if not np.isin(array, (0, 1)).all():
                raise DatasetError(f"episode {name!r}: end holds values other than 0/1/True/False. Fix: mark the "
                                   "step after which the episode ended with 1, others 0.")
            return {field: array.astype(bool)}
        if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
            raise DatasetError(f"episode {name!r}: rew must be finite numbers, got {array.dtype} with "
                               f"{_first_bad(array)}. Fix: clean the reward column.")
        return {field: array.astype(np.float32)}

    def commit(self) -> RecordedDataset:
        if self._tmp is None:
            raise DatasetError(f"the writer of {self.path} is closed (committed or aborted). Fix: make a new "
                               "DatasetWriter.")
        if not self._episodes:
            raise DatasetError(f"no episode was added to {self.path}. Fix: add_episode() before commit().")
        split = _split(len(self._episodes), self.test_fraction, self.seed)
        for ep, s in zip(self._episodes, split):
            ep["split"] = s
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "frame_shape": list(self._frame_shape),
                "action": self.action.to_json(), "fps": self.fps, "has_rew": self._has["rew"],
                "has_end": self._has["end"], "source": self.source, "test_fraction": self.test_fraction,
                "seed": self.seed, "episodes": self._episodes}
        with open(os.path.join(self._tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        files.fsync_dir(os.path.join(self._tmp, EPISODES_DIR))
        files.fsync_dir(self._tmp)
        self._put_in_place()
        return RecordedDataset.open(self.path)

    def _put_in_place(self) -> None:
        _check_replaceable(self.path, self.overwrite)  # a dataset may have appeared while this one was written
        parent, name = os.path.split(self.path)
        old = None
        if os.path.lexists(self.path):
            # POSIX cannot swap two directories in one rename: the old dataset steps aside first, and a crash
            # between the two renames leaves it whole in the .replaced- sibling.
            old = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=parent)
            os.replace(self.path, os.path.join(old, name))
        os.replace(self._tmp, self.path)
        self._tmp = None
        files.fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old)


def _check_replaceable(path: str, overwrite: bool) -> None:
    """Refuses an existing path unless overwrite, and even then anything but a dataset or an empty directory:
    overwrite replaces a dataset, never a directory of other files (the recordings themselves, say)."""
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise DatasetError(f"{path} already exists. Fix: pass overwrite=True (--overwrite) to replace it, or "
                           "choose another output directory.")
    is_empty_dir = os.path.isdir(path) and not os.listdir(path)
    if not is_empty_dir and not os.path.isfile(os.path.join(path, META_FILE)):
        raise DatasetError(f"{path} exists and is not a recorded-play dataset: overwrite replaces only a dataset "
                           "or an empty directory. Fix: choose another output directory.")


def _split(num_episodes: int, test_fraction: float, seed: int) -> List[str]:
    """The split of each episode: round(test_fraction * n) test episodes drawn without replacement (seeded),
    at least one when n >= 2 and test_fraction > 0, and at least one training episode."""
    num_test = round(test_fraction * num_episodes)
    if num_episodes >= 2 and test_fraction > 0:
        num_test = min(max(num_test, 1), num_episodes - 1)
    test = set(np.random.default_rng(seed).choice(num_episodes, num_test, replace=False).tolist())
    return ["test" if e in test else "train" for e in range(num_episodes)]


def _first_bad(array: np.ndarray) -> str:
    if not np.issubdtype(array.dtype, np.number):
        return "non-numeric values"
    flat = np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=-1))
    return f"{array[flat[0]]} at row {flat[0]}" if len(flat) else "no bad value"


def _checked_act(act, spec: ActionSpec, name: str) -> np.ndarray:
    act = np.asarray(act)
    where = f"episode {name!r}: {spec.kind} actions"
    if spec.kind == "discrete":
        if act.ndim != 1 or not (np.issubdtype(act.dtype, np.integer) or act.dtype == bool):
            raise DatasetError(f"{where} must be integers [T], got {act.dtype} {act.shape}. Fix: one action index "
                               "per frame (or pick the multi_hot or continuous kind for vectors).")
        bad = np.flatnonzero((act < 0) | (act >= spec.size))
        if len(bad):
            raise DatasetError(f"{where} must lie in [0, {spec.size}), got {act[bad[0]]} at row {bad[0]}. Fix: "
                               f"a larger action size (now {spec.size}), or correct the actions.")
        return act.astype(np.int32)
    if act.ndim != 2 or act.shape[1] != spec.size or not (np.issubdtype(act.dtype, np.number) or act.dtype == bool):
        raise DatasetError(f"{where} must be numbers [T, {spec.size}], got {act.dtype} {act.shape}. Fix: one row of "
                           f"{spec.size} values per frame.")
    if spec.kind == "multi_hot" and not np.isin(act, (0, 1)).all():
        row = int(np.flatnonzero(~np.isin(act, (0, 1)).all(axis=1))[0])
        raise DatasetError(f"{where} must be 0 or 1, got {act[row].tolist()} at row {row}. Fix: 1 for a key held "
                           "on that frame, 0 otherwise (or pick the continuous kind).")
    if spec.kind == "continuous" and not np.isfinite(act).all():
        raise DatasetError(f"{where} must be finite, got {_first_bad(act)}. Fix: fill or drop the frames with "
                           "missing (NaN) or infinite actions.")
    return act.astype(np.float32)
