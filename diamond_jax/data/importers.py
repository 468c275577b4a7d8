"""Importers of recorded play into a dataset (data/recorded.py), each a function returning the committed
dataset: a folder of videos with an actions file each, a folder of .npz episodes (a training run's replay:
envs/record.py, which knows the run's game).

Videos: `<stem>.mp4|avi|mkv|webm|gif`, read with imageio, and beside each its actions, `<stem>.csv` or
`<stem>.npy`, one row per frame (act[t] is the action taken on frame t). A CSV file has a header row; its
columns say the kind of action:

    action                        discrete: the action index, an integer
    action_<key>, ...             several discrete keys, each an index: one multi-hot vector, the one-hot of
                                  every key concatenated (components named <key>=<value>)
    key_<name>, ...               multi-hot: 0/1 per key held on the frame
    axis_<name>, ...              continuous: a float per component (a stick, the mouse)
    rew, end                      optional: the reward after the action; 1 where the episode ended after it

Any other column is refused, so that a misspelled one is not silently dropped. An .npy actions file holds
int [T] (discrete) or float [T, D] (multi_hot or continuous, said by `action_kind`). The number of discrete
actions (of each key) is the largest index in any file plus one.

.npz episodes: arrays `obs` uint8 [T, H, W, 3], `act` (as an .npy actions file), optional `rew`, `end`.

Episodes are added in file-name order, each named by its file. The kind of action read from the files is
checked against `action_kind` when given.
"""

import csv
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import imageio.v3 as iio
import numpy as np
from tqdm import tqdm

from diamond_jax.data.recorded import ACTION_KINDS, ActionSpec, DatasetError, DatasetWriter, RecordedDataset

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".gif")
STEP_COLUMNS = ("rew", "end")
# Column prefixes of a CSV actions file and the layout they give; "action" alone is one discrete index.
PREFIXES = (("action_", "discrete_keys"), ("key_", "multi_hot"), ("axis_", "continuous"))
NPZ_ARRAYS = ("obs", "act", "rew", "end")


class ActionLog(NamedTuple):
    """The actions of one file as read, before the files are reconciled into one ActionSpec."""

    path: str
    layout: str  # an action kind, or "discrete_keys" (several discrete indices, to become multi-hot)
    columns: Tuple[str, ...]  # the keys or components by name; () for a discrete index or an .npy file
    values: np.ndarray  # int [T] or [T, keys], or float [T, D]
    rew: Optional[np.ndarray]
    end: Optional[np.ndarray]


def progress(items: Sequence, desc: str):
    return tqdm(items, desc=desc, unit="episode", dynamic_ncols=True, leave=False)


# ---- Actions files.


def read_actions_csv(path: str) -> ActionLog:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DatasetError(f"{path} is empty. Fix: a header row (e.g. action,rew,end), then one row per frame.")
    header, body = [c.strip() for c in rows[0]], [r for r in rows[1:] if r]
    layout, action_columns = _csv_layout(path, header)
    if not body:
        raise DatasetError(f"{path} has a header but no rows. Fix: one row per frame of its video.")
    table = np.zeros((len(body), len(header)), np.float64)
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise DatasetError(f"{path}, row {i + 2}: {len(row)} values for {len(header)} columns. Fix: one value "
                               "per column on every row.")
        for j, value in enumerate(row):
            try:
                table[i, j] = float(value)
            except ValueError:
                raise DatasetError(f"{path}, row {i + 2}, column {header[j]!r}: {value!r} is not a number.") from None
    column = {name: table[:, j] for j, name in enumerate(header)}
    values = np.stack([column[c] for c in action_columns], axis=1)
    if layout in ("discrete", "discrete_keys"):
        values = _integers(path, values, "action indices")
        values = values[:, 0] if layout == "discrete" else values
    names = tuple(c.split("_", 1)[1] for c in action_columns) if layout != "discrete" else ()
    return ActionLog(path, layout, names, values, column.get("rew"), column.get("end"))


def _csv_layout(path: str, header: List[str]) -> Tuple[str, List[str]]:
    action_columns = [c for c in header if c not in STEP_COLUMNS]
    layouts = set()
    for c in action_columns:
        layout = "discrete" if c == "action" else next((k for p, k in PREFIXES if c.startswith(p) and len(c) > len(p)),
                                                       None)
        if layout is None:
            raise DatasetError(f"{path}: column {c!r} is not read. Fix: name the columns action (a discrete index), "
                               "action_<key> (several discrete keys), key_<name> (multi-hot 0/1) or axis_<name> "
                               "(continuous), plus optional rew and end; remove other columns.")
        layouts.add(layout)
    if len(layouts) != 1 or ("discrete" in layouts and len(action_columns) > 1):
        raise DatasetError(f"{path}: the action columns {action_columns} must be one of: a single 'action', or "
                           "only action_*, only key_* or only axis_* columns. Fix: keep one kind of action.")
    return layouts.pop(), action_columns


