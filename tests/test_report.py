"""The results report: reference scores, aggregates against hand-computed values, outputs, bad inputs."""

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diamond_jax import report, scores
from diamond_jax.envs.games import ATARI_100K_GAMES

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPS = 200  # Enough to exercise the bootstrap; the point estimates do not depend on it.

# (random, human) from the standard Atari 100k table, typed in by hand.
FREEWAY, BOXING, PONG = (0.0, 29.6), (0.1, 12.1), (-20.7, 14.6)


def score_for(hns: float, random_human: tuple[float, float]) -> float:
    random, human = random_human
    return random + hns * (human - random)


def write_run(root: Path, game: str, seed: int, mean_return: float, curve_steps=(2000, 4000),
              differs_from_paper=()) -> Path:
    run = root / f"{game}_s{seed}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "game": game, "seed": seed, "env_steps": 100_000, "max_episode_steps": 27_000,
        "returns": [mean_return - 1.0, mean_return + 1.0], "lengths": [900, 1100],
        "mean_return": mean_return, "human_normalized_score": None, "paper_config": not differs_from_paper,
        "differs_from_paper": list(differs_from_paper)}))
    (run / "evaluations.jsonl").write_text("".join(
        json.dumps({"epoch": i, "env_steps": s, "returns": [mean_return * i], "lengths": [1000],
                    "mean_return": mean_return * i}) + "\n" for i, s in enumerate(curve_steps, start=1)))
    return run


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def three_games(tmp_path):
    """Freeway HNS (0, 1), Boxing (1, 3), Pong (0, 0.5): per-game means 0.5, 2.0, 0.25."""
    runs = tmp_path / "runs"
    for game, random_human, hns in (("Freeway", FREEWAY, (0.0, 1.0)), ("Boxing", BOXING, (1.0, 3.0)),
                                    ("Pong", PONG, (0.0, 0.5))):
        for seed, h in enumerate(hns):
            write_run(runs, game, seed, score_for(h, random_human))
    return runs


# ---------------------------------------------------------------------------------------------------------
# Reference scores.


def test_reference_tables_cover_exactly_the_26_games():
    assert set(scores.random_human_scores()) == set(ATARI_100K_GAMES)
    published = scores.diamond_published_returns()
    assert set(published) == set(ATARI_100K_GAMES)
    assert all(len(returns) == 5 for returns in published.values())
    assert scores.random_human_scores()["Pong"] == PONG


def test_human_normalized_score_matches_hand_computation():
    assert scores.human_normalized_score("Alien", 1000.0) == pytest.approx((1000.0 - 227.8) / (7127.7 - 227.8))
    assert scores.human_normalized_score("Pong", 14.6) == pytest.approx(1.0)
    assert scores.human_normalized_score("Pong", -20.7) == pytest.approx(0.0)
    assert scores.human_normalized_score("Pong", 0.0) == pytest.approx(20.7 / 35.3)


def test_unknown_game_raises_naming_it_and_the_valid_games():
    with pytest.raises(ValueError, match=r"'Tetris'.*Alien.*UpNDown"):
        scores.human_normalized_score("Tetris", 10.0)
    with pytest.raises(ValueError, match="'pong'"):
        scores.human_normalized_score("pong", 10.0)


# ---------------------------------------------------------------------------------------------------------
# DIAMOND's published returns.


def test_published_report_reproduces_the_paper_aggregates(tmp_path):
    out = tmp_path / "published"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "diamond_jax.report", "--published", f"--out={out}",
                           f"--reps={REPS}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [row] = read_csv(out / "aggregates.csv")
    assert row["source"] == "DIAMOND (published)"
    assert (row["games"], row["runs"], row["games_above_human"]) == ("26", "130", "11")
    assert round(float(row["mean"]), 3) == 1.459
    assert round(float(row["median"]), 3) == 0.373
    assert round(float(row["iqm"]), 3) == 0.641
    for metric in report.METRICS:
        assert float(row[f"{metric}_ci_low"]) <= float(row[metric]) <= float(row[f"{metric}_ci_high"])
    assert "| DIAMOND (published) | 26 | 130 | 1.459 [" in done.stdout
    assert "| 11 / 26 |" in done.stdout
    assert (out / "report.md").read_text() == done.stdout
    assert len(read_csv(out / "per_game.csv")) == 26


def test_ragged_metrics_equal_rliable_matrix_metrics_when_seeds_agree():
    hns = report.hns_by_game(scores.diamond_published_returns())
    matrix = np.stack(list(hns.values()), axis=1)
    np.testing.assert_allclose(report._ragged_metrics(*(h[:, None] for h in hns.values())),
                               report._matrix_metrics(matrix), rtol=1e-12)


