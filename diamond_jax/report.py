"""Results report: returns and human-normalised scores (HNS) of our runs next to DIAMOND's published ones.

  python -m diamond_jax.report runs/ --out=report/                 # every run directory below runs/
  python -m diamond_jax.report runs/atari100k/Pong-0 runs/atari100k/Pong-1 --out=report/
  python -m diamond_jax.report --published --out=report/           # DIAMOND's published returns alone
  python -m diamond_jax.report runs/minatar --curves --out=curves/  # learning curves, any suite

With --curves: test return against environment steps per game, see diamond_jax/curves.py.

Writes report.md (also printed), per_game.csv, aggregates.csv and PNG plots into --out. Aggregates follow
rliable (Agarwal et al., 2021), with 95% stratified-bootstrap confidence intervals that resample runs
within each game: mean and median over games of the per-game mean HNS, interquartile mean (IQM) and
optimality gap over all runs. Runs whose config is not the paper's (the debug preset, a changed field; as their
results.json says) are marked as such in every table and plot: their numbers are no results to compare.
"""

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from diamond_jax import curves, scores
from diamond_jax.envs.games import ATARI_100K_GAMES

try:
    from rliable import library, metrics
except (ImportError, TypeError) as e:  # TypeError: rliable's pinned arch<8 breaks at import under pandas>=3.
    raise ImportError(
        f"rliable cannot be imported ({type(e).__name__}: {e}). Fix: pip install -e '.[sweep]', which brings "
        "rliable with pandas<3 (rliable pins arch<8, and arch<8 fails to import under pandas>=3)."
    ) from e

RESULTS, EVALUATIONS = "results.json", "evaluations.jsonl"
METRICS = {"mean": "Mean", "median": "Median", "iqm": "IQM", "optimality_gap": "Optimality gap"}
PUBLISHED = "DIAMOND (published)"

log = logging.getLogger(__name__)


class ReportError(ValueError):
    """An input the report cannot use; the message names the file or argument and the fix."""


@dataclasses.dataclass(frozen=True)
class Run:
    path: Path
    game: str
    seed: int
    mean_return: float
    curve: tuple[tuple[int, float], ...]  # (env_steps, mean test return) of each evaluation during training
    # Fields in which the run's config differs from the paper's (results.json's differs_from_paper); a
    # results.json without the paper_config mark, from an older trainer, counts as not the paper's.
    differs_from_paper: tuple[str, ...] = ()
    paper_config: bool = True


@dataclasses.dataclass(frozen=True)
class GameRow:
    game: str
    seeds: int
    mean_return: float
    hns: float
    published_mean_return: float | None  # None when the report is about the published returns themselves
    published_hns: float | None
    not_paper_runs: int = 0  # runs of this game whose config is not the paper's


@dataclasses.dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class Aggregates:
    source: str
    num_games: int
    num_runs: int
    seeds_per_game: tuple[int, ...]
    games_above_human: int
    intervals: dict[str, Interval]  # keyed like METRICS


@dataclasses.dataclass(frozen=True)
class Report:
    rows: list[GameRow]
    aggregates: list[Aggregates]  # the report's subject first
    runs: list[Run]
    skipped: list[tuple[Path, str]]  # (run directory, why)
    reps: int
    seed: int


# ---------------------------------------------------------------------------------------------------------
# Reading run directories.


