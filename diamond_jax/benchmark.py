"""Benchmark of diamond_jax's hot paths, item by item comparable with the same items timed on the official PyTorch
code (a JSON passed with --reference), and the projected wall-clock of one Atari 100k run on this device.

    python -m diamond_jax.benchmark --config=configs/atari100k.py --json=bench.json
    python -m diamond_jax.benchmark --config=configs/atari100k.py --reference=ref.json --json=bench_vs_ref.json
    python -m diamond_jax.benchmark --config=configs/atari100k.py:debug --only=inner_model_forward --repeats=2

Every item runs at the config's batch sizes (32 in the paper's config) and precision (float32 in the paper's
config: see --matmul_precision; --config.precision=bfloat16 for bfloat16 products and convolutions). Each
reports the median, min and max time of its timed calls after warm-up, its throughput in the reference's unit,
its compile time, FLOPs per call, achieved FLOP/s and fraction of peak, and memory. With --reference, `ours/ref`
is our median time over the reference's (< 1: ours is faster). Items, with the paper config's sizes:
  inner_model_forward         denoiser U-Net forward                          images/s
  denoiser_train_step         denoiser update on 5 frames (one pass)          predicted frames/s
  denoiser_train_step_seq6    the training loop's update, 6 frames, 2 passes  predicted frames/s
  rew_end_train_step          reward/end model update on 19 frames            transitions/s
  imagination_step            sampler (3 denoiser calls) + reward/end step    imagined frames/s
  imagination_rollout         15 imagined steps, the actor-critic acting      imagined frames/s
  actor_critic_update         update through a 15-step rollout                imagined frames/s
                              (= the reference's actor_critic_update_full)
  actor_critic_update_stored  update over 15 stored frames, no world model    trajectory frames/s
                              (= the reference's actor_critic_update)
  compute_lambda_returns      lambda-returns alone                            returns/s
  denoiser_phase              the denoiser's phase as training runs it        updates/s
  rew_end_phase               the reward/end model's phase                    updates/s
  actor_critic_phase          the actor-critic's phase                        updates/s
                              (each: its compiled call, batches sampled on the device; a time per update
                              near the lone update's shows training runs at the benchmark's rate)
  collection                  the training collector, policy acting           env steps/s
  sampling                    fixtures.benchmark_sampling                     segments/s
  imagination_rollout_seeds{2,4,8}  the rollout of a seed group, one vmapped  imagined frames/s (all seeds)
                              program for all its seeds (training/group.py)
  {denoiser,rew_end,actor_critic}_phase_seeds5  a group phase call, 5 seeds   seed-updates/s

The projection adds up one run's phases at the measured rates: each model's updates,
batch sampling, collection, evaluation episodes (--eval_episode_steps each) and the updates' compile times.
The group projection does the same for one game's 5 seeds in one process, from the group phase items.
"""

import datetime
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List

import flax
import jax
import jaxlib
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from diamond_jax.agent import MODEL_NAMES, Agent
from diamond_jax.benchmarking import device as device_lib
from diamond_jax.benchmarking import report, timing
from diamond_jax.benchmarking.items import GROUP_PHASE_ITEMS, GROUP_PHASE_SEEDS, ITEMS, Setup
from diamond_jax import config as config_lib
from diamond_jax.config import CPU_DEVICES_HELP
from diamond_jax import envs
from diamond_jax.config_files import config_file
from diamond_jax.exit_codes import EXIT_BAD_INPUT
from diamond_jax.training import parallel, steps

# (warm-up calls, timed calls) per item when not given: accelerators run every item in milliseconds, a CPU
# takes seconds to minutes for the paper-size items.
DEFAULT_WARMUP_REPEATS = {"cpu": (1, 3)}
ACCELERATOR_WARMUP_REPEATS = (2, 10)

_CONFIG = config_flags.DEFINE_config_file(
    "config", config_file("atari100k"),
    "Config file, with presets after ':' (e.g. configs/atari100k.py:debug); override any field with "
    "--config.<field>=<value>.")
_ONLY = flags.DEFINE_list("only", None, f"Items to run, comma-separated (default: all): {', '.join(ITEMS)}.")
_SKIP = flags.DEFINE_list("skip", [], "Items to leave out, comma-separated.")
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed calls (repeats) per item, median reported (default: "
                                f"{ACCELERATOR_WARMUP_REPEATS[1]} on GPU/TPU, {DEFAULT_WARMUP_REPEATS['cpu'][1]} "
                                "on CPU).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", None, "Untimed calls per item after compilation (default: "
                               f"{ACCELERATOR_WARMUP_REPEATS[0]} on GPU/TPU, {DEFAULT_WARMUP_REPEATS['cpu'][0]} on "
                               "CPU); collection and sampling warm up inside their own functions instead.",
                               lower_bound=0)
