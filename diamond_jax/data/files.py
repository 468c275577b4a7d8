"""The replay dataset on disk: frame chunk files, the index, crash-safe writes and checks of what is read.

A directory holds `frames/<id>.npy` chunk files, each the frames one save added to one lane, and `index.npz`:
the episode table, the step data, the lane sizes and the list of chunks (lane, first slot, frames, file id,
CRC-32 of the frames). A save writes only new chunk files, then the index aside, and renames it into place
last. Nothing is ever loaded with pickle.

Version 1 (the first release) had no CRC-32 column and no count of lost steps; it is still read, its chunks
unchecked, so that runs made with it resume. Their CRC-32 is computed as they are read, so the next save
(always the current version) records it.
"""

import json
import logging
import os
import re
import zipfile
import zlib
from typing import Any, Dict, List, Tuple

import numpy as np

FORMAT_VERSION = 2  # 2: chunks carry a CRC-32 of their frames
READABLE_VERSIONS = (1, FORMAT_VERSION)
INDEX_FILE = "index.npz"
FRAMES_DIR = "frames"
CHUNK_COLUMNS = 5  # lane, start slot, frame count, file id, CRC-32
NO_CHECKSUM = -1  # the CRC-32 column of a version-1 chunk (a CRC-32 is never negative)
_CHUNK_FILE = re.compile(r"^(\d{8})\.npy$")


class ReplayDamaged(ValueError):
    """A replay directory whose index cannot be read; the message names the file and the fix."""


def chunk_name(file_id: int) -> str:
    return f"{file_id:08d}.npy"


def checksum(frames: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(frames).tobytes())


def chunk_file_ids(frames_dir: str) -> List[int]:
    return [int(m.group(1)) for m in map(_CHUNK_FILE.match, os.listdir(frames_dir)) if m]


def remove_unreferenced(frames_dir: str, file_ids: np.ndarray) -> None:
    if not os.path.isdir(frames_dir):
        return
    keep = {chunk_name(i) for i in file_ids.tolist()}
    for name in os.listdir(frames_dir):
        if name not in keep:
            os.remove(os.path.join(frames_dir, name))


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_array_atomic(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_index_atomic(path: str, arrays: Dict[str, np.ndarray]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(os.path.join(os.path.dirname(path), FRAMES_DIR))  # the chunk files it references are durable
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def read_index(path: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """(meta, arrays) of an index file, or ReplayDamaged naming it: without the index, the episode table and
    the step data are gone, so nothing of the dataset can be kept."""
    fix = (f"Fix: restore {path} from a backup, or start the run again in a new --workdir (the frames alone "
           "cannot rebuild the dataset).")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays["meta"]))
        version = meta["version"]
    except FileNotFoundError as error:
        raise ReplayDamaged(f"the replay index {path} is missing. {fix}") from error
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        # numpy's own messages can advise allow_pickle, which must never be used on a file of unknown content.
        raise ReplayDamaged(f"the replay index {path} is damaged: truncated or garbled ({type(error).__name__}). "
                            f"{fix}") from error
    if version not in READABLE_VERSIONS:
        raise ReplayDamaged(f"{path} has format version {version}, this code reads {READABLE_VERSIONS}. Fix: "
                            "resume with the version of diamond_jax that wrote it, or start the run in a new "
                            "--workdir.")
    if version == 1:
        logging.info("replay index %s has format version 1, written without checksums: its chunks are read "
                     "unchecked; the next save records their CRC-32.", path)
        chunks = arrays["chunks"].reshape(-1, CHUNK_COLUMNS - 1)
        arrays["chunks"] = np.concatenate([chunks, np.full((len(chunks), 1), NO_CHECKSUM, chunks.dtype)], axis=1)
        meta["num_lost_steps"] = 0  # version 1 never cut a dataset
    return meta, arrays


def read_chunk(path: str, count: int, frame_shape: Tuple[int, ...], crc: int) -> Tuple[np.ndarray, int]:
    """The first `count` frames of a chunk file and the CRC-32 of the whole file's frames, checked against the
    index's frame shape and CRC-32 (unless it is NO_CHECKSUM); FileNotFoundError or ValueError with the reason
    when it is missing, truncated or garbled."""
    if not os.path.exists(path):
        raise FileNotFoundError("missing")
    try:
        frames = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as error:
        raise ValueError("truncated or garbled: not a readable .npy file of frames") from error
    # A dataset cut back by `load(up_to=...)` references the first frames of a file written before the cut.
    if frames.dtype != np.uint8 or frames.shape[1:] != tuple(frame_shape) or len(frames) < count:
        raise ValueError(f"holds {frames.dtype} {frames.shape}, the index expects at least {count} uint8 frames "
                         f"of {tuple(frame_shape)}")
    actual = checksum(frames)
    if crc != NO_CHECKSUM and actual != crc:
        raise ValueError("its CRC-32 differs from the index's: the frames are garbled")
    return frames[:count], actual