def find_run_dirs(paths: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Finished run directories (holding results.json) under `paths`, and unfinished ones with the reason."""
    finished, unfinished = {}, {}
    for path in map(Path, paths):
        if not path.is_dir():
            raise ReportError(f"{path} is not a directory. Pass run directories (holding {RESULTS}) or folders "
                              "that contain them.")
        found = [p.parent for p in path.rglob(RESULTS)]
        pending = [p.parent for p in path.rglob(EVALUATIONS) if not (p.parent / RESULTS).is_file()]
        # A directory named on the command line with nothing below it is a run that has not written yet.
        for run_dir in found:
            finished[run_dir.resolve()] = run_dir
        for run_dir in pending or ([] if found else [path]):
            unfinished[run_dir.resolve()] = (run_dir, f"no {RESULTS} (unfinished run?)")
    for run_dir, why in unfinished.values():
        log.warning("Skipping %s: %s", run_dir, why)
    return sorted(finished.values()), sorted(unfinished.values())


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _malformed(path: Path, problem: str) -> ReportError:
    return ReportError(f"{path} is malformed: {problem}. Fix the file, or leave its run directory out of the "
                       "report's inputs.")


def _read_results(path: Path) -> dict:
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise _malformed(path, f"not valid JSON ({e})") from e
    if not isinstance(results, dict):
        raise _malformed(path, f"expected a JSON object, got {type(results).__name__}")
    missing = [k for k in ("game", "seed", "returns", "mean_return") if k not in results]
    if missing:
        raise _malformed(path, f"missing key(s) {', '.join(missing)}")
    if not isinstance(results["game"], str):
        raise _malformed(path, f"game={results['game']!r} is not a game name")
    if results.get("suite", "atari100k") != "atari100k":
        raise ReportError(f"{path} is a {results['suite']} run ({results['game']}): the score tables and plots are "
                          "Atari 100k's (human-normalised). Fix: --curves for its learning curves, or leave its run "
                          "directory out of the report's inputs.")
    try:
        scores.check_game(results["game"])
    except ValueError as e:
        raise _malformed(path, str(e).rstrip(".")) from e
    if not isinstance(results["seed"], int) or isinstance(results["seed"], bool):
        raise _malformed(path, f"seed={results['seed']!r} is not an integer")
    returns = results["returns"]
    if not isinstance(returns, list) or not returns or not all(map(_is_number, returns)):
        raise _malformed(path, "returns must be a non-empty list of finite numbers")
    mean_return = results["mean_return"]
    # Catches a file whose fields were written by different runs or truncated by hand.
    if not _is_number(mean_return) or not math.isclose(mean_return, np.mean(returns), rel_tol=1e-4, abs_tol=1e-6):
        raise _malformed(path, f"mean_return={mean_return!r} is not the mean of returns ({np.mean(returns)!r})")
    return results


def _read_curve(path: Path) -> tuple[tuple[int, float], ...]:
    if not path.is_file():
        log.warning("%s is missing: this run has no curve in the return-over-steps plot.", path)
        return ()
    curve = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            evaluation = json.loads(line)
        except json.JSONDecodeError as e:
            raise _malformed(path, f"line {number} is not valid JSON ({e})") from e
        if not isinstance(evaluation, dict):
            raise _malformed(path, f"line {number} is not a JSON object")
        steps, mean_return = evaluation.get("env_steps"), evaluation.get("mean_return")
        if not isinstance(steps, int) or isinstance(steps, bool) or not _is_number(mean_return):
            raise _malformed(path, f"line {number} needs an integer env_steps and a finite mean_return, got "
                                   f"env_steps={steps!r}, mean_return={mean_return!r}")
        curve.append((steps, float(mean_return)))
    return tuple(sorted(curve))


def load_run(run_dir: Path) -> Run:
    results = _read_results(run_dir / RESULTS)
    return Run(path=run_dir, game=results["game"], seed=results["seed"], mean_return=float(results["mean_return"]),
               curve=_read_curve(run_dir / EVALUATIONS), paper_config=results.get("paper_config") is True,
               differs_from_paper=tuple(results.get("differs_from_paper") or ()))


def load_runs(run_dirs: list[Path]) -> list[Run]:
    runs = {}
    for run in map(load_run, run_dirs):
        # The same seed twice would weigh it double in every aggregate.
        other = runs.setdefault((run.game, run.seed), run)
        if other is not run:
            raise ReportError(f"{other.path} and {run.path} are both {run.game} seed {run.seed}. Pass only one "
                              "of them.")
    return sorted(runs.values(), key=lambda r: (ATARI_100K_GAMES.index(r.game), r.seed))


# ---------------------------------------------------------------------------------------------------------
# Statistics.


def _in_game_order(by_game: dict) -> list[tuple[str, list]]:
    return sorted(by_game.items(), key=lambda item: ATARI_100K_GAMES.index(item[0]))


def hns_by_game(returns_by_game: dict[str, list[float]]) -> dict[str, np.ndarray]:
    """Game -> HNS of each run, games in the benchmark's order."""
    return {g: np.array([scores.human_normalized_score(g, r) for r in returns])
            for g, returns in _in_game_order(returns_by_game)}


def _matrix_metrics(hns: np.ndarray) -> np.ndarray:
    """The four aggregates of a (runs x games) HNS matrix, rliable's conventions."""
    return np.array([metrics.aggregate_mean(hns), metrics.aggregate_median(hns), metrics.aggregate_iqm(hns),
                     metrics.aggregate_optimality_gap(hns)])


def _ragged_metrics(*columns: np.ndarray) -> np.ndarray:
    """The four aggregates when games have different numbers of runs; each column is (runs_of_game x 1).

    rliable's matrix needs as many runs per game, so: mean, median and optimality gap weigh games equally
    (each game's mean first), IQM pools all runs. With equal runs per game this equals _matrix_metrics.
    """
    game_means = np.array([[c.mean() for c in columns]])
    return np.array([metrics.aggregate_mean(game_means), metrics.aggregate_median(game_means),
                     metrics.aggregate_iqm(np.concatenate(columns)),
                     np.mean([metrics.aggregate_optimality_gap(c) for c in columns])])


@contextlib.contextmanager
def _numpy_global_seed(seed: int):
    # rliable's bootstraps draw their indices from np.random's global generator and ignore random_state.
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def aggregate(source: str, hns: dict[str, np.ndarray], reps: int, seed: int) -> Aggregates:
    """Point estimates and 95% stratified-bootstrap CIs of the aggregate HNS (runs resampled within games)."""
    columns = [h[:, None] for h in hns.values()]
    seeds_per_game = tuple(len(h) for h in hns.values())
    if len(set(seeds_per_game)) == 1:
        data, func = np.hstack(columns), _matrix_metrics
    else:
        # A list makes rliable resample each game's runs independently, whatever their number.
        data, func = columns, _ragged_metrics
    with _numpy_global_seed(seed):
        points, intervals = library.get_interval_estimates({source: data}, func, reps=reps)
    return Aggregates(
        source=source, num_games=len(hns), num_runs=sum(seeds_per_game), seeds_per_game=seeds_per_game,
        games_above_human=sum(h.mean() > 1 for h in hns.values()),
        intervals={m: Interval(float(points[source][i]), float(intervals[source][0, i]),
                               float(intervals[source][1, i])) for i, m in enumerate(METRICS)})


# ---------------------------------------------------------------------------------------------------------
# Building the report.


def build_report(run_paths: list[str], reps: int, seed: int) -> Report:
    """Our runs found under `run_paths` next to DIAMOND's published returns on the same games."""
    run_dirs, skipped = find_run_dirs(run_paths)
    if not run_dirs:
        raise ReportError(f"No finished run (a directory holding {RESULTS}) under {', '.join(run_paths)}. Wait for "
                          "the runs to finish, or pass --published to report on DIAMOND's published returns alone.")
    runs = load_runs(run_dirs)
    returns = {}
    for run in runs:
        returns.setdefault(run.game, []).append(run.mean_return)
    all_published = scores.diamond_published_returns()
    published = {g: all_published[g] for g in returns}
    not_paper = [run.game for run in runs if not run.paper_config]
    rows = [GameRow(g, len(r), float(np.mean(r)), scores.human_normalized_score(g, np.mean(r)),
                    float(np.mean(published[g])), scores.human_normalized_score(g, np.mean(published[g])),
                    not_paper.count(g))
            for g, r in _in_game_order(returns)]
    published_source = (PUBLISHED if len(returns) == len(ATARI_100K_GAMES)
                        else f"DIAMOND (published, same {len(returns)} games)")
    ours = f"Ours ({NOT_PAPER}: {len(not_paper)} of {len(runs)} runs)" if not_paper else "Ours"
    aggregates = [aggregate(ours, hns_by_game(returns), reps, seed),
                  aggregate(published_source, hns_by_game(published), reps, seed)]
    return Report(rows, aggregates, runs, skipped, reps, seed)


def build_published_report(reps: int, seed: int) -> Report:
    """DIAMOND's published returns alone: 26 games x 5 seeds."""
    published = scores.diamond_published_returns()
    rows = [GameRow(g, len(r), float(np.mean(r)), scores.human_normalized_score(g, np.mean(r)), None, None)
            for g, r in _in_game_order(published)]
    return Report(rows, [aggregate(PUBLISHED, hns_by_game(published), reps, seed)], [], [], reps, seed)


# ---------------------------------------------------------------------------------------------------------
# Outputs.


NOT_PAPER = "not the paper's config"


def _game_label(row: GameRow) -> str:
    return f"{row.game} ({NOT_PAPER}: {row.not_paper_runs} of {row.seeds} runs)" if row.not_paper_runs else row.game


def _interval(i: Interval) -> str:
    return f"{i.estimate:.3f} [{i.low:.3f}, {i.high:.3f}]"


def render_markdown(report: Report, plots: list[str]) -> str:
    compare = report.rows[0].published_mean_return is not None
    subject = report.aggregates[0]
    lines = ["# Atari 100k results", ""]
    if compare:
        lines += [f"Our {subject.num_runs} finished runs on {subject.num_games} games, next to DIAMOND's published "
                  "returns (Alonso et al., 2024; 5 seeds per game) on the same games.", ""]
        not_paper = sum(r.not_paper_runs for r in report.rows)
        if not_paper:
            lines += [f"**{not_paper} of {subject.num_runs} runs do not use the paper's config** (the debug "
                      "preset, or changed fields: see Runs below). Their numbers, and every aggregate that "
                      "includes them, are no results to compare with DIAMOND's.", ""]
    else:
        lines += ["DIAMOND's published returns (Alonso et al., 2024): 26 games x 5 seeds, each a mean over 100 "
                  "test episodes.", ""]

    lines += ["## Aggregate human-normalised score", "",
              "| | Games | Runs | " + " | ".join(METRICS.values()) + " | Games above human |",
              "|---|---:|---:|" + "---|" * len(METRICS) + "---:|"]
    for a in report.aggregates:
        lines.append(f"| {a.source} | {a.num_games} | {a.num_runs} | "
                     + " | ".join(_interval(a.intervals[m]) for m in METRICS)
                     + f" | {a.games_above_human} / {a.num_games} |")
    lines += ["", f"Point estimates with 95% stratified-bootstrap confidence intervals (rliable, percentile "
                  f"method, {report.reps} reps, seed {report.seed}), resampling runs within each game. HNS = "
                  "(return - random) / (human - random). Mean and median: over games, of each game's mean HNS. "
                  "IQM: interquartile mean over all runs. Optimality gap: 1 - mean of min(HNS, 1) over all runs. "
                  "A game is above human when its mean HNS exceeds 1."]
    ragged = [a for a in report.aggregates if len(set(a.seeds_per_game)) > 1]
    for a in ragged:
        lines += ["", f"{a.source}: games have different numbers of seeds "
                      f"({min(a.seeds_per_game)} to {max(a.seeds_per_game)}), so each game's runs are resampled "
                      "on their own; mean, median and optimality gap weigh every game equally (each game's "
                      "mean first) and IQM pools all runs."]

    lines += ["", "## Per game", ""]
    if compare:
        lines += ["| Game | Seeds | Mean return | HNS | DIAMOND return | DIAMOND HNS |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {_game_label(r)} | {r.seeds} | {r.mean_return:.1f} | {r.hns:.3f} | "
                  f"{r.published_mean_return:.1f} | {r.published_hns:.3f} |" for r in report.rows]
    else:
        lines += ["| Game | Seeds | Mean return | HNS |", "|---|---:|---:|---:|"]
        lines += [f"| {r.game} | {r.seeds} | {r.mean_return:.1f} | {r.hns:.3f} |" for r in report.rows]
    lines += ["", "Mean return: mean over seeds of each run's mean test return."]

    lines += ["", "## Plots"]
    for plot in plots:
        lines += ["", f"![{Path(plot).stem}]({plot})"]

    if compare:
        lines += ["", "## Runs", "", f"Included ({len(report.runs)}):", ""]
        lines += [f"- `{r.path}`: {r.game}, seed {r.seed}, mean return {r.mean_return:.1f}"
                  + ("" if r.paper_config else f"; {NOT_PAPER} ({_differences(r)})") for r in report.runs]
        lines += ["", f"Skipped ({len(report.skipped)}):", ""]
        lines += [f"- `{path}`: {why}" for path, why in report.skipped] or ["- none"]
    return "\n".join(lines) + "\n"


def _differences(run: Run) -> str:
    if not run.differs_from_paper:
        return "its results.json has no paper_config mark"
    shown = ", ".join(run.differs_from_paper[:6])
    more = len(run.differs_from_paper) - 6
    return f"differs in {shown}" + (f" and {more} more field(s)" if more > 0 else "")


def write_per_game_csv(report: Report, path: Path) -> None:
    columns = ["game", "seeds", "mean_return", "hns", "above_human"]
    compare = report.rows[0].published_mean_return is not None
    if compare:
        columns += ["published_mean_return", "published_hns", "not_paper_config_runs"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in report.rows:
            row = [r.game, r.seeds, r.mean_return, r.hns, r.hns > 1]
            writer.writerow(row + ([r.published_mean_return, r.published_hns, r.not_paper_runs] if compare else []))


def write_aggregates_csv(report: Report, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "games", "runs", "games_above_human"]
                        + [f"{m}{suffix}" for m in METRICS for suffix in ("", "_ci_low", "_ci_high")])
        for a in report.aggregates:
            writer.writerow([a.source, a.num_games, a.num_runs, a.games_above_human]
                            + [v for m in METRICS for v in dataclasses.astuple(a.intervals[m])])


def plot_per_game_hns(report: Report, path: Path) -> None:
    compare = report.rows[0].published_mean_return is not None
    fig = Figure(figsize=(8, 1.5 + 0.3 * len(report.rows)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(report.rows))
    if compare:
        ax.barh(y - 0.2, [r.hns for r in report.rows], height=0.4, label=report.aggregates[0].source)
        ax.barh(y + 0.2, [r.published_hns for r in report.rows], height=0.4, label=PUBLISHED)
    else:
        ax.barh(y, [r.hns for r in report.rows], height=0.6, label=report.aggregates[0].source)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="human")
    ax.set_yticks(y, [_game_label(r) for r in report.rows])
    ax.invert_yaxis()
    ax.set_xlabel("human-normalised score (mean over seeds)")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=100)


