"""Learning curves: test return against environment steps, one panel per game, for any suite (Atari 100k,
MinAtar and Catch). `python -m diamond_jax.report RUNS --curves --out=DIR` writes curves.png and curves.csv.

A run directory is one with an evaluations.jsonl (finished or not) and its config.json, which names the game
and the environment backend. Each run contributes its mean test return at each evaluation; where several
evaluations share an environment step (the training-only epochs at the end collect nothing), the run's last
one counts (the final evaluation, over the most episodes). At each step the curve is the mean over the seeds
evaluated there, with a 95% percentile-bootstrap band over seeds (seeds resampled with replacement); the
random policy's return is a dashed line.
"""

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from diamond_jax import scores

EVALUATIONS, CONFIG = "evaluations.jsonl", "config.json"


class CurvesError(ValueError):
    """An input the curves cannot use; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class RunCurve:
    path: Path
    suite: str
    game: str
    seed: int
    points: dict  # env_steps -> mean test return


@dataclasses.dataclass(frozen=True)
class GameCurve:
    suite: str
    game: str
    env_steps: np.ndarray  # [k]
    num_seeds: np.ndarray  # [k]: seeds evaluated at each step
    mean: np.ndarray  # [k]
    low: np.ndarray  # [k]: 95% bootstrap band
    high: np.ndarray
    random: float


def load_run_curve(run_dir: Path) -> RunCurve:
    config_path, evaluations_path = run_dir / CONFIG, run_dir / EVALUATIONS
    try:
        config = json.loads(config_path.read_text())
        backend = config.get("env", {}).get("backend", "envpool")
        suite, game, seed = scores.SUITES[backend], config["game"], int(config["seed"])
    except (OSError, ValueError, KeyError) as e:
        raise CurvesError(f"{config_path}: unreadable run config ({type(e).__name__}: {e}). Fix: pass run "
                          "directories written by python -m diamond_jax.main.") from e
    points = {}
    for number, line in enumerate(evaluations_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            points[int(record["env_steps"])] = float(record["mean_return"])  # later records replace earlier
        except (ValueError, KeyError) as e:
            raise CurvesError(f"{evaluations_path}, line {number}: not an evaluation record ({e}). Fix: remove "
                              "the line or the run.") from e
    return RunCurve(run_dir, suite, game, seed, points)


def find_runs(paths: list) -> list:
    """Every run directory (holding evaluations.jsonl) under `paths`, finished or not."""
    runs = {}
    for path in map(Path, paths):
        if not path.is_dir():
            raise CurvesError(f"{path} is not a directory. Pass run directories or folders that contain them.")
        for evaluations in path.rglob(EVALUATIONS):
            runs[evaluations.parent.resolve()] = evaluations.parent
    if not runs:
        raise CurvesError(f"no {EVALUATIONS} under {', '.join(map(str, paths))}: no run has evaluated yet.")
    return [load_run_curve(p) for p in sorted(runs.values())]


def bootstrap_band(values: np.ndarray, rng: np.random.Generator, reps: int) -> tuple:
    """The 2.5% and 97.5% percentiles of the mean of `values` resampled with replacement."""
    if len(values) == 1:
        return float(values[0]), float(values[0])
    means = values[rng.integers(0, len(values), (reps, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def game_curves(runs: list, reps: int = 10_000, seed: int = 0) -> list:
    by_game = {}
    for run in runs:
        by_game.setdefault((run.suite, run.game), []).append(run)
    out = []
    rng = np.random.default_rng(seed)
    for (suite, game), game_runs in sorted(by_game.items()):
        steps = sorted({s for run in game_runs for s in run.points})
        rows = []
        for s in steps:
            values = np.array([run.points[s] for run in game_runs if s in run.points])
            rows.append((s, len(values), values.mean(), *bootstrap_band(values, rng, reps)))
        cols = np.array(rows, dtype=np.float64).T
        random = scores.random_scores(suite).get(game, float("nan"))
        out.append(GameCurve(suite, game, cols[0].astype(np.int64), cols[1].astype(np.int64), cols[2], cols[3],
                             cols[4], random))
    return out


def write_csv(curves: list, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["suite", "game", "env_steps", "seeds", "mean_return", "low_95", "high_95",
                         "random_return"])
        for c in curves:
            for i in range(len(c.env_steps)):
                writer.writerow([c.suite, c.game, int(c.env_steps[i]), int(c.num_seeds[i]), f"{c.mean[i]:.4f}",
                                 f"{c.low[i]:.4f}", f"{c.high[i]:.4f}", f"{c.random:.4f}"])


def plot(curves: list, path: Path) -> None:
    cols = min(3, len(curves))
    rows = -(-len(curves) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    for i, c in enumerate(curves):
        ax = fig.add_subplot(rows, cols, i + 1)
        seeds = int(c.num_seeds.max())
        ax.fill_between(c.env_steps, c.low, c.high, alpha=0.25, color="C0", linewidth=0,
                        label="95% bootstrap band" if seeds > 1 else None)
        # Runs still going, or stopped early, reach fewer steps: their later points average fewer seeds.
        full = c.num_seeds == seeds
        label = f"mean over {seeds} seed(s)" if full.all() else f"mean over {seeds} seeds (hollow: over fewer)"
        ax.plot(c.env_steps, c.mean, "-", color="C0", label=label)
        ax.plot(c.env_steps[full], c.mean[full], "o", color="C0", markersize=3)
        ax.plot(c.env_steps[~full], c.mean[~full], "o", color="C0", markerfacecolor="white", markersize=4)
        if np.isfinite(c.random):
            ax.axhline(c.random, color="gray", linestyle="--", label=f"random policy ({c.random:.2f})")
        ax.set_title(f"{c.game} ({c.suite})")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("test return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=120)


def write_curves(paths: list, out: Path, reps: int = 10_000, seed: int = 0) -> list:
    """Writes curves.png and curves.csv into `out`; returns the game curves."""
    curves = game_curves(find_runs(paths), reps, seed)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(curves, out / "curves.csv")
    plot(curves, out / "curves.png")
    return curves
