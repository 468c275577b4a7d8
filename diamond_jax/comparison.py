"""Real frames beside a world model's, open loop: their PSNR, a side-by-side video and the PSNR files, for the
dream tool's videos of RL runs (diamond_jax/dream.py) and of world models of recorded play
(diamond_jax/world_model/watch.py)."""

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, NamedTuple

import numpy as np

from diamond_jax.video import grid, upscale


class Comparison(NamedTuple):
    real: np.ndarray  # uint8 [rows, T + 1, h, w, 3]: the last frame of the initial condition, then each step's
    imagined: np.ndarray  # uint8 [rows, T + 1, h, w, 3]: the same first frame, then the world model's
    act: np.ndarray  # [rows, T(, size)]: the action taken at frame t of both (int32, or float32 vectors)


def comparison_video(comparison: Comparison, scale: int) -> np.ndarray:
    """Frames [T + 1, h', w', 3]: one row per game (or episode), real frames left, imagined frames right."""
    return grid([grid([upscale(r, scale), upscale(i, scale)]) for r, i in zip(comparison.real, comparison.imagined)],
                axis=-3)


def write_psnr(out: Path, values: np.ndarray, info: Dict[str, Any], subject: str) -> Dict[str, Path]:
    """PSNR [rows, T] of imagined steps 1..T as CSV (a column per row and their mean), JSON (`info`, then the
    values, inf as null) and a plot titled by `subject` (the game, the dataset)."""
    mean = values.mean(axis=0)
    steps = np.arange(1, values.shape[1] + 1)
    paths = {"csv": out / "psnr.csv", "json": out / "psnr.json", "png": out / "psnr.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "mean"] + [f"row_{i}" for i in range(len(values))])
        for t, step in enumerate(steps):
            writer.writerow([int(step), f"{mean[t]:.4f}"] + [f"{v:.4f}" for v in values[:, t]])
    finite = lambda xs: [float(x) if math.isfinite(x) else None for x in xs]
    paths["json"].write_text(json.dumps({**info, "step": steps.tolist(), "psnr_mean": finite(mean),
                                         "psnr": [finite(row) for row in values]}, indent=1, allow_nan=False))
    plot_psnr(paths["png"], values, f"{subject}: imagined vs real frames, open loop")
    return paths


def plot_psnr(path: Path, values: np.ndarray, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    steps = np.arange(1, values.shape[1] + 1)
    shown = np.where(np.isfinite(values), values, np.nan)  # identical frames (inf) would blow up the axis
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    for row in shown:
        ax.plot(steps, row, color="tab:blue", alpha=0.3, linewidth=1)
    ax.plot(steps, np.nanmean(shown, axis=0), color="tab:blue", linewidth=2,
            label=f"mean over {len(values)} games")
    ax.set_xlabel("imagined step")
    ax.set_ylabel("PSNR (dB)")
    # From 0, the PSNR of the largest possible error of uint8 frames: a zoomed-in axis makes small changes
    # look like large ones.
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