def plot_aggregates(report: Report, path: Path) -> None:
    fig = Figure(figsize=(12, 1.6 + 0.6 * len(report.aggregates)), layout="constrained")
    axes = fig.subplots(1, len(METRICS), sharey=True)
    y = np.arange(len(report.aggregates))
    for ax, (metric, title) in zip(axes, METRICS.items()):
        intervals = [a.intervals[metric] for a in report.aggregates]
        ax.barh(y, [i.high - i.low for i in intervals], left=[i.low for i in intervals], height=0.6,
                color=[f"C{k}" for k in y], alpha=0.5)
        ax.vlines([i.estimate for i in intervals], y - 0.3, y + 0.3, colors="black")
        ax.use_sticky_edges = False  # Bars would pin the axis to a CI's edge and hide an estimate of 0 there.
        ax.margins(x=0.3)
        ax.set_title(title)
        ax.set_xlabel("human-normalised score")
    axes[0].set_yticks(y, [a.source for a in report.aggregates])
    axes[0].invert_yaxis()
    fig.suptitle("Aggregate HNS: point estimate and 95% bootstrap CI")
    fig.savefig(path, dpi=100)


def mean_curve(curves: list[tuple[tuple[int, float], ...]]) -> tuple[list[int], list[float]]:
    """Mean return across seeds at the environment steps where every seed was evaluated."""
    # Seeds evaluate on one schedule; a seed that ran longer (or shorter) must not skew the mean at the ends.
    by_step = [dict(curve) for curve in curves]
    steps = sorted(set.intersection(*map(set, by_step)))
    return steps, [float(np.mean([c[s] for c in by_step])) for s in steps]