_JSON = flags.DEFINE_string("json", "benchmark.json", "Where to write the results as JSON (they are printed too).")
_REFERENCE = flags.DEFINE_string(
    "reference", None, "A JSON written by bench_torch.py: record and print the ratios ours/reference of each item "
    "with a counterpart, provided both ran the same models on the same device (otherwise: a warning, no ratio).")
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", None, "Peak TFLOP/s of one device, for the fraction of peak (default: from a table by device "
    "kind and --matmul_precision, e.g. 494.7 TF32 for an H100 SXM; none for CPUs).", lower_bound=0)
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, CPU_DEVICES_HELP, lower_bound=1)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices in the mesh, batches split over them (default: "
                                    "config.num_devices, where 0 means all).", lower_bound=0)
_EVAL_EPISODE_STEPS = flags.DEFINE_integer(
    "eval_episode_steps", 2000, "Agent steps per test episode in the projection, counted at the collection rate "
    "(test episodes do not end on a life loss; 2,000 is a rough length for a trained Breakout agent).",
    lower_bound=1)
_COLLECTION_STEPS = flags.DEFINE_integer("collection_steps", 1000, "Agent steps per repeat of `collection`.",
                                         lower_bound=1)
_SAMPLING_BATCHES = flags.DEFINE_integer("sampling_batches", 100, "Batches per repeat of `sampling` (each "
                                         "repeat first builds a synthetic replay of the whole budget).",
                                         lower_bound=1)
_MATMUL_PRECISION = flags.DEFINE_enum(
    "matmul_precision", "default", ["default", "highest"],
    "JAX's precision for float32 matrix products and convolutions: 'default' lets NVIDIA GPUs (Ampere and "
    "later) use TF32, as the reference trainer does, and TPUs one bf16 pass; 'highest' computes in float32. "
    "Parameters are float32 either way; --config.precision=bfloat16 runs the products in bfloat16 instead.")


def selected_items(only: List[str], skip: List[str]) -> List[str]:
    unknown = sorted((set(only or []) | set(skip)) - set(ITEMS))
    if unknown:
        raise app.UsageError(f"unknown item(s) {', '.join(unknown)}; items: {', '.join(ITEMS)}")
    return [name for name in ITEMS if (not only or name in only) and name not in skip]


class BadInput(ValueError):
    """A flag that cannot work, found before anything is computed; exit status 2."""


def load_reference(path: str) -> Dict[str, Any]:
    """The reference JSON, read before anything is computed: a bad path must not cost a whole benchmark."""
    fix = "Fix: pass a JSON written by shared/tools/ref_bench/bench_torch.py, or leave --reference out."
    try:
        with open(path) as f:
            reference = json.load(f)
    except OSError as error:
        raise BadInput(f"--reference={path}: cannot read it ({error.strerror}). {fix}") from error
    except json.JSONDecodeError as error:
        raise BadInput(f"--reference={path} is not JSON ({error}). {fix}") from error
    if not isinstance(reference, dict) or not isinstance(reference.get("results"), dict):
        raise BadInput(f"--reference={path} has no \"results\" object, so it was not written by bench_torch.py. {fix}")
    return reference


