"""Measures a world model of recorded play on the test episodes of its dataset (diamond_jax/world_model/evaluate.py).

    python -m diamond_jax.world_model_eval --workdir=runs/wm-pong
    python -m diamond_jax.world_model_eval --workdir=runs/wm-pong --lpips_weights=lpips_alex.npz --i3d_weights=i3d.npz

Writes to --out (default <workdir>/eval): eval.json (every number), horizons.png (PSNR, SSIM and LPIPS against
the open-loop horizon, the teacher-forced one-step value as a dashed line, and as a dotted line the trivial
model that copies the last frame it saw, on the same segments) and rollouts.png (for a few test
segments, the real frames above the drawn ones at each horizon). LPIPS and FVD need pretrained networks that
no package ships: pass local weights written by `python -m diamond_jax.world_model.metric_weights`; without
them they are skipped, and eval.json's notes say so. Uses the run's newest checkpoint, also while it trains.

Long rollouts (world_model/drift.py, README "Long rollouts"): --recovery makes the open-loop rollouts detect
drift and recover (a denoiser trained with interpolation); --drift_steps=N adds the drift study
(world_model/drift_study.py): --drift_rows rollouts of N steps with random actions, recovery off and on, and the
detectors' ROC AUC on test windows, written as drift.json, drift_scores.png, drift_frames.png and drift.mp4:

    python -m diamond_jax.world_model_eval --workdir=W --num_segments=2 --horizons=1 --drift_steps=1000
"""

import dataclasses
import json
import os
import sys

from absl import app, flags

from diamond_jax import cli
from diamond_jax.exit_codes import EXIT_BAD_INPUT

_WORKDIR = flags.DEFINE_string("workdir", None, "A world-model run (python -m diamond_jax.world_model).")
_DATASET = flags.DEFINE_string("dataset", None, "Its dataset, where it is now (default: where the run read it).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <workdir>/eval).")
_SEGMENTS = flags.DEFINE_integer("num_segments", 32, "Test segments to measure on.", lower_bound=2)
_HORIZONS = flags.DEFINE_list("horizons", ["1", "2", "5", "10", "20"], "Open-loop horizons (frames drawn from the "
                              "model's own frames), comma-separated.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Segments drawn at once.", lower_bound=1)
_FVD_LENGTH = flags.DEFINE_integer("fvd_length", 16, "Frames per clip for FVD (I3D needs at least 9).", lower_bound=9)
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the choice of test segments and the sampler's noise.")
_LPIPS = flags.DEFINE_string("lpips_weights", None, "LPIPS (AlexNet) weights, an .npz of metric_weights.")
_I3D = flags.DEFINE_string("i3d_weights", None, "I3D weights for FVD, an .npz of metric_weights.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance weight w of the sampler (default: the "
                                "run's sampler.guidance_scale); w > 0 needs a model trained with "
                                "denoiser.condition_dropout > 0.")
_RECOVERY = flags.DEFINE_bool("recovery", False, "Open-loop rollouts detect drift and recover from it by "
                               "interpolating toward a dataset frame (a denoiser trained with interpolation).")
_DRIFT_STEPS = flags.DEFINE_integer("drift_steps", 0, "Steps of the drift study's rollouts, recovery off and on; "
                                    "0: no drift study.", lower_bound=0)
_DRIFT_ROWS = flags.DEFINE_integer("drift_rows", 4, "Rollouts of the drift study.", lower_bound=1)
_STUCK = flags.DEFINE_float("stuck_threshold", None, "Drift detection: stuck below this mean consecutive-frame "
                            "MSE (default: DriftConfig's).")
_JUMP = flags.DEFINE_float("jump_threshold", None, "Drift detection: a teleport above this consecutive-frame MSE "
                           "(default: DriftConfig's).")
_NOVELTY = flags.DEFINE_float("novelty_threshold", None, "Drift detection: off the dataset above this mean "
                              "nearest-neighbour distance (default: DriftConfig's).")
_PLATFORM = flags.DEFINE_enum("platform", None, ["cpu", "cuda", "rocm", "tpu"], "Platform for JAX.")


