"""How good a world model of recorded play is, on the test episodes of its dataset.

On `num_segments` test segments (drawn with a fixed seed, so two models on one dataset see the same ones):
- one step, teacher-forced: each frame drawn from the real frames and actions before it;
- open loop: frames drawn from the model's own previous frames and the real actions, compared with the real
  frames at each horizon;
scored by PSNR, SSIM and, given local weights, LPIPS per frame, and FVD between real and drawn clips; at the
denoiser's resolution and, with an upsampler, at full resolution. Also the sampling rate (frames/s of one
drawn frame, as the Diffusion World Models paper reports Hz) and the action sensitivity: from the same context
and the same noise, how much the drawn frame changes when only the last action changes, against how much it
changes when only the noise changes.

With `recovery` (world_model/drift.py), the open-loop rollouts detect drift and recover from it by interpolating
toward the nearest frame of a buffer of training frames (a denoiser trained with interpolation).
"""

import dataclasses
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from diamond_jax.data.recorded import ActionSpec, RecordedDataset
from diamond_jax.world_model import drift, metrics
from diamond_jax.world_model.model import Frames, WorldModel, frames_window
from diamond_jax.world_model.run import LoadedRun

LEVELS = ("low", "full")
CHANGED_LEVELS = 8  # a pixel whose value moves by more than this many levels (of 255) counts as changed


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    num_segments: int = 32
    horizons: Sequence[int] = (1, 2, 5, 10, 20)
    batch_size: int = 8
    fvd_length: int = 16
    seed: int = 0
    timing_calls: int = 10
    recovery: bool = False  # open-loop rollouts with drift detection and recovery (world_model/drift.py)
    drift_config: drift.DriftConfig = drift.DriftConfig()  # its detectors (recovery is set from `recovery`)


def to_uint8(x: jax.Array) -> np.ndarray:
    """Frames in [-1, 1] on the 256-level grid -> uint8."""
    return np.asarray(jnp.round((jnp.clip(x, -1, 1) + 1) * 127.5)).astype(np.uint8)


def frame_scores(real: np.ndarray, drawn: np.ndarray, weights: metrics.MetricWeights) -> Dict[str, np.ndarray]:
    """Per-frame scores of uint8 frames [m, h, w, 3]."""
    scores = {"psnr": metrics.psnr(real, drawn), "ssim": metrics.ssim(real, drawn)}
    if weights.lpips is not None and min(real.shape[1:3]) >= metrics.LPIPS_MIN_SIZE:
        scores["lpips"] = weights.lpips(real, drawn)
    return scores


def summarize(scores: Dict[str, np.ndarray]) -> Dict[str, Optional[float]]:
    out = {}
    for name, values in scores.items():
        if name == "psnr":
            s = metrics.psnr_summary(values)
            out["psnr_db"], out["psnr_identical_fraction"] = s.mean_db, s.fraction_identical
        else:
            out[name] = float(np.mean(values))
    return out


def copy_last_frame(frames: np.ndarray, n: int, horizons: Sequence[int],
                    weights: metrics.MetricWeights) -> Dict[str, Any]:
    """The scores of the trivial model that repeats the last frame it saw, on the same segments (uint8 [m, n +
    h_max, h, w, 3]): one step, each frame scored against the real one before it; open loop, the last context
    frame against the real frame at each horizon. Where little moves (Breakout), a hard baseline to beat."""
    h_max = frames.shape[1] - n
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
    one_step = summarize(frame_scores(flat(frames[:, n:]), flat(frames[:, n - 1:n - 1 + h_max]), weights))
    open_loop = [summarize(frame_scores(frames[:, n - 1 + h], frames[:, n - 1], weights)) for h in horizons]
    return {"one_step": one_step, "open_loop": {name: [s[name] for s in open_loop] for name in open_loop[0]}}


def alternative_actions(act: np.ndarray, spec: ActionSpec, rng: np.random.Generator) -> np.ndarray:
    """Another action for each row of act (int32 [m] or float32 [m, size]): a different discrete action drawn
    uniformly, one multi-hot component flipped, or the continuous action of another row (shuffled)."""
    m = len(act)
    if spec.kind == "discrete":
        if spec.size < 2:
            raise ValueError("action sensitivity needs at least 2 discrete actions")
        return ((act + rng.integers(1, spec.size, m)) % spec.size).astype(act.dtype)
    if spec.kind == "multi_hot":
        flipped = act.copy()
        component = rng.integers(0, spec.size, m)
        flipped[np.arange(m), component] = 1 - flipped[np.arange(m), component]
        return flipped
    return act[rng.permutation(m)] if m > 1 else act + rng.normal(size=act.shape).astype(act.dtype)


