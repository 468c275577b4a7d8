"""Videos of uint8 RGB frames: MP4 (H.264 through imageio-ffmpeg) or GIF (through pillow).

A GIF stores durations in hundredths of a second, and pillow merges identical consecutive frames into one
longer frame: a GIF of a paused game has fewer frames than were written, and the same total duration.
"""

import warnings
from pathlib import Path
from typing import Sequence, Union

import imageio.v2 as imageio
import numpy as np

FORMATS = ("mp4", "gif")


def video_format(path: Union[str, Path]) -> str:
    """The format named by a video path's suffix; a clear error for any other suffix."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ValueError(f"cannot write a video to {path}: the file name must end in "
                         f"{' or '.join('.' + f for f in FORMATS)}. Fix: e.g. {Path(path).with_suffix('.mp4')}")
    return suffix


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of frames [..., h, w, c] by an integer factor: pixels stay sharp."""
    return np.repeat(np.repeat(frames, scale, axis=-3), scale, axis=-2)


def grid(panels: Sequence[np.ndarray], axis: int = -2, gap: int = 2) -> np.ndarray:
    """Panels [..., h, w, 3] side by side (axis -2) or stacked (axis -3), `gap` black pixels apart."""
    shape = list(panels[0].shape)
    shape[axis] = gap
    sep = np.zeros(shape, np.uint8)
    return np.concatenate([p for panel in panels for p in (sep, panel)][1:], axis=axis)


class VideoWriter:
    """Appends frames uint8 [h, w, 3] of one size to a video file; a context manager."""

    def __init__(self, path: Union[str, Path], fps: float):
        if fps <= 0:
            raise ValueError(f"fps={fps}: a video needs a positive frame rate")
        self.path = Path(path)
        self.format = video_format(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.format == "mp4":
            # macro_block_size=1: keep the size as given (imageio would otherwise resize to multiples of 16).
            self._writer = imageio.get_writer(self.path, format="FFMPEG", fps=fps, codec="libx264",
                                              macro_block_size=1, quality=8)
        else:
            self._writer = imageio.get_writer(self.path, format="GIF", duration=1000 / fps, loop=0)
        self.num_frames = 0
        self._shape = None

    def append(self, frame: np.ndarray) -> None:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"expected a uint8 [h, w, 3] frame, got {frame.dtype} {frame.shape}")
        if self._shape is None:
            self._shape = frame.shape
        elif frame.shape != self._shape:
            raise ValueError(f"frame of shape {frame.shape} in a video of {self._shape} frames")
        if self.format == "mp4":
            # H.264 in yuv420p needs an even width and height: pad with a black line.
            frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)))
        with warnings.catch_warnings():
            # The first MP4 frame starts ffmpeg in a subprocess, forked and exec'd at once: JAX's warning about
            # forking a multithreaded process is for forks that go on running Python.
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
            self._writer.append_data(frame)
        self.num_frames += 1

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: Union[str, Path], frames: np.ndarray, fps: float) -> Path:
    """Writes frames uint8 [T, h, w, 3]."""
    with VideoWriter(path, fps) as writer:
        for frame in frames:
            writer.append(frame)
    return writer.path