def test_bootstrap_is_reproducible_from_its_seed():
    hns = report.hns_by_game(scores.diamond_published_returns())
    first, again, other = (report.aggregate("x", hns, reps=50, seed=s) for s in (1, 1, 2))
    assert first == again
    assert first.intervals["iqm"] != other.intervals["iqm"]


# ---------------------------------------------------------------------------------------------------------
# Our runs.


def test_synthetic_runs_give_hand_computed_report(three_games, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(three_games), f"--out={out}", f"--reps={REPS}"]) == 0

    per_game = {r["game"]: r for r in read_csv(out / "per_game.csv")}
    assert list(per_game) == ["Boxing", "Freeway", "Pong"]  # the benchmark's order
    assert set(per_game["Pong"]) == {"game", "seeds", "mean_return", "hns", "above_human",
                                     "published_mean_return", "published_hns", "not_paper_config_runs"}
    assert {r["not_paper_config_runs"] for r in per_game.values()} == {"0"}
    expected = {"Freeway": (14.8, 0.5), "Boxing": (24.1, 2.0), "Pong": ((-20.7 - 3.05) / 2, 0.25)}
    for game, (mean_return, hns) in expected.items():
        assert per_game[game]["seeds"] == "2"
        assert float(per_game[game]["mean_return"]) == pytest.approx(mean_return)
        assert float(per_game[game]["hns"]) == pytest.approx(hns)
    assert [per_game[g]["above_human"] for g in ("Boxing", "Freeway", "Pong")] == ["True", "False", "False"]
    # Boxing published: mean of (99.4, 84.0, 97.5, 71.4, 82.2) = 86.9, HNS (86.9 - 0.1) / 12.
    assert float(per_game["Boxing"]["published_mean_return"]) == pytest.approx(86.9)
    assert float(per_game["Boxing"]["published_hns"]) == pytest.approx(86.8 / 12)

    ours, published = read_csv(out / "aggregates.csv")
    assert ours["source"] == "Ours"
    assert published["source"] == "DIAMOND (published, same 3 games)"
    assert (ours["games"], ours["runs"], ours["games_above_human"]) == ("3", "6", "1")
    # Game means 0.5, 2.0, 0.25. Runs sorted: 0, 0, 0.5, 1, 1, 3; IQM drops one run at each end.
    assert float(ours["mean"]) == pytest.approx((0.5 + 2.0 + 0.25) / 3)
    assert float(ours["median"]) == pytest.approx(0.5)
    assert float(ours["iqm"]) == pytest.approx((0 + 0.5 + 1 + 1) / 4)
    assert float(ours["optimality_gap"]) == pytest.approx(1 - (0 + 1 + 1 + 1 + 0 + 0.5) / 6)
    for metric in report.METRICS:
        assert float(ours[f"{metric}_ci_low"]) <= float(ours[metric]) <= float(ours[f"{metric}_ci_high"])
    # Published Freeway 33.32/29.6, Boxing 86.8/12, Pong 41.1/35.3 HNS: all above human.
    assert published["games_above_human"] == "3"

    for png in ("per_game_hns.png", "aggregates.png", "returns_over_steps.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    markdown = (out / "report.md").read_text()
    assert markdown == capsys.readouterr().out
    assert "| Boxing | 2 | 24.1 | 2.000 | 86.9 | 7.233 |" in markdown
    assert "| Ours | 3 | 6 | 0.917 [" in markdown
    assert "Included (6):" in markdown and "Skipped (0):" in markdown
    assert "![returns_over_steps](returns_over_steps.png)" in markdown
    assert "not the paper's config" not in markdown


def test_runs_not_in_the_paper_config_are_marked_in_every_table_and_plot(three_games, tmp_path, monkeypatch):
    # A debug run beside a paper one; and a results.json from before the mark, which cannot vouch for its config.
    write_run(three_games, "Pong", 2, 3.0, curve_steps=(2000,), differs_from_paper=("env.max_episode_steps",))
    results = three_games / "Boxing_s0" / "results.json"
    results.write_text(json.dumps({k: v for k, v in json.loads(results.read_text()).items()
                                   if k not in ("paper_config", "differs_from_paper")}))
    figures = {}
    monkeypatch.setattr(report.Figure, "savefig", lambda fig, path, **_: figures.__setitem__(Path(path).name, fig))
    out = tmp_path / "out"
    assert report.main([str(three_games), f"--out={out}", f"--reps={REPS}"]) == 0

    markdown = (out / "report.md").read_text()
    assert "**2 of 7 runs do not use the paper's config**" in markdown
    assert "| Ours (not the paper's config: 2 of 7 runs) | 3 | 7 |" in markdown
    assert "| Boxing (not the paper's config: 1 of 2 runs) | 2 |" in markdown
    assert "| Pong (not the paper's config: 1 of 3 runs) | 3 |" in markdown
    assert "| Freeway | 2 |" in markdown
    assert "Pong, seed 2, mean return 3.0; not the paper's config (differs in env.max_episode_steps)" in markdown
    assert "Boxing, seed 0, mean return 12.1; not the paper's config (its results.json has no paper_config mark)" \
        in markdown
    per_game = {r["game"]: r["not_paper_config_runs"] for r in read_csv(out / "per_game.csv")}
    assert per_game == {"Boxing": "1", "Freeway": "0", "Pong": "1"}
    assert read_csv(out / "aggregates.csv")[0]["source"] == "Ours (not the paper's config: 2 of 7 runs)"

    def texts(fig):
        return {t.get_text() for ax in fig.axes for t in [ax.title, *ax.get_yticklabels()]} | {
            t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}

    assert "Pong (not the paper's config: 1 of 3 runs)" in texts(figures["per_game_hns.png"])
    assert "Ours (not the paper's config: 2 of 7 runs)" in texts(figures["aggregates.png"])
    curves = figures["returns_over_steps.png"]
    assert {"Pong (not the paper's config: 1 of 3 runs)", "seed 2 (not the paper's config)"} <= texts(curves)
    # The debug run was evaluated once: its curve (and Pong's mean, at the one step all seeds share) is a single
    # point, drawn as a marker.
    single = {line.get_label(): line.get_marker() for ax in curves.axes for line in ax.get_lines()
              if len(line.get_xdata()) == 1}
    assert set(single) == {"seed 2 (not the paper's config)", "mean of 3 seeds"}
    assert all(marker not in (None, "None", "", " ") for marker in single.values())


def test_ragged_seeds_weigh_games_equally_and_pool_runs_for_iqm(three_games):
    write_run(three_games, "Pong", 2, score_for(2.0, PONG))
    built = report.build_report([str(three_games)], reps=REPS, seed=0)
    pong = built.rows[-1]
    assert (pong.game, pong.seeds) == ("Pong", 3)
    # Pong HNS 0, 0.5, 2: mean 2.5 / 3 (the median, 0.5, would differ).
    assert pong.hns == pytest.approx(2.5 / 3)
    assert pong.mean_return == pytest.approx(-20.7 + 2.5 / 3 * 35.3)
    ours, _ = built.aggregates
    assert ours.seeds_per_game == (2, 2, 3)
    # Game means: Boxing 2.0, Freeway 0.5, Pong 2.5 / 3.
    assert ours.intervals["mean"].estimate == pytest.approx((2.0 + 0.5 + 2.5 / 3) / 3)
    assert ours.intervals["median"].estimate == pytest.approx(2.5 / 3)
    # Runs sorted: 0, 0, 0.5, 1, 1, 2, 3; IQM drops one run (int(0.25 * 7)) at each end.
    assert ours.intervals["iqm"].estimate == pytest.approx((0 + 0.5 + 1 + 1 + 2) / 5)
    # Per-game gaps: Boxing 0, Freeway 0.5, Pong 1 - (0 + 0.5 + 1) / 3 = 0.5 (pooling all runs: 1 - 4.5 / 7).
    assert ours.intervals["optimality_gap"].estimate == pytest.approx((0 + 0.5 + 0.5) / 3)
    for interval in ours.intervals.values():
        assert interval.low <= interval.estimate <= interval.high


def test_bootstrap_resamples_runs_within_games_only(tmp_path):
    # Seeds that agree within each game leave nothing to resample, so every interval collapses.
    for game, random_human, hns in (("Freeway", FREEWAY, 0.2), ("Boxing", BOXING, 3.0), ("Pong", PONG, 0.7)):
        for seed in range(3):
            write_run(tmp_path, game, seed, score_for(hns, random_human))
    ours, _ = report.build_report([str(tmp_path)], reps=REPS, seed=0).aggregates
    for interval in ours.intervals.values():
        assert interval.low == pytest.approx(interval.estimate)
        assert interval.high == pytest.approx(interval.estimate)


def test_evaluations_become_sorted_curves_averaged_over_shared_steps(tmp_path):
    write_run(tmp_path, "Pong", 0, 10.0, curve_steps=(4000, 2000))
    write_run(tmp_path, "Pong", 1, 20.0, curve_steps=(2000, 4000, 6000))
    curves = [r.curve for r in report.build_report([str(tmp_path)], reps=REPS, seed=0).runs]
    assert curves == [((2000, 20.0), (4000, 10.0)), ((2000, 20.0), (4000, 40.0), (6000, 60.0))]
    assert report.mean_curve(curves) == ([2000, 4000], [20.0, 25.0])


# ---------------------------------------------------------------------------------------------------------
# Bad inputs.


def test_unfinished_run_is_skipped_with_a_warning(three_games, tmp_path, caplog):
    unfinished = three_games / "Pong_s7"
    unfinished.mkdir()
    (unfinished / "evaluations.jsonl").write_text(json.dumps({"env_steps": 2000, "mean_return": -21.0}) + "\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger=report.__name__):
        assert report.main([str(three_games), f"--out={out}", f"--reps={REPS}"]) == 0
    assert any("Pong_s7" in r.getMessage() and "no results.json" in r.getMessage() for r in caplog.records)
    markdown = (out / "report.md").read_text()
    assert "Included (6):" in markdown
    assert f"Skipped (1):\n\n- `{unfinished}`: no results.json (unfinished run?)" in markdown


def test_only_unfinished_runs_is_an_error_pointing_to_published(tmp_path):
    (tmp_path / "Pong_s0").mkdir()
    with pytest.raises(report.ReportError, match="No finished run.*--published"):
        report.build_report([str(tmp_path / "Pong_s0")], reps=REPS, seed=0)


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"game": "Pong", "seed": 0, "returns": [1.0]}), "missing key.*mean_return"),
    (json.dumps({"game": "Tetris", "seed": 0, "returns": [1.0], "mean_return": 1.0}), "'Tetris'.*Alien"),
    (json.dumps({"game": ["Pong"], "seed": 0, "returns": [1.0], "mean_return": 1.0}), "is not a game name"),
    (json.dumps({"game": "Pong", "seed": "0", "returns": [1.0], "mean_return": 1.0}), "seed='0' is not an integer"),
    (json.dumps({"game": "Pong", "seed": 0, "returns": [1.0, 3.0], "mean_return": 1.0}), "not the mean of returns"),
    (json.dumps({"game": "Pong", "seed": 0, "returns": [], "mean_return": 1.0}), "non-empty list"),
])
def test_malformed_results_raise_naming_the_file(three_games, content, problem):
    path = three_games / "Pong_s0" / "results.json"
    path.write_text(content)
    with pytest.raises(report.ReportError, match=f"{path}.*{problem}"):
        report.build_report([str(three_games)], reps=REPS, seed=0)


