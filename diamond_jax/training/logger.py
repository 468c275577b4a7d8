"""What a run shows: TensorBoard scalars, and imagined rollouts as animated GIFs in the image dashboard.

A resumed run recomputes what it had computed after its checkpoint: before it logs again, the events past the
checkpoint are dropped from the event files (they are rewritten into one), so that no step shows twice and a
resume with a new learning rate does not keep the old values beside the new.
"""

import glob
import io
import os
import secrets
import struct
from typing import Any, Dict, Iterator

import imageio.v3 as iio
import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2
from tensorboardX.proto.summary_pb2 import Summary

EVENT_FILES = "events.out.tfevents.*"


def video_frames(obs: np.ndarray, max_rows: int = 4, scale: int = 2) -> np.ndarray:
    """Frames [b, T, h, w, 3] in [-1, 1] -> uint8 [T, scale h, scale max_rows w, 3], rows side by side."""
    obs = obs[:max_rows]
    frames = np.concatenate(list(obs), axis=2)  # [T, h, rows * w, 3]
    frames = np.repeat(np.repeat(frames, scale, axis=1), scale, axis=2)
    return np.clip(np.round((frames + 1) * 127.5), 0, 255).astype(np.uint8)


def encode_gif(frames: np.ndarray, fps: float = 8.0) -> bytes:
    buffer = io.BytesIO()
    iio.imwrite(buffer, frames, extension=".gif", duration=1000 / fps, loop=0)
    return buffer.getvalue()


def read_events(path: str) -> Iterator[event_pb2.Event]:
    """The events of a TensorBoard event file (TFRecords: length, its CRC, an Event, its CRC); a record cut
    short by a crash ends the file."""
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        if i + 12 + n + 4 > len(data):
            return
        yield event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4


class RunLogger:
    """TensorBoard summaries of a run; a disabled logger (processes other than the first) writes nothing.

    The event file is created at the first write, so that a start that logs nothing leaves no empty file.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.directory = os.path.join(workdir, "tensorboard")
        self.enabled = enabled
        self._writer = None

    @property
    def writer(self):
        if self._writer is None and self.enabled:
            # File names hold the second they were made in: the suffix keeps a resume within the same second
            # from writing over (or, in drop_after, deleting) the file it continues.
            self._writer = SummaryWriter(self.directory, filename_suffix=f".{secrets.token_hex(4)}")
        return self._writer

    def drop_after(self, last_step: Dict[str, int], last_count: Dict[str, int]) -> None:
        """Rewrites the event files without the summaries past where a resumed run stands. A summary whose tag
        starts with a key of `last_step` is kept when its step is at most that value; one whose tag starts with
        a key of `last_count`, when fewer than that many summaries of its tag came before it."""
        paths = sorted(glob.glob(os.path.join(self.directory, EVENT_FILES)))
        if not self.enabled or not paths:
            return
        kept, seen = [], {}

        def keep(tag: str, step: int) -> bool:
            seen[tag] = seen.get(tag, 0) + 1
            return not (any(tag.startswith(k) and step > s for k, s in last_step.items())
                        or any(tag.startswith(k) and seen[tag] > n for k, n in last_count.items()))

        for path in paths:
            for event in read_events(path):
                if not event.HasField("summary"):
                    continue  # the file version: the new file has its own
                values = [v for v in event.summary.value if keep(v.tag, event.step)]
                if values:
                    del event.summary.value[:]
                    event.summary.value.extend(values)
                    kept.append(event)
        for event in kept:
            self.writer.file_writer.add_event(event, step=event.step, walltime=event.wall_time)
        if kept:
            self.writer.flush()
        for path in paths:
            os.remove(path)

    def scalars(self, step: int, values: Dict[str, Any], prefix: str = "") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if np.ndim(value) == 0:
                self.writer.add_scalar(prefix + name, float(value), step)
            else:  # confusion matrices: rows are targets, columns predictions
                matrix = np.asarray(value, np.float64)
                for i in range(len(matrix)):
                    recall = matrix[i, i] / max(matrix[i].sum(), 1)
                    precision = matrix[i, i] / max(matrix[:, i].sum(), 1)
                    self.writer.add_scalar(f"{prefix}{name}/recall_class_{i}", recall, step)
                    self.writer.add_scalar(f"{prefix}{name}/precision_class_{i}", precision, step)

    def video(self, step: int, tag: str, obs: np.ndarray) -> None:
        if self.writer is None:
            return
        frames = video_frames(obs)
        t, h, w, _ = frames.shape
        image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=encode_gif(frames))
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