def check_writable(path: str, flag: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        raise BadInput(f"--{flag}={path}: its directory {directory} does not exist or is not writable. Fix: "
                       "create it, or pick a path in a directory you can write to.")


def code_commit() -> Any:
    """The git commit of the benchmarked code and whether it had uncommitted changes, or None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "-C", here, "status", "--porcelain"], capture_output=True, text=True,
                                check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit.stdout.strip(), "uncommitted_changes": bool(status.stdout.strip())}


def build_meta(mesh, game_actions: int, warmup: int, repeats: int, peak: Any, peak_source: str) -> Dict[str, Any]:
    device = mesh.devices.flat[0]
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": device_lib.cpu_model(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_name": device_lib.device_name(device),
        "num_devices": mesh.size,
        "num_visible_devices": len(jax.devices()),
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__},
        "code": code_commit(),
        "argv": sys.argv[1:],
        "config": config_flags.get_config_filename(flags.FLAGS["config"]),
        "config_overrides": config_flags.get_override_values(flags.FLAGS["config"]),
        "game": _CONFIG.value.game,
        "num_actions": game_actions,
        "dtype": ("float32 parameters and optimiser state, bfloat16 products, convolutions and activations"
                  if _CONFIG.value.get("precision", "float32") == "bfloat16"
                  else "float32 parameters, activations and optimiser state"),
        "matmul_precision": _MATMUL_PRECISION.value,
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "warmup": warmup,
        "repeats": repeats,
        "peak_tflops_per_device": peak,
        "peak_source": peak_source,
        "timing_method": "compile_s: jitted.trace(...).lower().compile(), once, before any call; then `warmup` "
                         "untimed and `repeats` timed calls of that compiled executable, each ended by "
                         "jax.block_until_ready on all its outputs, the donated state passed on from call to call; "
                         "collection and sampling: one rate per repeat from their own benchmark functions, as a time "
                         "per agent step and per batch",
        "flops_method": "flops_per_call: matrix products and convolutions (2 per multiply-add) counted on the "
                        "program's jaxpr, scan bodies times their length, over the whole batch; "
                        "xla_cost_analysis_flops: compiled.cost_analysis()['flops'] per device, which counts a "
                        "loop body once whatever its trip count, so it undercounts every program with a scan",
        "memory_method": "peak_bytes_in_use: the largest device.memory_stats()['peak_bytes_in_use'] over the mesh "
                         "since the process started (JAX cannot reset it, so an item's figure includes the items "
                         "before it; run one item per process with --only for its own peak; null on CPU); "
                         "xla_memory_mib: XLA's memory plan of the item's program, per device",
    }


def finite(obj: Any) -> Any:
    """Non-finite floats (the sampler's s_tmax is inf) as strings, so that the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def main(argv: List[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    start = time.perf_counter()
    names = selected_items(_ONLY.value, _SKIP.value)
    try:
        check_writable(_JSON.value, "json")
        reference = load_reference(_REFERENCE.value) if _REFERENCE.value else None
        config_lib.validate(_CONFIG.value)
    except (BadInput, config_lib.ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if _MATMUL_PRECISION.value != "default":
        jax.config.update("jax_default_matmul_precision", _MATMUL_PRECISION.value)
    parallel.use_cpu_devices(_CPU_DEVICES.value)
    config = _CONFIG.value
    mesh = parallel.make_mesh(config.num_devices if _NUM_DEVICES.value is None else _NUM_DEVICES.value)
    device = mesh.devices.flat[0]
    warmup, repeats = DEFAULT_WARMUP_REPEATS.get(device.platform, ACCELERATOR_WARMUP_REPEATS)
    warmup = warmup if _WARMUP.value is None else _WARMUP.value
    repeats = repeats if _REPEATS.value is None else _REPEATS.value
    if _PEAK_TFLOPS.value:
        peak, peak_source = _PEAK_TFLOPS.value, "--peak_tflops"
    else:
        peak, peak_source = device_lib.peak_tflops(device, _MATMUL_PRECISION.value)

    game_actions = envs.num_actions(config)
    agent = Agent.from_config(config, game_actions)
    variables = agent.init(jax.random.key(config.seed))
    params = {m: steps.count_params(variables[m]["params"]) for m in MODEL_NAMES}
    params["total"] = sum(params.values())
    meta = build_meta(mesh, game_actions, warmup, repeats, peak, peak_source)
    print(f"{meta['device_name']} x {mesh.size} ({device.platform}) | jax {jax.__version__} | config "
          f"{meta['config']} {meta['config_overrides'] or ''} | peak {peak} TFLOP/s per device ({peak_source})",
          flush=True)

    setup = Setup(config, agent, variables, mesh, jax.random.key(config.seed + 1), _COLLECTION_STEPS.value,
                  _SAMPLING_BATCHES.value)
    results = {}
    for name in names:
        item = ITEMS[name](setup)
        if item.program is not None:
            measured = timing.measure_program(item.program, warmup, repeats)
        else:
            measured = timing.measure_rates(item.rate, item.units_per_call, repeats)
        results[name] = report.item_record(item, measured, peak, mesh.size,
                                           device_lib.peak_bytes_in_use(list(mesh.devices.flat)))
        r = results[name]
        print(f"{name}: {r['median_ms']:.3f} ms, {r['throughput_per_s']:.1f} {r['throughput_unit']}"
              + (f", compiled in {r['compile_s']:.1f} s" if r["compile_s"] is not None else ""), flush=True)

    out = {"meta": meta, "params": params, "results": results,
           "projection": report.project_run(config, results, _EVAL_EPISODE_STEPS.value),
           "projection_group": report.project_group(config, results, _EVAL_EPISODE_STEPS.value,
                                                    GROUP_PHASE_ITEMS, GROUP_PHASE_SEEDS)}
    comparison = None
    if reference is not None:
        comparison = report.compare_with_reference(results, meta["device_name"], params, reference,
                                                   _MATMUL_PRECISION.value)
        out["reference"] = dict(comparison, path=os.path.abspath(_REFERENCE.value))
        print(f"reference {_REFERENCE.value}: device {comparison['device_name']!r}, ours {meta['device_name']!r}: "
              + ("compared" if comparison["comparable"] else "not compared"), flush=True)
        for line in report.comparison_warnings(comparison):
            print(f"WARNING: {line}", flush=True)
    out["config"] = config.to_dict()
    meta["total_wall_s"] = time.perf_counter() - start

    print()
    print(report.results_table(results, comparison))
    print()
    print(report.projection_table(out["projection"]))
    print()
    print(report.projection_table(out["projection_group"]))
    with open(_JSON.value, "w") as f:
        json.dump(finite(out), f, indent=2, allow_nan=False)
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
    app.run(main)
