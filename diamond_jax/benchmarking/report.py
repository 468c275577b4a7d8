"""From measurements to what they mean: per-item figures, the comparison with the reference benchmark, the
projected wall-clock of one Atari 100k run, and the printed tables."""

from typing import Any, Dict, List, Optional, Sequence

from ml_collections import config_dict

from diamond_jax.agent import MODEL_NAMES
from diamond_jax.benchmarking.fixtures import REFERENCE_BATCH_SIZE
from diamond_jax.benchmarking.items import Item
from diamond_jax.benchmarking.timing import MIB


def item_record(item: Item, measured: Dict[str, Any], peak_tflops: Optional[float], num_devices: int,
                peak_bytes: Optional[int]) -> Dict[str, Any]:
    """The JSON record of one item. FLOPs count the whole batch, so the fraction of peak is over the mesh."""
    seconds = measured["median_ms"] / 1e3
    flops = measured["flops_per_call"]
    achieved = None if flops is None else flops / seconds / 1e12
    return {
        "what": item.what,
        "reference_item": item.reference_item,
        "reference_note": item.reference_note,
        "batch_size": item.batch_size,
        **measured,
        "throughput_per_s": item.units_per_call / seconds,
        "throughput_unit": item.unit,
        "achieved_tflops": achieved,
        "fraction_of_peak": None if achieved is None or not peak_tflops else achieved / (peak_tflops * num_devices),
        "peak_bytes_in_use": peak_bytes,
        "peak_mib": None if peak_bytes is None else round(peak_bytes / MIB, 1),
    }


# ---- Comparison with a bench_torch.py JSON.


def reference_device_name(reference_meta: Dict[str, Any]) -> Optional[str]:
    """The reference's counterpart of device.device_name: the CUDA device's name, or the CPU's model."""
    if reference_meta.get("device") == "cuda":
        return reference_meta.get("cuda", {}).get("device_name")
    return reference_meta.get("cpu_model")


def compare_with_reference(results: Dict[str, Dict[str, Any]], device_name: str, params: Dict[str, int],
                           reference: Dict[str, Any], matmul_precision: str) -> Dict[str, Any]:
    """Ratios ours / reference, item by item, where the two ran the same models on the same device.

    time_ratio compares median times (< 1: ours is faster); throughput_ratio compares throughputs in the same
    unit (> 1: ours is faster). With another device or other model sizes, no ratio is formed and `reasons`
    says why; with another batch size, that item gets none.
    """
    ref_meta = reference.get("meta", {})
    ref_device = reference_device_name(ref_meta)
    reasons = []
    if ref_device != device_name:
        reasons.append(f"devices differ: ours {device_name!r}, reference {ref_device!r}")
    ref_params = reference.get("params", {})
    sizes = [f"{m} {params[m]:,} vs {ref_params.get(m)}" for m in MODEL_NAMES if params[m] != ref_params.get(m)]
    if sizes:
        reasons.append("model sizes differ (another config or game): " + ", ".join(sizes))
    items = {}
    for name, ours in results.items():
        ref_name = ours["reference_item"]
        theirs = reference.get("results", {}).get(ref_name) if ref_name else None
        if theirs is None:
            continue
        why = list(reasons)
        if ours["batch_size"] != REFERENCE_BATCH_SIZE:
            why.append(f"batch {ours['batch_size']}, the reference's is {REFERENCE_BATCH_SIZE}")
        same_unit = theirs.get("throughput_unit") == ours["throughput_unit"] and theirs.get("throughput_per_s")
        items[name] = {
            "reference_item": ref_name,
            "reference_median_ms": theirs["median_ms"],
            "reference_throughput_per_s": theirs.get("throughput_per_s"),
            "reference_throughput_unit": theirs.get("throughput_unit"),
            "time_ratio": None if why else ours["median_ms"] / theirs["median_ms"],
            "throughput_ratio": None if why or not same_unit else ours["throughput_per_s"] / theirs["throughput_per_s"],
            "why_no_ratio": "; ".join(why) or None,
        }
    return {
        "device_name": ref_device,
        "comparable": not reasons,
        "reasons": reasons,
        "notes": _precision_notes(ref_meta, matmul_precision),
        "meta": {k: ref_meta.get(k) for k in ("device", "torch_version", "reference_commit", "mode", "dtype", "amp",
                                              "nproc", "torch_num_threads", "cuda")},
        "items": items,
    }


