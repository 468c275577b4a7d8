"""The replay dataset: episodes stored whole on the host, a mirror on the JAX device, and incremental,
crash-safe persistence that keeps what it can of a damaged directory. Segment sampling from the mirror is in
data/sampling.py, the file format in data/files.py.

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
shapes (and so the samples) of the one that was saved. The host keeps its own copy (frames in fixed
blocks, never copied to grow), which saving and `episode()` read; 100k steps of 64x64 frames take about
1.3 GB on the host and 1.6 GB on the device.

Persistence. A save writes only the new frames, as new chunk files, then the index; files that no index
references (left by an interrupted save) are deleted by the next load or save. `load(directory,
up_to=summary)` cuts the dataset back to the state described by an earlier `summary()`. A missing,
truncated or garbled chunk (each has a CRC-32 in the index) is reported by name and the dataset is cut to
the longest consistent prefix before it (`num_lost_steps` counts the steps lost, for good).
"""

import json
import logging
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from diamond_jax.data import files
from diamond_jax.data.files import FORMAT_VERSION, FRAMES_DIR, INDEX_FILE

CHUNK_SLOTS = 1024  # slots per device write; lanes keep room for one more chunk past their end
CHUNK_EPISODES = 256  # episode-table rows per device write
BLOCK_SLOTS = 1024  # host frames live in blocks of this many slots, so growing never copies frames


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
        # Persistence: frame chunk files already written to self._save_dir, as rows (lane, start, count, file id,
        # CRC-32).
        self._save_dir: Optional[str] = None
        self._chunks = np.zeros((0, files.CHUNK_COLUMNS), np.int64)
        self._saved_size = [0] * num_lanes
        self.num_lost_steps = 0  # steps collected but lost to a damaged directory (see `load`)

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
                "num_steps": self.num_steps, "num_lost_steps": self.num_lost_steps}

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
        step data, chunk list with checksums) aside and renames it last: a crash at any point leaves the
        previous save loadable. Saving to a new directory writes everything."""
        directory = os.path.abspath(directory)
        frames_dir = os.path.join(directory, FRAMES_DIR)
        os.makedirs(frames_dir, exist_ok=True)
        if directory != self._save_dir:
            self._chunks = np.zeros((0, files.CHUNK_COLUMNS), np.int64)
            self._saved_size = [0] * self.num_lanes
        # Never overwrite a file that the index on disk may still reference.
        next_id = 1 + max([-1] + files.chunk_file_ids(frames_dir) + self._chunks[:, 3].tolist())
        chunks = [self._chunks]
        for i, lane in enumerate(self._lanes):
            if lane.size > self._saved_size[i]:
                frames = lane.read_frames(self._saved_size[i], lane.size)
                files.write_array_atomic(os.path.join(frames_dir, files.chunk_name(next_id)), frames)
                chunks.append(np.array([[i, self._saved_size[i], len(frames), next_id, files.checksum(frames)]],
                                       np.int64))
                next_id += 1
        chunks = np.concatenate(chunks)
        n = self.num_episodes
        index = {
            "meta": np.array(json.dumps({
                "version": FORMAT_VERSION, "num_lanes": self.num_lanes, "frame_shape": self.frame_shape,
                "initial_capacity": self.initial_capacity,
                "initial_episode_capacity": self.initial_episode_capacity, "num_lost_steps": self.num_lost_steps})),
            "chunks": chunks, "lane_sizes": np.array(self.lane_sizes, np.int64),
            "ep_lane": self._ep_lane[:n], "ep_start": self._ep_start[:n], "ep_length": self._ep_length[:n],
            "ep_finished": self._ep_finished[:n],
        }
        for i, lane in enumerate(self._lanes):
            for name, value in zip(("act", "rew", "end", "trunc"), lane.read_steps(0, lane.size)):
                index[f"{name}_{i}"] = value
        files.write_index_atomic(os.path.join(directory, INDEX_FILE), index)
        self._save_dir, self._chunks, self._saved_size = directory, chunks, self.lane_sizes
        files.remove_unreferenced(frames_dir, chunks[:, 3])

    @classmethod
    def load(cls, directory: str, up_to: Optional[Dict[str, Any]] = None,
             sharding: Optional[jax.sharding.Sharding] = None, read_only: bool = False) -> "ReplayDataset":
        """Restores a saved dataset bit-exactly; with up_to (a `summary()` of an earlier state of the same
        dataset), restores that earlier state. Files left by an interrupted save are deleted, unless read_only:
        a reader of a live run's dataset (diamond_jax.diagnose) must not delete the chunks that its writer is
        saving (a read-only dataset saved later writes all its chunks anew, as to a new directory).

        A missing, truncated or garbled chunk file is logged by name, and the dataset is cut to the longest
        consistent prefix before it: in its lane, the slots from the damaged chunk on; everywhere, the
        episodes that started after the first lost slot of their lane. Episodes cut short end with trunc
        set, so that collection goes on in new episodes; `num_lost_steps` grows by the steps lost. A damaged
        index loses everything and raises files.ReplayDamaged, naming it."""
        directory = os.path.abspath(directory)
        path = os.path.join(directory, INDEX_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no replay dataset in {directory} (missing {INDEX_FILE})")
        meta, index = files.read_index(path)
        frames_dir = os.path.join(directory, FRAMES_DIR)
        if not read_only:
            files.remove_unreferenced(frames_dir, index["chunks"][:, 3])
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
        replay = cls(meta["num_lanes"], tuple(meta["frame_shape"]), meta["initial_capacity"],
                     meta["initial_episode_capacity"], sharding)
        sizes = index["lane_sizes"].tolist()
        n = len(index["ep_length"])
        replay.num_lost_steps = meta["num_lost_steps"]
        if up_to is not None:
            n, sizes = _check_up_to(up_to, n, sizes, directory)
            replay.num_lost_steps = up_to.get("num_lost_steps", 0)  # a version-1 summary predates lost steps
        ep_lane, ep_start = index["ep_lane"][:n], index["ep_start"][:n]
        kept, damaged = replay._read_chunks(frames_dir, index["chunks"], sizes)
        lost = 0
        if damaged:
            steps_before = _num_steps(ep_lane, ep_start, index["ep_length"][:n], sizes)
            n, cut_sizes = _prefix_before(ep_lane, ep_start, index["ep_length"][:n], sizes, kept)
            lost = steps_before - _num_steps(ep_lane[:n], ep_start[:n], index["ep_length"][:n], cut_sizes)
            cut_lanes = [i for i in range(replay.num_lanes) if cut_sizes[i] < sizes[i]]
            logging.warning(
                "replay %s: %s. Kept the %d steps before the first loss in every lane, lost %d steps (%d lost "
                "before) of lanes %s; their episodes cut short now end with trunc set and collection goes on in "
                "new episodes.", directory, "; ".join(damaged), steps_before - lost, lost, replay.num_lost_steps,
                cut_lanes)
            replay.num_lost_steps += lost
            for i in cut_lanes:  # frames read past the cut are not part of the dataset
                replay._lanes[i].write_frames(cut_sizes[i], np.zeros((sizes[i] - cut_sizes[i],) + replay.frame_shape,
                                                                     np.uint8))
            sizes = cut_sizes
            ep_lane, ep_start = ep_lane[:n], ep_start[:n]
        # An episode in progress at that time had fewer steps and was not finished yet.
        ep_length = np.minimum(index["ep_length"][:n], np.array(sizes)[ep_lane] - ep_start - 1)
        ep_finished = index["ep_finished"][:n] & (ep_length == index["ep_length"][:n])
        replay.num_episodes = n
        replay._ep_lane, replay._ep_start = ep_lane.copy(), ep_start.copy()
        replay._ep_length, replay._ep_finished = ep_length.astype(np.int32), ep_finished.copy()
        for i, lane in enumerate(replay._lanes):
            lane.size = sizes[i]
            is_step = np.zeros(lane.size, bool)
            for e in np.flatnonzero(replay._ep_lane == i):
                s = replay._ep_start[e]
                is_step[s:s + replay._ep_length[e]] = True
            # Slots that are not steps (the frame after each episode's last step) carry no step data.
            steps = [np.where(is_step, index[f"{name}_{i}"][:lane.size], 0).astype(index[f"{name}_{i}"].dtype)
                     for name in ("act", "rew", "end", "trunc")]
            in_progress = np.flatnonzero((replay._ep_lane == i) & ~replay._ep_finished)
            if damaged and len(in_progress) and i in cut_lanes:
                # The envs went on past what was kept: this episode cannot be continued, it was cut.
                e = int(in_progress[-1])
                steps[3][replay._ep_start[e] + replay._ep_length[e] - 1] = True
                replay._ep_finished[e] = True
                in_progress = in_progress[:-1]
            lane.write_steps(0, *steps)
            replay.counts_rew += np.bincount(np.sign(steps[1][is_step]).astype(np.int64) + 1, minlength=3)
            replay.counts_end += np.bincount(steps[2][is_step].astype(np.int64), minlength=2)
            if len(in_progress):
                replay._open[i] = int(in_progress[-1])
        replay._save_dir, replay._saved_size = (None if read_only else directory), list(sizes)
        replay._chunks = np.array([(lane, start, min(count, sizes[lane] - start), file_id, crc)
                                   for lane, start, count, file_id, crc in kept if sizes[lane] > start],
                                  np.int64).reshape(-1, files.CHUNK_COLUMNS)
        if up_to is not None and replay.num_steps + lost != up_to["num_steps"]:
            raise ValueError(f"{directory} does not hold the dataset described by up_to={up_to} "
                             f"(it has {replay.num_steps} steps there); was it saved by another run?")
        return replay

    def _read_chunks(self, frames_dir: str, chunks: np.ndarray, sizes: List[int]
                     ) -> Tuple[List[Tuple[int, ...]], List[str]]:
        """Writes the frames of lane slots [0, sizes) from their chunk files, lane by lane in slot order,
        stopping a lane at its first unreadable chunk. Returns the chunks read (rows) and what was wrong."""
        kept, damaged = [], []
        broken = [False] * self.num_lanes
        for row in sorted(chunks.tolist(), key=lambda r: (r[0], r[1])):
            lane, start, count, file_id, crc = row
            if broken[lane] or start >= sizes[lane]:
                continue
            path = os.path.join(frames_dir, files.chunk_name(file_id))
            try:
                frames, crc = files.read_chunk(path, count, self.frame_shape, crc)
            except (OSError, ValueError) as error:
                why = "missing" if isinstance(error, FileNotFoundError) else f"damaged: {error}"
                damaged.append(f"{path} (lane {lane}, slots {start}-{start + count - 1}) is {why}")
                broken[lane] = True
                continue
            self._lanes[lane].write_frames(start, frames[:sizes[lane] - start])
            kept.append((lane, start, count, file_id, crc))
        return kept, damaged


def _check_up_to(up_to: Dict[str, Any], n: int, sizes: List[int], directory: str) -> Tuple[int, List[int]]:
    # A checkpoint's summary may be older than the directory, which the first save after a resume upgrades.
    if (up_to.get("version") not in files.READABLE_VERSIONS or len(up_to["lane_sizes"]) != len(sizes)
            or up_to["num_episodes"] > n or any(a > b for a, b in zip(up_to["lane_sizes"], sizes))):
        raise ValueError(f"up_to={up_to} is not an earlier state of the dataset in {directory} ({n} episodes, "
                         f"lane sizes {sizes}). Fix: pass the summary() stored with the checkpoint of this run.")
    return int(up_to["num_episodes"]), [int(s) for s in up_to["lane_sizes"]]


def _num_steps(ep_lane: np.ndarray, ep_start: np.ndarray, ep_length: np.ndarray, sizes: List[int]) -> int:
    """Steps of the episodes when their lanes are cut to `sizes` (an episode keeps the slots before its lane's
    size but one, the frame after its last step)."""
    return int(np.maximum(np.minimum(ep_length, np.array(sizes)[ep_lane] - ep_start - 1), 0).sum())


def _prefix_before(ep_lane: np.ndarray, ep_start: np.ndarray, ep_length: np.ndarray, sizes: List[int],
                   kept: List[Tuple[int, ...]]) -> Tuple[int, List[int]]:
    """(episodes, lane sizes) of the longest consistent prefix whose frames are all in the `kept` chunks.

    Episode ids are in order of first appearance, so the prefix stops at the first episode that cannot keep
    a step (its first two slots not both intact); each lane then ends with its last kept episode."""
    readable = [0] * len(sizes)  # per lane, the slots [0, readable) lie in kept chunks
    for lane, start, count, _, _ in kept:  # in slot order within a lane
        if start == readable[lane]:
            readable[lane] = min(start + count, sizes[lane])
    intact = ep_start + 2 <= np.array(readable)[ep_lane]
    n = int(np.argmin(intact)) if not intact.all() else len(intact)
    cut = [0] * len(sizes)
    for e in range(n):
        lane = int(ep_lane[e])
        cut[lane] = max(cut[lane], min(int(ep_start[e] + ep_length[e]) + 1, readable[lane]))
    return n, cut