class Evaluator:
    def __init__(self, run: LoadedRun, dataset: RecordedDataset, weights: metrics.MetricWeights,
                 options: EvalOptions = EvalOptions()):
        self.model: WorldModel = run.model
        self.variables = run.variables
        self.dataset, self.weights, self.options = dataset, weights, options
        self.n = self.model.num_steps_conditioning
        self.notes: List[str] = list(weights.skipped)
        self._step = jax.jit(self.model.step)
        self._rollout = jax.jit(self.model.rollout, static_argnums=(4,))
        if options.recovery:
            cfg = dataclasses.replace(options.drift_config, recovery=True)
            buffer = drift.sample_buffer(dataset, self.model, cfg.buffer_size, options.seed)
            drift.recovery_inputs(self.model, buffer, cfg)  # refuses a denoiser without interpolation
            self._rollout = jax.jit(lambda v, k, c, a, t: drift.rollout(self.model, v, k, c, a, t, buffer, cfg)[0],
                                    static_argnums=(4,))
        self._frames = jax.jit(self.model.frames)

    def segments(self):
        """Test segments as long as the longest horizon allows; the horizons that fit."""
        o = self.options
        longest = int(max(self.dataset.lengths("test"), default=0)) - self.n
        horizons = [h for h in sorted(set(o.horizons)) if h <= longest]
        if not horizons:
            raise ValueError(f"the test episodes of {self.dataset.path} have at most {longest + self.n} frames: "
                             f"too few for a context of {self.n} frames and one drawn frame. Fix: record or import "
                             "longer test episodes.")
        if len(horizons) < len(set(o.horizons)):
            self.notes.append(f"horizons above {longest} skipped: the longest test episode has {longest + self.n} "
                              "frames")
        seg = self.dataset.sample(np.random.default_rng([o.seed, 1]), o.num_segments, self.n + horizons[-1], "test")
        return seg, horizons

    def batches(self, m: int):
        b = self.options.batch_size
        return [slice(i, min(m, i + b)) for i in range(0, m, b)]

    def run(self) -> Dict[str, Any]:
        o = self.options
        seg, horizons = self.segments()
        real = self._frames(jnp.asarray(seg.obs), self.variables)
        real_u8 = {level: to_uint8(getattr(real, level)) for level in LEVELS if getattr(real, level) is not None}
        h_max, m = horizons[-1], o.num_segments
        key = jax.random.key(o.seed)
        one_step = {level: [] for level in real_u8}
        open_loop = {level: [] for level in real_u8}
        act = jnp.asarray(seg.act)
        bar = tqdm(total=m * (h_max + 1), desc="Evaluating", unit="frame")
        for rows in self.batches(m):
            for k in range(h_max):  # teacher-forced: frame n + k from the real frames before it
                context = frames_window(real, rows, k, k + self.n)
                drawn = self._step(self.variables, jax.random.fold_in(key, k), context, act[rows, k:k + self.n])
                for level in real_u8:
                    one_step[level].append((real_u8[level][rows, self.n + k], to_uint8(getattr(drawn, level))))
                bar.update(rows.stop - rows.start)
            context = frames_window(real, rows, 0, self.n)
            drawn = self._rollout(self.variables, jax.random.fold_in(key, 10_000 + rows.start), context,
                                  act[rows, :self.n + h_max - 1], h_max)
            for level in real_u8:
                open_loop[level].append(to_uint8(getattr(drawn, level)))
            bar.update(rows.stop - rows.start)
        bar.close()
        results: Dict[str, Any] = {"horizons": horizons, "num_segments": m, "one_step": {}, "open_loop": {},
                                   "fvd": {}, "resolution": {"low": list(self.model.resolution)},
                                   "space": "pixel" if self.model.autoencoder is None else "latent"}
        if self.model.autoencoder is not None:
            results["autoencoder_ceiling"] = self.autoencoder_ceiling(real, real_u8["low"][:, self.n:])
        if self.model.upsampler is not None:
            results["resolution"]["full"] = list(self.model.upsampler.size)
        self.drawn = {}
        for level in real_u8:
            pairs = one_step[level]
            results["one_step"][level] = summarize(frame_scores(np.concatenate([p[0] for p in pairs]),
                                                                np.concatenate([p[1] for p in pairs]), self.weights))
            drawn = np.concatenate(open_loop[level])  # [m, h_max, h, w, 3]
            self.drawn[level] = drawn
            truth = real_u8[level][:, self.n:]
            per_step = [summarize(frame_scores(truth[:, t], drawn[:, t], self.weights)) for t in range(h_max)]
            results["open_loop"][level] = {name: [per_step[h - 1][name] for h in horizons] for name in per_step[0]}
            results["open_loop"][level]["per_step"] = per_step
            results["fvd"][level] = self.fvd(truth, drawn)
            results.setdefault("copy_last_frame", {})[level] = copy_last_frame(real_u8[level], self.n, horizons,
                                                                                self.weights)
        self.real = real_u8
        results["sampling"] = self.sampling_rate(real, act)
        results["action_sensitivity"] = self.action_sensitivity(real, seg.act)
        results["notes"] = self.notes
        return results

    def autoencoder_ceiling(self, real: Frames, truth: np.ndarray) -> Dict[str, Optional[float]]:
        """The scores of the real frames encoded and decoded, the best a latent world model can draw."""
        ae = self.model.autoencoder
        decode = jax.jit(ae.decode_frames)
        decoded = np.stack([to_uint8(decode(self.variables["autoencoder"], real.latent[:, self.n + t]))
                            for t in range(truth.shape[1])], axis=1)
        flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
        return summarize(frame_scores(flat(truth), flat(decoded), self.weights))

    def fvd(self, truth: np.ndarray, drawn: np.ndarray) -> Optional[float]:
        if self.weights.i3d is None:
            return None
        length = min(self.options.fvd_length, truth.shape[1])
        if length < self.options.fvd_length:
            self.notes.append(f"FVD on clips of {length} frames (the test episodes are too short for "
                              f"{self.options.fvd_length}): not comparable with FVDs of {self.options.fvd_length}")
        return metrics.fvd(truth[:, :length], drawn[:, :length], self.weights.i3d)

    def sampling_rate(self, real: Frames, act: jax.Array) -> Dict[str, float]:
        """Frames per second of one drawn frame (denoiser, and upsampler when there is one), alone and in a
        batch, after compilation."""
        out = {}
        for name, b in (("frames_per_s_batch_1", 1), (f"frames_per_s_batch_{self.options.batch_size}",
                                                       self.options.batch_size)):
            b = min(b, real.low.shape[0])
            context = frames_window(real, slice(0, b), 0, self.n)
            key = jax.random.key(0)
            jax.block_until_ready(self._step(self.variables, key, context, act[:b, :self.n]))
            start = time.perf_counter()
            for i in range(self.options.timing_calls):
                drawn = self._step(self.variables, jax.random.fold_in(key, i), context, act[:b, :self.n])
            jax.block_until_ready(drawn)
            out[name] = b * self.options.timing_calls / (time.perf_counter() - start)
        return out

    def action_sensitivity(self, real: Frames, act: np.ndarray) -> Dict[str, float]:
        """Mean absolute change (levels of 255) and fraction of pixels changed by more than CHANGED_LEVELS, of the
        frame drawn after the real context when only the last action changes (same noise), and when only the
        noise changes (same actions): a model that ignores actions has an action effect far below the noise's."""
        n = self.n
        context = frames_window(real, slice(None), 0, n)
        window = np.asarray(act[:, :n])
        other = window.copy()
        other[:, -1] = alternative_actions(window[:, -1], self.dataset.action,
                                           np.random.default_rng([self.options.seed, 2]))
        key = jax.random.key(self.options.seed + 1)
        base = to_uint8(self._step(self.variables, key, context, jnp.asarray(window)).low).astype(np.int32)
        changed = to_uint8(self._step(self.variables, key, context, jnp.asarray(other)).low).astype(np.int32)
        noise = to_uint8(self._step(self.variables, jax.random.fold_in(key, 1), context,
                                    jnp.asarray(window)).low).astype(np.int32)
        action_diff, noise_diff = np.abs(changed - base), np.abs(noise - base)
        return {"action_mean_abs_levels": float(action_diff.mean()),
                "noise_mean_abs_levels": float(noise_diff.mean()),
                "action_changed_pixels": float((action_diff.max(-1) > CHANGED_LEVELS).mean()),
                "noise_changed_pixels": float((noise_diff.max(-1) > CHANGED_LEVELS).mean())}
