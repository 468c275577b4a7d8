"""The replay dataset: episodes stored whole, a mirror on the JAX device, segment sampling
as a pure JAX function, and incremental, crash-safe persistence.

Layout. Episodes live in per-env lanes, so that storage stays append-only while several envs collect at
once. In a lane, an episode of L steps occupies L + 1 consecutive slots: slot k < L holds frame obs_k and
the data of the step taken from it (act_k, rew_k, end_k, trunc_k); slot L holds the frame after the last
step (the real final frame once the episode ended or was cut, the current frame while it is in progress)
and no step data. Extending an in-progress episode fills slot L's step data and appends slots after it;
a frame, once written, never changes. Episode ids are global, in order of first appearance, and index a
table (lane, start slot, length, finished).

Device mirror. `ReplayDataset.device_replay()` returns the whole dataset as a `DeviceReplay` pytree on the
device, brought up to date by jitted, donated in-place writes of only what changed since the last call.
Writes are padded to fixed chunks so that few programs are compiled, and capacities are powers of two
times the initial ones, chosen from the dataset's size alone: a dataset restored from disk has exactly the
shapes (and so the samples) of the one that was saved. `sample_segments` runs on that pytree inside jit;
its compiled program depends on the capacities only, so it does not recompile as the dataset grows
within them. The host keeps its own copy (frames in fixed blocks, never copied to grow), which saving and
`episode()` read; 100k steps of 64x64 frames take about 1.3 GB on the host and 1.6 GB on the device.

Persistence. A directory holds `frames/<id>.npy` chunk files, each the frames one save added to one lane,
and `index.npz` (episode table, step data, lane sizes, the list of chunks). A save writes only the new
frames, as new files, then the index aside and renames it into place last; files that no index references
(left by an interrupted save) are deleted by the next load or save. `load(directory, up_to=summary)` cuts
the dataset back to the state described by an earlier `summary()`.
"""

import json
import os
import re
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from diamond_jax.data.batch import Batch, obs_from_frames

CHUNK_SLOTS = 1024  # slots per device write; lanes keep room for one more chunk past their end
CHUNK_EPISODES = 256  # episode-table rows per device write
BLOCK_SLOTS = 1024  # host frames live in blocks of this many slots, so growing never copies frames
FORMAT_VERSION = 1
INDEX_FILE = "index.npz"
FRAMES_DIR = "frames"
_CHUNK_FILE = re.compile(r"^(\d{8})\.npy$")


class DeviceReplay(NamedTuple):
    """The dataset on the device. Capacities: cap slots per lane, ep_cap episode-table rows."""

    frames: jax.Array  # uint8 [lanes, cap, h, w, 3]
    act: jax.Array  # int32 [lanes, cap]
    rew: jax.Array  # float32 [lanes, cap]
    end: jax.Array  # bool [lanes, cap]
    trunc: jax.Array  # bool [lanes, cap]
    ep_lane: jax.Array  # int32 [ep_cap]
    ep_start: jax.Array  # int32 [ep_cap], first slot of the episode in its lane
    ep_length: jax.Array  # int32 [ep_cap], number of steps L (the episode has L + 1 frames)
    num_episodes: jax.Array  # int32 []


def capacity(required: int, initial: int) -> int:
    """The smallest initial * 2^k >= required: a function of the size only, so that resumed runs match."""
    cap = initial
    while cap < required:
        cap *= 2
    return cap


def lane_capacity(lane_size: int, initial: int) -> int:
    return capacity(lane_size + CHUNK_SLOTS, initial)


def table_capacity(num_episodes: int, initial: int) -> int:
    return capacity(num_episodes + CHUNK_EPISODES, initial)