def plot_horizons(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("psnr_db", "ssim", "lpips") if n in results["open_loop"]["low"]]
    labels = {"psnr_db": "PSNR (dB, higher is better)", "ssim": "SSIM (higher is better)",
              "lpips": "LPIPS (lower is better)"}
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for level, colour in (("low", "tab:blue"), ("full", "tab:orange")):
            if level not in results["open_loop"]:
                continue
            size = "x".join(map(str, results["resolution"][level]))
            ax.plot(results["horizons"], results["open_loop"][level][name], "o-", color=colour,
                    label=f"open loop, {size}")
            one = results["one_step"][level][name]
            if one is not None:
                ax.axhline(one, color=colour, linestyle="--", label=f"one step, {size}")
            copy = results["copy_last_frame"][level]["open_loop"][name]
            if None not in copy:
                ax.plot(results["horizons"], copy, ":", color=colour, alpha=0.7, label=f"copy last frame, {size}")
        ax.set_xlabel("horizon (frames drawn from the model's own)")
        ax.set_title(labels[name], fontsize=10)
        ax.set_xscale("log")
        ax.set_xticks(results["horizons"], [str(h) for h in results["horizons"]])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rollout_picture(real, drawn, horizons, num_steps_conditioning: int, rows: int = 3):
    """uint8 image: per segment, the real frames at each horizon above the drawn ones."""
    import numpy as np

    from diamond_jax.video import grid, upscale

    scale = max(1, 96 // real.shape[2])
    panels = []
    for i in range(min(rows, len(drawn))):
        top = grid([real[i, num_steps_conditioning + h - 1] for h in horizons])
        bottom = grid([drawn[i, h - 1] for h in horizons])
        panels.append(grid([top, bottom], axis=-3))
    return upscale(grid(panels, axis=-3, gap=6), scale).astype(np.uint8)


def main(argv) -> None:
    if len(argv) > 1:
        print(f"error: unexpected argument(s) {' '.join(argv[1:])}.", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    cli.setup_logging()
    if _PLATFORM.value:
        os.environ["JAX_PLATFORMS"] = _PLATFORM.value
    import imageio.v3 as iio


    from diamond_jax.data.recorded import DatasetError, RecordedDataset
    from diamond_jax.world_model import drift_study
    from diamond_jax.world_model.drift import DriftConfig
    from diamond_jax.world_model.evaluate import EvalOptions, Evaluator
    from diamond_jax.world_model.metrics import MetricWeights, MetricWeightsError
    from diamond_jax.world_model.run import load_run

    try:
        horizons = tuple(int(h) for h in _HORIZONS.value)
        if not horizons or min(horizons) < 1:
            raise ValueError(f"--horizons={','.join(_HORIZONS.value)}: give positive whole numbers, e.g. 1,5,10")
        run = load_run(_WORKDIR.value, _GUIDANCE.value)
        dataset = RecordedDataset.open(_DATASET.value or run.dataset["path"])
        if [*dataset.frame_shape] != run.dataset["frame_shape"] or dataset.action.to_json() != run.dataset["action"]:
            raise ValueError(f"{dataset.path} holds frames {dataset.frame_shape} and {dataset.action.kind} actions, "
                             f"the run trained on {run.dataset['frame_shape']} and {run.dataset['action']}. Fix: "
                             "pass the run's dataset with --dataset.")
        weights = MetricWeights.load(_LPIPS.value, _I3D.value)
        thresholds = {name: flag.value for name, flag in (("stuck_threshold", _STUCK), ("jump_threshold", _JUMP),
                                                           ("novelty_threshold", _NOVELTY)) if flag.value is not None}
        drift_config = dataclasses.replace(DriftConfig(), **thresholds)
        options = EvalOptions(_SEGMENTS.value, horizons, _BATCH.value, _FVD_LENGTH.value, _SEED.value,
                              recovery=_RECOVERY.value, drift_config=drift_config)
        evaluator = Evaluator(run, dataset, weights, options)
        results = evaluator.run()
        if _DRIFT_STEPS.value:
            drift_out = drift_study.study(run.model, run.variables, dataset, drift_config, drift_study.StudyOptions(
                _DRIFT_STEPS.value, _DRIFT_ROWS.value, _SEED.value))
    except (ValueError, OSError, DatasetError, MetricWeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    results = {"workdir": os.path.abspath(_WORKDIR.value), "dataset": dataset.path, "step": run.step,
               "guidance_scale": run.model.sampler.guidance_scale, **results}
    out = _OUT.value or os.path.join(_WORKDIR.value, "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot_horizons(results, os.path.join(out, "horizons.png"))
    level = "full" if "full" in evaluator.drawn else "low"
    iio.imwrite(os.path.join(out, "rollouts.png"), rollout_picture(
        evaluator.real[level], evaluator.drawn[level], results["horizons"], run.model.num_steps_conditioning))
    for level, one in results["one_step"].items():
        loop = results["open_loop"][level]
        print(f"{level} {results['resolution'][level]}: one step PSNR {one['psnr_db']} dB, SSIM {one['ssim']:.3f}; "
              f"open loop at horizons {results['horizons']}: PSNR {[round(v, 2) if v else v for v in loop['psnr_db']]}"
              f", FVD {results['fvd'][level]}")
        copy = results["copy_last_frame"][level]
        print(f"  copying the last frame instead: one step PSNR {copy['one_step']['psnr_db']} dB; open loop "
              f"{[round(v, 2) if v else v for v in copy['open_loop']['psnr_db']]}")
    if "autoencoder_ceiling" in results:
        ceiling = results["autoencoder_ceiling"]
        print(f"autoencoder alone (real frames encoded and decoded, the latent model's ceiling): PSNR "
              f"{ceiling['psnr_db']} dB, SSIM {ceiling.get('ssim')}")
    s, a = results["sampling"], results["action_sensitivity"]
    print(f"sampling: {', '.join(f'{k} {v:.1f}' for k, v in s.items())}; action sensitivity: "
          f"{a['action_mean_abs_levels']:.2f} levels per pixel when the action changes, "
          f"{a['noise_mean_abs_levels']:.2f} when the noise does")
    for note in results["notes"]:
        print(f"note: {note}")
    print(f"wrote {out}/eval.json, horizons.png, rollouts.png")
    if _DRIFT_STEPS.value:
        write_drift_study(drift_out, drift_config, out)


def write_drift_study(drift_out, drift_config, out: str) -> None:
    """drift.json, drift_scores.png, drift_frames.png and drift.mp4 of the drift study, and its summary."""
    from diamond_jax.video import write_video
    from diamond_jax.world_model import drift_study

    import imageio.v3 as iio

    results = drift_out["results"]
    with open(os.path.join(out, "drift.json"), "w") as f:
        json.dump(results, f, indent=2)
    drift_study.plot(drift_out, drift_config, os.path.join(out, "drift_scores.png"))
    n = results["num_steps"]
    steps = sorted({1, n // 10, n // 4, n // 2, 3 * n // 4, n} - {0})
    iio.imwrite(os.path.join(out, "drift_frames.png"), drift_study.frames_picture(drift_out, steps))
    write_video(os.path.join(out, "drift.mp4"), drift_study.video_frames(drift_out), 15.0)
    for name, r in results["rollouts"].items():
        print(f"recovery {name}: stuck {r['fraction_stuck']:.3f} of the time, off the dataset "
              f"{r['fraction_novel']:.3f}, detections per row {r['detections_per_row']}, distance to the dataset "
              f"by quarter {[f'{d:.2e}' for d in r['distance_to_dataset_by_quarter']]}")
    for kind, aucs in results["auc"]["by_degradation"].items():
        print(f"ROC AUC, real test windows vs {kind}: " + ", ".join(f"{d} {aucs[d]:.3f}"
                                                                    for d in drift_study.DETECTORS))
    print(f"wrote {out}/drift.json, drift_scores.png, drift_frames.png, drift.mp4")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