def _integers(path: str, values: np.ndarray, what: str) -> np.ndarray:
    bad = np.flatnonzero(((values != np.round(values)) | (values < 0)).reshape(len(values), -1).any(axis=1))
    if len(bad):
        raise DatasetError(f"{path}: {what} must be integers >= 0, got {values[bad[0]]} at row {bad[0]}. Fix: "
                           "one index per frame (or use key_* / axis_* columns for vectors).")
    return values.astype(np.int64)


def read_actions_npy(path: str, action_kind: Optional[str]) -> ActionLog:
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DatasetError(f"{path} is not a readable .npy array ({error}).") from error
    return _array_log(path, values, action_kind, None, None)


def _array_log(path: str, values: np.ndarray, action_kind: Optional[str], rew, end) -> ActionLog:
    """An int [T] array is discrete; a [T, D] array is multi_hot or continuous, which action_kind must say."""
    if values.ndim == 1 and (np.issubdtype(values.dtype, np.integer) or values.dtype == bool):
        return ActionLog(path, "discrete", (), _integers(path, values, "discrete actions"), rew, end)
    if values.ndim == 2 and (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
        if action_kind not in ("multi_hot", "continuous"):
            raise DatasetError(f"{path}: actions of shape {values.shape} are vectors. Fix: say their kind with "
                               "--action_kind=multi_hot (0/1 per key) or --action_kind=continuous.")
        return ActionLog(path, action_kind, (), values.astype(np.float64), rew, end)
    raise DatasetError(f"{path}: actions are {values.dtype} {values.shape}; expected int [T] (discrete) or numbers "
                       "[T, D] (multi_hot, continuous). Fix: one row per frame.")


def action_spec(logs: List[ActionLog], action_kind: Optional[str]) -> ActionSpec:
    """The one ActionSpec of every file's actions, checked against action_kind."""
    first = logs[0]
    for log in logs[1:]:
        if (log.layout, log.columns) != (first.layout, first.columns) or log.values.shape[1:] != first.values.shape[1:]:
            raise DatasetError(f"{log.path} has {_describe(log)} but {first.path} has {_describe(first)}. Fix: the "
                               "same action columns in every file.")
    kind = "multi_hot" if first.layout == "discrete_keys" else first.layout
    if action_kind is not None and action_kind != kind:
        raise DatasetError(f"{first.path} has {_describe(first)}, which are {kind} actions, but the action kind "
                           f"asked for is {action_kind}. Fix: drop --action_kind, or change the actions files.")
    if first.layout == "discrete":
        return ActionSpec("discrete", 1 + max(int(log.values.max(initial=0)) for log in logs))
    if first.layout == "discrete_keys":
        sizes = key_sizes(logs)
        names = tuple(f"{key}={v}" for key, size in zip(first.columns, sizes) for v in range(size))
        return ActionSpec("multi_hot", len(names), names)
    return ActionSpec(kind, first.values.shape[1], first.columns)


def _describe(log: ActionLog) -> str:
    return f"action columns {list(log.columns)}" if log.columns else f"{log.layout} actions {log.values.shape[1:]}"


def key_sizes(logs: List[ActionLog]) -> Optional[np.ndarray]:
    """Several discrete keys: the number of values of each key, its largest index in any file plus one; None
    for the other layouts."""
    if logs[0].layout != "discrete_keys":
        return None
    return 1 + np.max([log.values.max(axis=0, initial=0) for log in logs], axis=0)


def actions_of(log: ActionLog, sizes: Optional[np.ndarray]) -> np.ndarray:
    """The log's actions as the dataset stores them; several discrete keys (of `sizes` values each, see
    key_sizes) become their one-hots concatenated."""
    if log.layout != "discrete_keys":
        return log.values
    offsets = np.cumsum(sizes) - sizes
    hot = np.zeros((len(log.values), int(sizes.sum())), np.float32)
    hot[np.arange(len(log.values))[:, None], offsets + log.values] = 1.0
    return hot


# ---- Videos.


def _unreadable(path: str, error: Exception) -> DatasetError:
    return DatasetError(f"cannot read the video {path} ({type(error).__name__}: {error}). Fix: check that it plays, "
                        "or re-encode it (e.g. ffmpeg -i in.mov out.mp4).")


def read_video(path: str) -> np.ndarray:
    """uint8 frames [T, H, W, 3]."""
    try:
        frames = np.asarray(iio.imread(path, index=None))
    except Exception as error:  # imageio's plugins each raise their own errors for a file they cannot decode
        raise _unreadable(path, error) from error
    if frames.ndim == 3:  # grey frames
        frames = np.repeat(frames[..., None], 3, axis=-1)
    return frames[..., :3].astype(np.uint8)  # GIFs can carry an alpha channel


def video_fps(path: str) -> Optional[float]:
    """The frame rate the file's metadata gives (read without decoding the frames), None if it gives none."""
    try:
        meta = iio.immeta(path)
    except Exception as error:  # as in read_video
        raise _unreadable(path, error) from error
    if "fps" in meta:
        return float(meta["fps"])
    duration = meta.get("duration")  # GIFs: milliseconds per frame
    return 1000.0 / duration if duration else None


def _actions_file(video: str) -> str:
    stem = os.path.splitext(video)[0]
    found = [stem + ext for ext in (".csv", ".npy") if os.path.isfile(stem + ext)]
    if not found:
        raise DatasetError(f"the video {video} has no actions file. Fix: put its actions, one row per frame, in "
                           f"{stem}.csv or {stem}.npy.")
    if len(found) > 1:
        raise DatasetError(f"the video {video} has two actions files, {found[0]} and {found[1]}. Fix: keep one.")
    return found[0]


def _listed(src: str, extensions: Tuple[str, ...], what: str) -> List[str]:
    if not os.path.isdir(src):
        raise DatasetError(f"--src={src} is not a directory. Fix: pass the folder that holds the {what}.")
    paths = sorted(os.path.join(src, n) for n in os.listdir(src) if n.lower().endswith(extensions))
    if not paths:
        raise DatasetError(f"{src} holds no {what} ({', '.join(extensions)}). Fix: pass the folder that holds them.")
    return paths


def import_videos(src: str, out: str, action_kind: Optional[str] = None, test_fraction: float = 0.1, seed: int = 0,
                  overwrite: bool = False) -> RecordedDataset:
    _check_kind(action_kind)
    videos = _listed(src, VIDEO_EXTENSIONS, "video files")
    logs = []
    for video in videos:
        path = _actions_file(video)
        logs.append(read_actions_csv(path) if path.endswith(".csv") else read_actions_npy(path, action_kind))
    spec, sizes = action_spec(logs, action_kind), key_sizes(logs)
    rates = {video_fps(video) for video in videos}
    fps = rates.pop() if len(rates) == 1 else None  # videos of different (or unknown) rates: unknown
    with DatasetWriter(out, spec, fps, test_fraction, seed, f"videos in {os.path.abspath(src)}", overwrite) as writer:
        for video, log in zip(progress(videos, "importing videos"), logs):
            frames = read_video(video)
            if len(frames) != len(log.values):
                raise DatasetError(f"the video {video} has {len(frames)} frames but its actions file {log.path} has "
                                   f"{len(log.values)} rows. Fix: one row per frame.")
            writer.add_episode(frames, actions_of(log, sizes), log.rew, log.end, name=os.path.basename(video))
        return writer.commit()


# ---- .npz episodes.


def _npz_steps(path: str) -> Dict[str, np.ndarray]:
    """The arrays of an .npz episode but its frames (read later, one episode at a time)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            names = sorted(f.files)
            steps = {k: f[k] for k in names if k in NPZ_ARRAYS[1:]}
    except (OSError, ValueError, EOFError) as error:
        raise DatasetError(f"{path} is not a readable .npz file ({type(error).__name__}: {error}).") from error
    missing, extra = [k for k in NPZ_ARRAYS[:2] if k not in names], [k for k in names if k not in NPZ_ARRAYS]
    if missing or extra:
        raise DatasetError(f"{path} holds the arrays {names}: {'obs and act are required' if missing else ''}"
                           f"{'; ' if missing and extra else ''}{f'{extra} would not be read' if extra else ''}. "
                           "Fix: arrays obs, act and optionally rew, end (rename or remove the others).")
    return steps


def _npz_log(path: str, action_kind: Optional[str]) -> ActionLog:
    steps = _npz_steps(path)
    return _array_log(path, steps["act"], action_kind, steps.get("rew"), steps.get("end"))


def import_npz(src: str, out: str, action_kind: Optional[str] = None, test_fraction: float = 0.1, seed: int = 0,
               overwrite: bool = False) -> RecordedDataset:
    _check_kind(action_kind)
    paths = _listed(src, (".npz",), ".npz episodes")
    logs = [_npz_log(path, action_kind) for path in paths]
    spec, sizes = action_spec(logs, action_kind), key_sizes(logs)
    with DatasetWriter(out, spec, None, test_fraction, seed, f".npz episodes in {os.path.abspath(src)}",
                       overwrite) as writer:
        for path, log in zip(progress(paths, "importing .npz episodes"), logs):
            with np.load(path, allow_pickle=False) as f:
                writer.add_episode(f["obs"], actions_of(log, sizes), log.rew, log.end, name=os.path.basename(path))
        return writer.commit()


def _check_kind(action_kind: Optional[str]) -> None:
    if action_kind is not None and action_kind not in ACTION_KINDS:
        raise DatasetError(f"action kind {action_kind!r} is not one of {', '.join(ACTION_KINDS)}.")