def memory_nbytes(lane_sizes: Sequence[int], num_episodes: int, frame_shape: Tuple[int, int, int],
                  initial_capacity: int, initial_episode_capacity: int) -> Dict[str, int]:
    """Bytes held by a dataset of this size: the host copy and the device mirror (by the rules used here)."""
    frame = int(np.prod(frame_shape))
    step = 4 + 4 + 1 + 1  # act, rew, end, trunc
    host_frames = sum(-(-size // BLOCK_SLOTS) * BLOCK_SLOTS for size in lane_sizes) * frame
    host_steps = sum(capacity(max(size, 1), 1) for size in lane_sizes) * step
    host_table = capacity(max(num_episodes, 1), 1) * (4 + 4 + 4 + 1)
    cap = lane_capacity(max(lane_sizes), initial_capacity)
    ep_cap = table_capacity(num_episodes, initial_episode_capacity)
    device = len(lane_sizes) * cap * (frame + step) + ep_cap * 3 * 4 + 4
    return {"host": host_frames + host_steps + host_table, "device": device}


def _grown(array: np.ndarray, size: int) -> np.ndarray:
    """array, or a copy with at least `size` rows (doubling), zero-filled past the old rows."""
    if len(array) >= size:
        return array
    new = np.zeros((capacity(size, max(1, len(array))),) + array.shape[1:], array.dtype)
    new[:len(array)] = array
    return new


class _Lane:
    """One lane on the host: frames in fixed blocks, step data in growing arrays."""

    def __init__(self, frame_shape: Tuple[int, int, int]):
        self.frame_shape = frame_shape
        self.blocks: List[np.ndarray] = []
        self.act = np.zeros(0, np.int32)
        self.rew = np.zeros(0, np.float32)
        self.end = np.zeros(0, bool)
        self.trunc = np.zeros(0, bool)
        self.size = 0

    def write_frames(self, start: int, frames: np.ndarray) -> None:
        stop = start + len(frames)
        while len(self.blocks) * BLOCK_SLOTS < stop:
            self.blocks.append(np.zeros((BLOCK_SLOTS,) + self.frame_shape, np.uint8))
        i = start
        while i < stop:
            b, o = divmod(i, BLOCK_SLOTS)
            n = min(BLOCK_SLOTS - o, stop - i)
            self.blocks[b][o:o + n] = frames[i - start:i - start + n]
            i += n

    def read_frames(self, start: int, stop: int) -> np.ndarray:
        """Frames of slots [start, stop), zeros for slots never written."""
        out = np.zeros((stop - start,) + self.frame_shape, np.uint8)
        i = start
        while i < min(stop, len(self.blocks) * BLOCK_SLOTS):
            b, o = divmod(i, BLOCK_SLOTS)
            n = min(BLOCK_SLOTS - o, stop - i)
            out[i - start:i - start + n] = self.blocks[b][o:o + n]
            i += n
        return out

    def write_steps(self, start: int, act, rew, end, trunc) -> None:
        stop = start + len(act)
        for name, value in (("act", act), ("rew", rew), ("end", end), ("trunc", trunc)):
            array = _grown(getattr(self, name), stop)
            array[start:stop] = value
            setattr(self, name, array)

    def read_steps(self, start: int, stop: int) -> Tuple[np.ndarray, ...]:
        """(act, rew, end, trunc) of slots [start, stop), zeros past the written slots."""
        out = []
        for array in (self.act, self.rew, self.end, self.trunc):
            chunk = np.zeros(stop - start, array.dtype)
            n = max(0, min(stop, len(array)) - start)
            chunk[:n] = array[start:start + n]
            out.append(chunk)
        return tuple(out)


def _write_slots(replay: DeviceReplay, lane, start, frames, act, rew, end, trunc) -> DeviceReplay:
    at = (lane, start)
    return replay._replace(
        frames=jax.lax.dynamic_update_slice(replay.frames, frames[None], at + (0, 0, 0)),
        act=jax.lax.dynamic_update_slice(replay.act, act[None], at),
        rew=jax.lax.dynamic_update_slice(replay.rew, rew[None], at),
        end=jax.lax.dynamic_update_slice(replay.end, end[None], at),
        trunc=jax.lax.dynamic_update_slice(replay.trunc, trunc[None], at),
    )


def _write_table(replay: DeviceReplay, start, ep_lane, ep_start, ep_length, num_episodes) -> DeviceReplay:
    return replay._replace(
        ep_lane=jax.lax.dynamic_update_slice(replay.ep_lane, ep_lane, (start,)),
        ep_start=jax.lax.dynamic_update_slice(replay.ep_start, ep_start, (start,)),
        ep_length=jax.lax.dynamic_update_slice(replay.ep_length, ep_length, (start,)),
        num_episodes=num_episodes,
    )


def _zeros_like_shapes(num_lanes: int, cap: int, ep_cap: int, frame_shape) -> DeviceReplay:
    return DeviceReplay(
        frames=jnp.zeros((num_lanes, cap) + tuple(frame_shape), jnp.uint8),
        act=jnp.zeros((num_lanes, cap), jnp.int32),
        rew=jnp.zeros((num_lanes, cap), jnp.float32),
        end=jnp.zeros((num_lanes, cap), bool),
        trunc=jnp.zeros((num_lanes, cap), bool),
        ep_lane=jnp.zeros((ep_cap,), jnp.int32),
        ep_start=jnp.zeros((ep_cap,), jnp.int32),
        ep_length=jnp.zeros((ep_cap,), jnp.int32),
        num_episodes=jnp.zeros((), jnp.int32),
    )


def _grow_device(replay: DeviceReplay, cap: int, ep_cap: int) -> DeviceReplay:
    """A copy with larger capacities; the old contents stay at the same indices."""

    def grow(old, new):
        return jax.lax.dynamic_update_slice(new, old, (0,) * old.ndim)

    num_lanes = replay.frames.shape[0]
    bigger = _zeros_like_shapes(num_lanes, cap, ep_cap, replay.frames.shape[2:])
    return jax.tree.map(grow, replay, bigger)


class ReplayDataset:
    """Episodes of `num_lanes` envs on the host, mirrored on the device for sampling."""

    def __init__(self, num_lanes: int, frame_shape: Tuple[int, int, int], initial_capacity: int = CHUNK_SLOTS * 4,
                 initial_episode_capacity: int = CHUNK_EPISODES * 4, sharding: Optional[jax.sharding.Sharding] = None):
        """initial_capacity: slots per lane on the device before the first doubling (pick it from the
        collection budget with `from_config` so that a run never regrows, which would recompile what
        samples from the mirror). sharding: where the device mirror lives (default: the default device)."""
        if len(frame_shape) != 3 or frame_shape[-1] != 3:
            raise ValueError(f"frame_shape must be (h, w, 3), got {frame_shape}")
        for name, value, minimum in (("initial_capacity", initial_capacity, CHUNK_SLOTS),
                                     ("initial_episode_capacity", initial_episode_capacity, CHUNK_EPISODES)):
            if value < minimum:
                raise ValueError(f"{name}={value} must be at least {minimum} (one device write)")
        self.num_lanes = num_lanes
        self.frame_shape = tuple(int(x) for x in frame_shape)
        self.initial_capacity = initial_capacity
        self.initial_episode_capacity = initial_episode_capacity
        self._lanes = [_Lane(self.frame_shape) for _ in range(num_lanes)]
        self._ep_lane = np.zeros(0, np.int32)
        self._ep_start = np.zeros(0, np.int32)
        self._ep_length = np.zeros(0, np.int32)
        self._ep_finished = np.zeros(0, bool)
        self.num_episodes = 0
        self._open = [-1] * num_lanes  # per lane, the id of its in-progress episode (-1: none)
        self.counts_rew = np.zeros(3, np.int64)  # steps with reward sign -1, 0, +1
        self.counts_end = np.zeros(2, np.int64)  # steps with end 0, 1
        self._device: Optional[DeviceReplay] = None
        placed = {} if sharding is None else {"out_shardings": sharding}
        self._make_device = jax.jit(_zeros_like_shapes, static_argnums=(0, 1, 2, 3), **placed)
        self._grow_device = jax.jit(_grow_device, static_argnums=(1, 2), **placed)
        self._write_slots = jax.jit(_write_slots, donate_argnums=0, **placed)
        self._write_table = jax.jit(_write_table, donate_argnums=0, **placed)
        # The device mirror is stale from these slots / table rows on.
        self._dirty_slot = [0] * num_lanes
        self._dirty_episode = 0
        # Persistence: frame chunk files already written to self._save_dir, as rows (lane, start, count, file id).
        self._save_dir: Optional[str] = None
        self._chunks = np.zeros((0, 4), np.int64)
        self._saved_size = [0] * num_lanes

    @classmethod
    def from_config(cls, config, sharding: Optional[jax.sharding.Sharding] = None) -> "ReplayDataset":
        """The training dataset of a run, with device capacities that hold the whole collection budget."""
        t = config.collection.train
        steps_per_lane = t.num_steps_total // t.num_envs
        # Life losses make episodes short; one episode per 16 steps on average leaves a wide margin.
        return cls(t.num_envs, (config.env.size, config.env.size, 3),
                   initial_capacity=lane_capacity(steps_per_lane, CHUNK_SLOTS),
                   initial_episode_capacity=table_capacity(t.num_steps_total // 16, CHUNK_EPISODES),
                   sharding=sharding)

    # ---- Contents.

    @property
    def lane_sizes(self) -> List[int]:
        return [lane.size for lane in self._lanes]

    @property
    def lengths(self) -> np.ndarray:
        return self._ep_length[:self.num_episodes].copy()

    @property
    def num_steps(self) -> int:
        return int(self._ep_length[:self.num_episodes].sum())

    def episode(self, episode_id: int) -> Dict[str, Any]:
        """An episode on the host: obs uint8 [L + 1, h, w, 3] (the last is the frame after the last step),
        act/rew/end/trunc [L], finished."""
        if not 0 <= episode_id < self.num_episodes:
            raise IndexError(f"episode {episode_id} does not exist ({self.num_episodes} episodes)")
        lane = self._lanes[self._ep_lane[episode_id]]
        s, n = int(self._ep_start[episode_id]), int(self._ep_length[episode_id])
        act, rew, end, trunc = lane.read_steps(s, s + n)
        return {"obs": lane.read_frames(s, s + n + 1), "act": act, "rew": rew, "end": end, "trunc": trunc,
                "finished": bool(self._ep_finished[episode_id])}

    def append(self, lane: int, obs: np.ndarray, act: np.ndarray, rew: np.ndarray, end: np.ndarray,
               trunc: np.ndarray, last_obs: np.ndarray) -> int:
        """Adds k consecutive steps of one episode played in `lane`; returns the episode id.

        obs uint8 [k, h, w, 3]: the frames the actions were taken from; act, rew, end, trunc [k]: the steps;
        last_obs uint8 [h, w, 3]: the frame after the last step. If the lane has an episode in progress,
        these steps continue it (obs[0] must be its current frame); otherwise they start a new episode.
        The episode is finished when its last step has end or trunc set.
        """
        k = len(act)
        chex.assert_shape(obs, (k,) + self.frame_shape)
        chex.assert_shape(last_obs, self.frame_shape)
        chex.assert_shape([act, rew, end, trunc], (k,))
        if obs.dtype != np.uint8 or last_obs.dtype != np.uint8:
            raise TypeError(f"frames must be uint8, got {obs.dtype} and {last_obs.dtype}")
        if k == 0:
            raise ValueError("append needs at least one step")
        dead = np.logical_or(end, trunc)
        if dead[:-1].any():
            raise ValueError("an episode continues after a step with end or trunc: split it into two appends")
        store = self._lanes[lane]
        episode_id = self._open[lane]
        if episode_id >= 0:
            first = int(self._ep_start[episode_id] + self._ep_length[episode_id])
            if not np.array_equal(store.read_frames(first, first + 1)[0], obs[0]):
                raise ValueError(f"lane {lane}: obs[0] is not the current frame of its in-progress episode "
                                 f"{episode_id}; the collector and the dataset are out of sync")
            store.write_frames(first + 1, obs[1:])
            self._ep_length[episode_id] += k
        else:
            first = store.size
            episode_id = self.num_episodes
            self.num_episodes += 1
            for name, value in (("_ep_lane", lane), ("_ep_start", first), ("_ep_length", k), ("_ep_finished", 0)):
                array = _grown(getattr(self, name), self.num_episodes)
                array[episode_id] = value
                setattr(self, name, array)
            store.write_frames(first, obs)
        store.write_frames(first + k, last_obs[None])
        store.write_steps(first, np.asarray(act, np.int32), np.asarray(rew, np.float32), np.asarray(end, bool),
                          np.asarray(trunc, bool))
        store.size = first + k + 1
        self._ep_finished[episode_id] = bool(dead[-1])
        self._open[lane] = -1 if dead[-1] else episode_id
        self.counts_rew += np.bincount(np.sign(rew).astype(np.int64) + 1, minlength=3)
        self.counts_end += np.bincount(np.asarray(end, np.int64), minlength=2)
        self._dirty_slot[lane] = min(self._dirty_slot[lane], first)
        self._dirty_episode = min(self._dirty_episode, episode_id)
        return episode_id

    def host_nbytes(self) -> int:
        arrays = [self._ep_lane, self._ep_start, self._ep_length, self._ep_finished]
        for lane in self._lanes:
            arrays += lane.blocks + [lane.act, lane.rew, lane.end, lane.trunc]
        return sum(a.nbytes for a in arrays)

    def summary(self) -> Dict[str, Any]:
        """A small JSON-able description of the current contents, for `load(directory, up_to=...)`."""
        return {"version": FORMAT_VERSION, "num_episodes": self.num_episodes, "lane_sizes": self.lane_sizes,
                "num_steps": self.num_steps}

    # ---- Device mirror.

    def device_replay(self) -> DeviceReplay:
        """The dataset on the device, updated in place: the previously returned DeviceReplay is donated and
        must not be used any more."""
        cap = lane_capacity(max(self.lane_sizes), self.initial_capacity)
        ep_cap = table_capacity(self.num_episodes, self.initial_episode_capacity)
        if self._device is None:
            self._device = self._make_device(self.num_lanes, cap, ep_cap, self.frame_shape)
        elif self._device.frames.shape[1] != cap or self._device.ep_lane.shape[0] != ep_cap:
            self._device = self._grow_device(self._device, cap, ep_cap)
        for i, lane in enumerate(self._lanes):
            for start in range(self._dirty_slot[i], lane.size, CHUNK_SLOTS):
                stop = start + CHUNK_SLOTS
                self._device = self._write_slots(self._device, np.int32(i), np.int32(start),
                                                 lane.read_frames(start, stop), *lane.read_steps(start, stop))
            self._dirty_slot[i] = lane.size
        n = self.num_episodes
        for start in range(self._dirty_episode, n, CHUNK_EPISODES):
            rows = slice(start, start + CHUNK_EPISODES)
            padded = [np.pad(a[rows], (0, CHUNK_EPISODES - len(a[rows]))) for a in
                      (self._ep_lane, self._ep_start, self._ep_length)]
            self._device = self._write_table(self._device, np.int32(start), *padded, np.int32(n))
        self._dirty_episode = n
        return self._device

    # ---- Persistence.

    def save(self, directory: str) -> None:
        """Writes the frames added since the last save as new chunk files, then the index (episode table,
        step data, chunk list) aside and renames it last: a crash at any point leaves the previous save
        loadable. Saving to a new directory writes everything."""
        directory = os.path.abspath(directory)
        frames_dir = os.path.join(directory, FRAMES_DIR)
        os.makedirs(frames_dir, exist_ok=True)
        if directory != self._save_dir:
            self._chunks = np.zeros((0, 4), np.int64)
            self._saved_size = [0] * self.num_lanes
        # Never overwrite a file that the index on disk may still reference.
        next_id = 1 + max([-1] + _chunk_file_ids(frames_dir) + self._chunks[:, 3].tolist())
        chunks = [self._chunks]
        for i, lane in enumerate(self._lanes):
            if lane.size > self._saved_size[i]:
                frames = lane.read_frames(self._saved_size[i], lane.size)
                _write_array_atomic(os.path.join(frames_dir, f"{next_id:08d}.npy"), frames)
                chunks.append(np.array([[i, self._saved_size[i], len(frames), next_id]], np.int64))
                next_id += 1
        chunks = np.concatenate(chunks)
        n = self.num_episodes
        index = {
            "meta": np.array(json.dumps({
                "version": FORMAT_VERSION, "num_lanes": self.num_lanes, "frame_shape": self.frame_shape,
                "initial_capacity": self.initial_capacity,
                "initial_episode_capacity": self.initial_episode_capacity})),
            "chunks": chunks, "lane_sizes": np.array(self.lane_sizes, np.int64),
            "ep_lane": self._ep_lane[:n], "ep_start": self._ep_start[:n], "ep_length": self._ep_length[:n],
            "ep_finished": self._ep_finished[:n],
        }
        for i, lane in enumerate(self._lanes):
            for name, value in zip(("act", "rew", "end", "trunc"), lane.read_steps(0, lane.size)):
                index[f"{name}_{i}"] = value
        _write_index_atomic(os.path.join(directory, INDEX_FILE), index)
        self._save_dir, self._chunks, self._saved_size = directory, chunks, self.lane_sizes
        _remove_unreferenced(frames_dir, chunks[:, 3])

    @classmethod
    def load(cls, directory: str, up_to: Optional[Dict[str, Any]] = None,
             sharding: Optional[jax.sharding.Sharding] = None) -> "ReplayDataset":
        """Restores a saved dataset bit-exactly; with up_to (a `summary()` of an earlier state of the same
        dataset), restores that earlier state. Files left by an interrupted save are deleted."""
        directory = os.path.abspath(directory)
        path = os.path.join(directory, INDEX_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no replay dataset in {directory} (missing {INDEX_FILE})")
        with np.load(path) as f:
            index = {k: f[k] for k in f.files}
        meta = json.loads(str(index["meta"]))
        if meta["version"] != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {meta['version']}, this code reads {FORMAT_VERSION}")
        frames_dir = os.path.join(directory, FRAMES_DIR)
        _remove_unreferenced(frames_dir, index["chunks"][:, 3])
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        replay = cls(meta["num_lanes"], tuple(meta["frame_shape"]), meta["initial_capacity"],
                     meta["initial_episode_capacity"], sharding)
        sizes = index["lane_sizes"].tolist()
        n = len(index["ep_length"])
        ep_length, ep_finished = index["ep_length"].copy(), index["ep_finished"].copy()
        if up_to is not None:
            n, sizes = _check_up_to(up_to, n, sizes, directory)
            # An episode in progress at that time had fewer steps and was not finished yet.
            ep_length = np.minimum(ep_length[:n], np.array(sizes)[index["ep_lane"][:n]] - index["ep_start"][:n] - 1)
            ep_finished = ep_finished[:n] & (ep_length == index["ep_length"][:n])
        replay.num_episodes = n
        replay._ep_lane, replay._ep_start = index["ep_lane"][:n].copy(), index["ep_start"][:n].copy()
        replay._ep_length, replay._ep_finished = ep_length.astype(np.int32), ep_finished
        kept = []
        for lane_id, start, count, file_id in index["chunks"]:
            count = min(count, sizes[lane_id] - start)
            if count > 0:
                frames = np.load(os.path.join(frames_dir, f"{file_id:08d}.npy"), mmap_mode="r")[:count]
                replay._lanes[lane_id].write_frames(int(start), frames)
                kept.append((lane_id, start, count, file_id))
        for i, lane in enumerate(replay._lanes):
            lane.size = sizes[i]
            is_step = np.zeros(lane.size, bool)
            for e in np.flatnonzero(replay._ep_lane == i):
                s = replay._ep_start[e]
                is_step[s:s + replay._ep_length[e]] = True
            # Slots that are not steps (the frame after each episode's last step) carry no step data.
            steps = [np.where(is_step, index[f"{name}_{i}"][:lane.size], 0).astype(index[f"{name}_{i}"].dtype)
                     for name in ("act", "rew", "end", "trunc")]
            lane.write_steps(0, *steps)
            replay.counts_rew += np.bincount(np.sign(steps[1][is_step]).astype(np.int64) + 1, minlength=3)
            replay.counts_end += np.bincount(steps[2][is_step].astype(np.int64), minlength=2)
            in_progress = np.flatnonzero((replay._ep_lane == i) & ~replay._ep_finished)
            if len(in_progress):
                replay._open[i] = int(in_progress[-1])
        replay._save_dir, replay._saved_size = directory, list(sizes)
        replay._chunks = np.array(kept, np.int64).reshape(-1, 4)
        if up_to is not None and replay.num_steps != up_to["num_steps"]:
            raise ValueError(f"{directory} does not hold the dataset described by up_to={up_to} "
                             f"(it has {replay.num_steps} steps there); was it saved by another run?")
        return replay


def _check_up_to(up_to: Dict[str, Any], n: int, sizes: List[int], directory: str) -> Tuple[int, List[int]]:
    if (up_to.get("version") != FORMAT_VERSION or len(up_to["lane_sizes"]) != len(sizes)
            or up_to["num_episodes"] > n or any(a > b for a, b in zip(up_to["lane_sizes"], sizes))):
        raise ValueError(f"up_to={up_to} is not an earlier state of the dataset in {directory} ({n} episodes, "
                         f"lane sizes {sizes}). Fix: pass the summary() stored with the checkpoint of this run.")
    return int(up_to["num_episodes"]), [int(s) for s in up_to["lane_sizes"]]


def _chunk_file_ids(frames_dir: str) -> List[int]:
    return [int(m.group(1)) for m in map(_CHUNK_FILE.match, os.listdir(frames_dir)) if m]


def _remove_unreferenced(frames_dir: str, file_ids: np.ndarray) -> None:
    if not os.path.isdir(frames_dir):
        return
    keep = {f"{i:08d}.npy" for i in file_ids.tolist()}
    for name in os.listdir(frames_dir):
        if name not in keep:
            os.remove(os.path.join(frames_dir, name))


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_array_atomic(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_index_atomic(path: str, arrays: Dict[str, np.ndarray]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(os.path.join(os.path.dirname(path), FRAMES_DIR))  # the chunk files it references are durable
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


# ---- Sampling.


def episode_weights(ep_length: jax.Array, num_episodes: jax.Array,
                    sample_weights: Optional[Sequence[float]]) -> jax.Array:
    """Unnormalised probabilities [ep_cap] of picking each episode, as the official BatchSampler.

    With sample_weights (w_1..w_K) and at least K episodes, the episodes split by id into K groups of
    num_episodes // K (the last one takes the remainder) and group g's weight w_g is spread evenly over its
    episodes. Otherwise, episodes weigh their length. Rows past num_episodes weigh 0.
    """
    ids = jnp.arange(ep_length.shape[0])
    valid = ids < num_episodes
    by_length = jnp.where(valid, ep_length, 0).astype(jnp.float32)
    if sample_weights is None:
        return by_length
    k = len(sample_weights)
    group_size = num_episodes // k
    group = jnp.minimum(ids // jnp.maximum(group_size, 1), k - 1)
    size_of_group = jnp.where(group == k - 1, group_size + num_episodes % k, group_size)
    by_group = jnp.asarray(sample_weights, jnp.float32)[group] / jnp.maximum(size_of_group, 1)
    return jnp.where(num_episodes < k, by_length, jnp.where(valid, by_group, 0.0))


def sample_segments(replay: DeviceReplay, key: jax.Array, batch_size: int, seq_length: int,
                    sample_weights: Optional[Sequence[float]], can_sample_beyond_end: bool) -> Batch:
    """A batch of segments of seq_length steps, drawn as the official BatchSampler does (`draw_segments`)
    and cut with padding at the episode boundaries (`gather_segments`). Pure and jittable with batch_size,
    seq_length, sample_weights (a tuple, or None) and can_sample_beyond_end static. The dataset must hold
    at least one step."""
    episode, start = draw_segments(replay, key, batch_size, seq_length, sample_weights, can_sample_beyond_end)
    return gather_segments(replay, episode, start, seq_length)


def draw_segments(replay: DeviceReplay, key: jax.Array, batch_size: int, seq_length: int,
                  sample_weights: Optional[Sequence[float]], can_sample_beyond_end: bool
                  ) -> Tuple[jax.Array, jax.Array]:
    """Episode ids [b] and segment starts [b] (positions in the episode, negative before its start).

    Episode by `episode_weights`, then a timestep t uniform among its L steps, then the segment:
    - can_sample_beyond_end=False (denoiser, actor-critic burn-in): stop = min(L, t + 1 + U{0..seq_length-1}),
      start = stop - seq_length: padding only before the episode's start;
    - can_sample_beyond_end=True (reward/end model): start = t - U{0..seq_length-1}, stop = start + seq_length.
    """
    key_episode, key_t, key_offset = jax.random.split(key, 3)
    episode = _draw_episodes(key_episode, episode_weights(replay.ep_length, replay.num_episodes, sample_weights),
                             batch_size)
    length = replay.ep_length[episode]
    t = jax.random.randint(key_t, (batch_size,), 0, length)
    offset = jax.random.randint(key_offset, (batch_size,), 0, seq_length)
    if can_sample_beyond_end:
        return episode, t - offset
    return episode, jnp.minimum(length, t + 1 + offset) - seq_length


def _draw_episodes(key: jax.Array, weights: jax.Array, batch_size: int) -> jax.Array:
    """Indices drawn with probability proportional to weights, by inverting the cumulative sum
    (jax.random.categorical draws a Gumbel for every row and sample: 50 times slower on CPU)."""
    cdf = jnp.cumsum(weights)
    u = jax.random.uniform(key, (batch_size,)) * cdf[-1]
    index = jnp.searchsorted(cdf, u, side="right")  # the first row whose interval holds u: never a 0 weight
    # When u * total rounds up to total, take the last row that can be drawn.
    last = jnp.max(jnp.where(weights > 0, jnp.arange(weights.shape[0]), 0))
    return jnp.minimum(index, last).astype(jnp.int32)


def gather_segments(replay: DeviceReplay, episode: jax.Array, start: jax.Array, seq_length: int) -> Batch:
    """The segments [start, start + seq_length) of the given episodes.

    Position k of an episode of L steps holds a real frame iff 0 <= k <= L (k = L: the frame after the last
    step, the real final frame of an ended episode) and a real step iff 0 <= k < L; padding has obs 0,
    act/rew/end/trunc 0 and mask_padding False.
    """
    b = episode.shape[0]
    chex.assert_shape(start, (b,))
    k = start[:, None] + jnp.arange(seq_length)  # [b, T]
    length = replay.ep_length[episode][:, None]
    frame_real = (k >= 0) & (k <= length)
    step_real = (k >= 0) & (k < length)
    lane = replay.ep_lane[episode][:, None]
    slot = replay.ep_start[episode][:, None] + jnp.clip(k, 0, length)
    obs = jnp.where(frame_real[..., None, None, None], obs_from_frames(replay.frames[lane, slot]), 0.0)
    batch = Batch(
        obs=obs,
        act=jnp.where(step_real, replay.act[lane, slot], 0),
        rew=jnp.where(step_real, replay.rew[lane, slot], 0.0),
        end=jnp.where(step_real, replay.end[lane, slot], False).astype(jnp.int32),
        trunc=jnp.where(step_real, replay.trunc[lane, slot], False).astype(jnp.int32),
        mask_padding=step_real,
    )
    chex.assert_shape(batch.obs, (b, seq_length) + replay.frames.shape[2:])
    chex.assert_shape([batch.act, batch.rew, batch.end, batch.trunc, batch.mask_padding], (b, seq_length))
    return batch


def synthetic_replay(config, seed: int = 0) -> ReplayDataset:
    """A replay dataset holding the whole collection budget of `config` in episodes of 20 to 400 steps,
    with random frames (for benchmarks)."""
    rng = np.random.default_rng(seed)
    t = config.collection.train
    size = config.env.size
    replay = ReplayDataset.from_config(config)
    pool = rng.integers(0, 256, (256, size, size, 3), dtype=np.uint8)
    for lane in range(t.num_envs):
        remaining = t.num_steps_total // t.num_envs
        while remaining:
            k = min(remaining, int(rng.integers(20, 401)))
            remaining -= k
            end = np.zeros(k, bool)
            end[-1] = True
            replay.append(lane, pool[rng.integers(0, len(pool), k)], rng.integers(0, 4, k).astype(np.int32),
                          rng.choice(np.array([-1.0, 0.0, 1.0], np.float32), k), end, np.zeros(k, bool),
                          pool[rng.integers(0, len(pool))])
    return replay


def benchmark_sampling(config, num_batches: int, seq_length: Optional[int] = None) -> float:
    """Segments per second of jitted `sample_segments` (batch 32, the reward/end model's segments of 19
    steps with padding past the end unless seq_length is given) from a synthetic replay of the whole budget."""
    batch_size = 32
    seq_length = seq_length or config.rew_end_model.training.seq_length
    device = synthetic_replay(config).device_replay()
    sample = jax.jit(sample_segments, static_argnums=(2, 3, 4, 5))
    weights = tuple(config.rew_end_model.training.sample_weights)
    keys = jax.random.split(jax.random.key(0), num_batches + 1)
    jax.block_until_ready(sample(device, keys[-1], batch_size, seq_length, weights, True))  # compiles
    start = time.perf_counter()
    for i in range(num_batches):
        batch = sample(device, keys[i], batch_size, seq_length, weights, True)
    jax.block_until_ready(batch)
    return num_batches * batch_size / (time.perf_counter() - start)