def test_a_minatar_run_in_the_atari_report_points_to_curves(three_games):
    path = three_games / "Pong_s0" / "results.json"
    path.write_text(json.dumps({"suite": "minatar", "game": "Catch", "seed": 0, "returns": [1.0],
                                "mean_return": 1.0}))
    with pytest.raises(report.ReportError, match=f"{path} is a minatar run \\(Catch\\).*Fix: --curves"):
        report.build_report([str(three_games)], reps=REPS, seed=0)


def test_malformed_evaluations_raise_naming_the_file_and_line(three_games, tmp_path, capsys):
    path = three_games / "Boxing_s1" / "evaluations.jsonl"
    path.write_text(path.read_text() + json.dumps({"env_steps": "6000", "mean_return": 3.0}) + "\n")
    assert report.main([str(three_games), f"--out={tmp_path / 'out'}", f"--reps={REPS}"]) == 1
    assert f"{path} is malformed: line 3 needs an integer env_steps" in capsys.readouterr().err


def test_same_game_and_seed_twice_is_an_error(three_games, tmp_path):
    write_run(tmp_path / "rerun", "Pong", 0, 0.0)
    with pytest.raises(report.ReportError, match="both Pong seed 0"):
        report.build_report([str(three_games), str(tmp_path / "rerun")], reps=REPS, seed=0)


@pytest.mark.parametrize("argv", [["--out=x"], ["--published", "runs", "--out=x"], ["--published"],
                                  ["--published", "--out=x", "--reps=0"]])
def test_bad_command_lines_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main(argv)
    assert exit_info.value.code == 2
    assert "usage: python -m diamond_jax.report" in capsys.readouterr().err
