"""Learning curves (report --curves): per-game means over seeds against hand-computed numbers, the bootstrap
band's invariants, the random line, bad input."""

import csv
import json

import numpy as np
import pytest

from diamond_jax import curves, report


def write_run(root, name, game, seed, backend, records):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"game": game, "seed": seed, "env": {"backend": backend}}))
    lines = [json.dumps({"epoch": e, "env_steps": s, "mean_return": r, "final": f}) for e, s, r, f in records]
    (run / "evaluations.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "Catch-0", "Catch", 0, "gymnax", [(5, 1500, -0.5, False), (10, 2000, 0.25, False),
                                                      (12, 2000, 0.5, False), (12, 2000, 0.75, True)])
    write_run(root, "Catch-1", "Catch", 1, "gymnax", [(5, 1500, -0.25, False), (10, 2000, 1.0, True)])
    write_run(root, "Pong-0", "Pong", 0, "envpool", [(10, 6000, -20.0, False)])  # no backend: Atari's default
    return root


def test_curves_average_seeds_at_each_step(runs, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(runs), "--curves", f"--out={out}", "--reps=2000"]) == 0
    rows = list(csv.DictReader(open(out / "curves.csv")))
    catch = [r for r in rows if r["game"] == "Catch"]
    # At 2000 steps run 0's last evaluation counts (the final one, 0.75), run 1's is 1.0.
    assert [(int(r["env_steps"]), int(r["seeds"]), float(r["mean_return"])) for r in catch] == [
        (1500, 2, -0.375), (2000, 2, 0.875)]
    for r in catch:
        assert float(r["low_95"]) <= float(r["mean_return"]) <= float(r["high_95"])
        assert float(r["random_return"]) == pytest.approx(-0.608)  # reference_data/minatar_random.json
    # The band of two seeds spans from the lower to the higher seed, never beyond.
    assert float(catch[0]["low_95"]) >= -0.5 and float(catch[0]["high_95"]) <= -0.25
    pong = [r for r in rows if r["game"] == "Pong"]
    assert pong == [{"suite": "atari100k", "game": "Pong", "env_steps": "6000", "seeds": "1",
                     "mean_return": "-20.0000", "low_95": "-20.0000", "high_95": "-20.0000",
                     "random_return": "-20.7000"}]
    assert (out / "curves.png").stat().st_size > 10_000


def test_bootstrap_band_covers_the_mean_of_resamples():
    rng = np.random.default_rng(0)
    values = np.array([0.0, 1.0, 2.0, 3.0])
    low, high = curves.bootstrap_band(values, rng, 20_000)
    # The mean of 4 draws with replacement from {0..3}: mean 1.5, sd sqrt(1.25 / 4) = 0.559.
    assert low == pytest.approx(1.5 - 1.96 * 0.559, abs=0.15) and high == pytest.approx(1.5 + 1.96 * 0.559, abs=0.15)


def test_bad_input_names_the_file(tmp_path, capsys):
    run = write_run(tmp_path, "bad", "Catch", 0, "gymnax", [(5, 1500, -0.5, False)])
    (run / "evaluations.jsonl").write_text('{"epoch": 1}\n')
    assert report.main([str(tmp_path), "--curves", f"--out={tmp_path / 'o'}"]) == 1
    assert "evaluations.jsonl, line 1" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty), "--curves", f"--out={tmp_path / 'o'}"]) == 1
    assert "no evaluations.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.parse_args(["--curves", "--published", "--out=x"])