def _precision_notes(ref_meta: Dict[str, Any], matmul_precision: str) -> List[str]:
    notes = []
    if ref_meta.get("amp"):
        notes.append(f"the reference ran its forward passes under {ref_meta['amp']} autocast; ours are float32")
    cuda = ref_meta.get("cuda")
    if cuda:
        ref_tf32 = bool(cuda.get("matmul_allow_tf32")) and bool(cuda.get("cudnn_allow_tf32"))
        if ref_tf32 != (matmul_precision == "default"):
            notes.append(f"TF32 differs: reference TF32 {'on' if ref_tf32 else 'off'}, ours "
                         f"--matmul_precision={matmul_precision}")
    return notes


# ---- Projection of one run.


def schedule(config: config_dict.ConfigDict) -> Dict[str, Any]:
    """What one run does, by the official trainer: an initial collection of first_epoch.min
    steps (assuming the reward threshold is met by then), one epoch per steps_per_epoch further steps until
    the budget, then num_final_epochs; the first epoch makes steps_first_epoch updates of each model, every
    later one steps_per_epoch; 4 test episodes every `evaluation.every` epochs and the final ones at the end."""
    t, test = config.collection.train, config.collection.test
    num_epochs = (t.num_steps_total - t.first_epoch.min) // t.steps_per_epoch + config.training.num_final_epochs
    num_evaluations = num_epochs // config.evaluation.every
    return {
        "num_epochs": num_epochs,
        "updates": {m: config[m].training.steps_first_epoch + (num_epochs - 1) * config[m].training.steps_per_epoch
                    for m in MODEL_NAMES},
        "env_steps": t.num_steps_total,
        "num_evaluations": num_evaluations,
        "test_episodes": num_evaluations * test.num_episodes + test.num_final_episodes,
    }


# The item that times each model's update in the training loop.
UPDATE_ITEMS = {"denoiser": "denoiser_train_step_seq6", "rew_end_model": "rew_end_train_step",
                "actor_critic": "actor_critic_update"}


def project_run(config: config_dict.ConfigDict, results: Dict[str, Dict[str, Any]],
                eval_episode_steps: int) -> Dict[str, Any]:
    """Hours of one run on this mesh from the measured rates, by phase; a phase whose item was not run has
    none, and then neither has the total."""
    s = schedule(config)
    updates = s["updates"]

    def phase(item: str, count: float, unit: str, per_call: bool) -> Dict[str, Any]:
        """count calls of the item (per_call), or count units of its throughput."""
        r = results.get(item)
        if r is None:
            seconds = None
        else:
            seconds = count * r["median_ms"] / 1e3 if per_call else count / r["throughput_per_s"]
        return {"item": item, "count": count, "unit": unit, "seconds": seconds,
                "hours": None if seconds is None else seconds / 3600}

    phases = {f"{m}_updates": phase(UPDATE_ITEMS[m], updates[m], "updates", True) for m in MODEL_NAMES}
    # One batch sampled per update (the actor-critic's: its rows' fresh initial conditions).
    phases["batch_sampling"] = phase("sampling", sum(updates[m] * config[m].training.batch_size for m in MODEL_NAMES),
                                     "segments", False)
    phases["collection"] = phase("collection", s["env_steps"], "env steps", False)
    phases["evaluation"] = phase("collection", s["test_episodes"] * eval_episode_steps, "env steps", False)
    compiled = [results.get(item) for item in UPDATE_ITEMS.values()]
    compile_s = None if None in compiled else sum(r["compile_s"] for r in compiled)
    phases["compilation"] = {"item": "the 3 updates' compile_s", "count": 1, "unit": "once",
                             "seconds": compile_s, "hours": None if compile_s is None else compile_s / 3600}
    missing = sorted((set(UPDATE_ITEMS.values()) | {"sampling", "collection"}) - set(results))
    total = None if missing else sum(p["seconds"] for p in phases.values())
    return {
        "schedule": s,
        "eval_episode_steps": eval_episode_steps,
        "phases": phases,
        "total_hours": None if total is None else total / 3600,
        "missing_items": missing,
        "excluded": "test losses of the denoiser and reward/end model at evaluations, checkpointing, logging, "
                    "compiling the policy and the sampler; an initial collection longer than first_epoch.min "
                    "shortens the run by one epoch per steps_per_epoch extra steps",
    }