def plot_returns_over_steps(report: Report, path: Path) -> bool:
    """One panel per game: each seed's test return over environment steps and their mean. False if no curves."""
    curves = {}
    for run in report.runs:
        if run.curve:
            curves.setdefault(run.game, []).append(run)
    if not curves:
        return False
    published = {r.game: r.published_mean_return for r in report.rows}
    labels = {r.game: _game_label(r) for r in report.rows}
    cols = min(4, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (game, runs) in zip(axes, curves.items()):
        for run in runs:
            steps, returns = zip(*run.curve)
            # A marker on each evaluation: a curve of one evaluation would otherwise draw nothing.
            ax.plot(steps, returns, linewidth=0.8, alpha=0.5, marker="o", markersize=3,
                    label=f"seed {run.seed}" + ("" if run.paper_config else f" ({NOT_PAPER})"))
        steps, means = mean_curve([r.curve for r in runs])
        if steps:
            ax.plot(steps, means, color="black", linewidth=2, marker="o", markersize=4,
                    label=f"mean of {len(runs)} seeds")
        ax.axhline(published[game], color="gray", linestyle="--", linewidth=1, label="DIAMOND (published)")
        ax.set_title(labels[game], fontsize="medium" if labels[game] == game else "small")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("test return")
        ax.legend(fontsize="x-small")
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=100)
    return True


