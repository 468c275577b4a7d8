"""What a run shows: TensorBoard scalars, and imagined rollouts as animated GIFs in the image dashboard."""

import io
import os
from typing import Any, Dict

import imageio.v3 as iio
import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX.proto.summary_pb2 import Summary


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


class RunLogger:
    """TensorBoard summaries of a run; a disabled logger (processes other than the first) writes nothing."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if enabled else None

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
        if self.writer is not None:
            self.writer.close()