def project_group(config: config_dict.ConfigDict, results: Dict[str, Dict[str, Any]], eval_episode_steps: int,
                  phase_items: Dict[str, str], num_seeds: int) -> Dict[str, Any]:
    """Hours of one game's num_seeds seeds trained as one group (training/group.py) on this mesh: each model's
    updates at the rate of its group phase item (phase_items: model -> item; its calls update every seed, batches
    sampled inside), and every seed's collection and test episodes one seed after another at the collection rate.
    Compilation: the group phases' compile_s."""
    s = schedule(config)

    def phase(item: str, count: float, unit: str) -> Dict[str, Any]:
        r = results.get(item)
        seconds = None if r is None else count / r["throughput_per_s"]
        return {"item": item, "count": count, "unit": unit, "seconds": seconds,
                "hours": None if seconds is None else seconds / 3600}

    phases = {f"{m}_updates": phase(phase_items[m], s["updates"][m] * num_seeds, "seed-updates") for m in MODEL_NAMES}
    phases["collection"] = phase("collection", s["env_steps"] * num_seeds, "env steps")
    phases["evaluation"] = phase("collection", s["test_episodes"] * eval_episode_steps * num_seeds, "env steps")
    compiled = [results.get(item) for item in phase_items.values()]
    compile_s = None if None in compiled else sum(r["compile_s"] for r in compiled)
    phases["compilation"] = {"item": "the 3 group phases' compile_s", "count": 1, "unit": "once",
                             "seconds": compile_s, "hours": None if compile_s is None else compile_s / 3600}
    missing = sorted((set(phase_items.values()) | {"collection"}) - set(results))
    total = None if missing else sum(p["seconds"] for p in phases.values())
    return {"schedule": s, "num_seeds": num_seeds, "eval_episode_steps": eval_episode_steps, "phases": phases,
            "total_hours": None if total is None else total / 3600, "missing_items": missing}


# ---- Tables.


def _fmt(x: Optional[float], width: int, decimals: int) -> str:
    return f"{'-':>{width}s}" if x is None else f"{x:{width}.{decimals}f}"


def results_table(results: Dict[str, Dict[str, Any]], comparison: Optional[Dict[str, Any]]) -> str:
    """One line per item; `ours/ref` is the ratio of median times (< 1: ours is faster)."""
    header = (f"{'item':27s} {'median ms':>10s} {'min ms':>10s} {'n':>3s}  {'throughput':32s} {'compile s':>9s} "
              f"{'GFLOP/call':>10s} {'TFLOP/s':>8s} {'% peak':>6s} {'peak MiB':>8s} {'ref ms':>10s} {'ours/ref':>8s}")
    lines = [header, "-" * len(header)]
    compared = comparison["items"] if comparison else {}
    for name, r in results.items():
        c = compared.get(name, {})
        flops, fraction = r["flops_per_call"], r["fraction_of_peak"]
        throughput = f"{r['throughput_per_s']:.1f} {r['throughput_unit']}"
        lines.append(
            f"{name:27s} {_fmt(r['median_ms'], 10, 3)} {_fmt(r['min_ms'], 10, 3)} {r['repeats']:3d}  "
            f"{throughput:32s} {_fmt(r['compile_s'], 9, 1)} {_fmt(None if flops is None else flops / 1e9, 10, 2)} "
            f"{_fmt(r['achieved_tflops'], 8, 3)} {_fmt(None if fraction is None else 100 * fraction, 6, 1)} "
            f"{_fmt(r['peak_mib'], 8, 0)} {_fmt(c.get('reference_median_ms'), 10, 3)} "
            f"{_fmt(c.get('time_ratio'), 8, 3)}")
    return "\n".join(lines)


def projection_table(projection: Dict[str, Any]) -> str:
    s = projection["schedule"]
    group = f"{projection['num_seeds']} seeds in one process, each " if "num_seeds" in projection else ""
    lines = [f"projected run: {group}{s['num_epochs']} epochs, updates {s['updates']}, {s['env_steps']:,} env steps, "
             f"{s['test_episodes']} test episodes of {projection['eval_episode_steps']:,} steps",
             f"{'phase':24s} {'item':27s} {'count':>14s} {'hours':>8s}"]
    for name, p in projection["phases"].items():
        lines.append(f"{name:24s} {p['item'][:27]:27s} {p['count']:14,.0f} {_fmt(p['hours'], 8, 2)}")
    total = projection["total_hours"]
    lines.append(f"{'total':24s} {'':27s} {'':14s} {_fmt(total, 8, 2)}"
                 + (f"   (missing items: {', '.join(projection['missing_items'])})" if total is None else ""))
    return "\n".join(lines)


def comparison_warnings(comparison: Dict[str, Any]) -> Sequence[str]:
    out = [f"reference not compared: {r}" for r in comparison["reasons"]]
    return out + [f"note: {n}" for n in comparison["notes"]]