def write_outputs(report: Report, out: Path) -> str:
    """Writes report.md, the CSVs and the plots into `out`; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    write_per_game_csv(report, out / "per_game.csv")
    write_aggregates_csv(report, out / "aggregates.csv")
    plot_per_game_hns(report, out / "per_game_hns.png")
    plot_aggregates(report, out / "aggregates.png")
    plots = ["per_game_hns.png", "aggregates.png"]
    if plot_returns_over_steps(report, out / "returns_over_steps.png"):
        plots.append("returns_over_steps.png")
    markdown = render_markdown(report, plots)
    (out / "report.md").write_text(markdown)
    return markdown


# ---------------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m diamond_jax.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                        help=f"a run directory written by the trainer (holding {RESULTS} and {EVALUATIONS}), or a "
                             f"folder searched recursively for them. Runs without {RESULTS} (found by their "
                             f"{EVALUATIONS}, or named here) are skipped with a warning")
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for report.md, per_game.csv, aggregates.csv and the plots (created if missing)")
    parser.add_argument("--curves", action="store_true",
                        help="learning curves instead of the report: test return against environment steps, one "
                             "panel per game, mean over seeds with a 95%% bootstrap band and the random policy "
                             "(curves.png, curves.csv); any suite (Atari 100k, MinAtar, Catch), runs finished or "
                             "not")
    parser.add_argument("--published", action="store_true",
                        help="report on DIAMOND's published returns alone (26 games x 5 seeds); takes no RUN_DIR")
    parser.add_argument("--reps", type=int, default=50000,
                        help="bootstrap replications for the 95%% confidence intervals (default: %(default)s, "
                             "rliable's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the bootstrap, so that the intervals are reproducible (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.curves and (args.published or not args.run_dirs):
        parser.error("--curves plots runs: pass their RUN_DIRs (and not --published)")
    if args.published and args.run_dirs:
        parser.error("--published reports on DIAMOND's published returns alone: drop either it or the RUN_DIRs")
    if not args.published and not args.run_dirs:
        parser.error("pass at least one RUN_DIR, or --published to report on DIAMOND's published returns")
    if args.reps < 1:
        parser.error(f"--reps={args.reps}: needs at least 1 bootstrap replication (rliable uses 50000)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # INFO for this module only: rliable logs a line per bootstrap at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    log.setLevel(logging.INFO)
    if args.curves:
        try:
            curves.write_curves(args.run_dirs, args.out, min(args.reps, 10_000), args.seed)
        except curves.CurvesError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        log.info("Wrote curves.png and curves.csv into %s", args.out)
        return 0
    try:
        report = (build_published_report(args.reps, args.seed) if args.published
                  else build_report(args.run_dirs, args.reps, args.seed))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(write_outputs(report, args.out), end="")
    log.info("Wrote the report into %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
