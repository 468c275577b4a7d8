"""The benchmark entry point on the debug config: its JSON, its comparison with a reference JSON, its projection
and its FLOP count. No timing is asserted: speed is measured by the benchmark, not by tests."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import atari100k
from diamond_jax.agent import MODEL_NAMES
from diamond_jax.benchmarking import device, flops, items, report, timing
from diamond_jax.training import parallel, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITEM_FIELDS = {"what", "reference_item", "reference_note", "batch_size", "median_ms", "min_ms", "max_ms", "times_ms",
               "repeats", "warmup", "compile_s", "flops_per_call", "xla_cost_analysis_flops", "xla_memory_mib",
               "throughput_per_s", "throughput_unit", "achieved_tflops", "fraction_of_peak", "peak_bytes_in_use",
               "peak_mib"}
REF_INNER_MS, REF_INNER_THROUGHPUT = 2000.0, 16.0


@pytest.fixture(scope="module")
def run(tmp_path_factory, debug_agent):
    """One benchmark process on two CPU devices: four items, the denoiser at the reference's batch 32 so that
    its items get ratios, against a hand-written reference JSON of the same device and models."""
    tmp = tmp_path_factory.mktemp("benchmark")
    _, variables = debug_agent
    params = {m: steps.count_params(variables[m]["params"]) for m in MODEL_NAMES}
    reference = {
        "meta": {"device": "cpu", "cpu_model": device.cpu_model(), "torch_version": "2.13.0"},
        "params": dict(params, total=sum(params.values())),
        "results": {
            "inner_model_forward": {"median_ms": REF_INNER_MS, "throughput_per_s": REF_INNER_THROUGHPUT,
                                    "throughput_unit": "images/s"},
            "rew_end_train_step": {"median_ms": 500.0, "throughput_per_s": 1152.0, "throughput_unit": "transitions/s"},
            "compute_lambda_returns": {"median_ms": 0.5},
        },
    }
    ref_path, out_path = tmp / "ref.json", tmp / "bench.json"
    ref_path.write_text(json.dumps(reference))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "diamond_jax.benchmark", f"--config={REPO}/configs/atari100k.py:debug",
           "--config.denoiser.training.batch_size=32", "--only=inner_model_forward,rew_end_train_step,denoiser_phase,sampling",
           "--repeats=2", "--warmup=1", "--cpu_devices=2", "--sampling_batches=2", f"--reference={ref_path}",
           f"--json={out_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out_path.read_text()), proc.stdout, params


def test_json_has_every_field_of_every_item(run):
    out, stdout, params = run
    assert list(out["results"]) == ["inner_model_forward", "rew_end_train_step", "denoiser_phase", "sampling"]
    for name, r in out["results"].items():
        assert set(r) == ITEM_FIELDS, name
        assert len(r["times_ms"]) == r["repeats"] == 2
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["throughput_per_s"] > 0 and r["throughput_unit"].endswith("/s")
        assert r["peak_bytes_in_use"] is None and r["fraction_of_peak"] is None  # CPU: no statistics, no peak
        assert name in stdout
    for name in ("inner_model_forward", "rew_end_train_step"):
        r = out["results"][name]
        assert r["compile_s"] > 0 and r["flops_per_call"] > 0 and r["achieved_tflops"] > 0
        assert r["xla_cost_analysis_flops"] > 0 and r["xla_memory_mib"]["arguments"] > 0
    inner = out["results"]["inner_model_forward"]
    assert inner["batch_size"] == 32
    assert inner["throughput_per_s"] == pytest.approx(32 / (inner["median_ms"] / 1e3))
    rew_end = out["results"]["rew_end_train_step"]
    seq_length = atari100k.get_config("debug").rew_end_model.training.seq_length
    assert rew_end["throughput_per_s"] == pytest.approx(4 * (seq_length - 1) / (rew_end["median_ms"] / 1e3))
    assert out["results"]["sampling"]["compile_s"] is None and out["results"]["sampling"]["flops_per_call"] is None

    meta = out["meta"]
    assert meta["platform"] == "cpu" and meta["num_devices"] == 2 and meta["config"].endswith("atari100k.py:debug")
    assert meta["config_overrides"] == {"denoiser.training.batch_size": 32}
    for key in ("device_kind", "device_name", "hostname", "cpu_count", "date_utc", "peak_source"):
        assert meta[key]
    assert {"jax", "jaxlib", "flax"} <= set(meta["versions"])
    assert out["params"] == dict(params, total=sum(params.values()))
    assert out["config"]["world_model_env"]["sampler"]["s_tmax"] == "inf"  # strict JSON


def test_reference_ratios_are_ours_over_theirs(run):
    out, stdout, _ = run
    comparison = out["reference"]
    assert comparison["comparable"] and comparison["reasons"] == []
    inner = out["results"]["inner_model_forward"]
    ratio = comparison["items"]["inner_model_forward"]
    assert ratio["time_ratio"] == pytest.approx(inner["median_ms"] / REF_INNER_MS)
    assert ratio["throughput_ratio"] == pytest.approx(inner["throughput_per_s"] / REF_INNER_THROUGHPUT)
    # The reward/end model ran at the debug batch 4: no ratio against the reference's batch 32.
    rew_end = comparison["items"]["rew_end_train_step"]
    assert rew_end["time_ratio"] is None and "batch 4" in rew_end["why_no_ratio"]
    assert set(comparison["items"]) == {"inner_model_forward", "rew_end_train_step"}
    assert "WARNING" not in stdout


def test_projection_needs_every_item_of_the_run(run):
    out, _, _ = run
    projection = out["projection"]
    assert projection["total_hours"] is None
    assert projection["missing_items"] == ["actor_critic_update", "collection", "denoiser_train_step_seq6"]
    assert projection["phases"]["rew_end_model_updates"]["hours"] > 0


@pytest.mark.parametrize("case", ["missing_reference", "garbled_reference", "unwritable_json"])
def test_bad_input_stops_the_benchmark_before_anything_is_computed(tmp_path, case):
    garbled = tmp_path / "garbled.json"
    garbled.write_text('{"meta": {}, "res')
    reference, out = {"missing_reference": (tmp_path / "missing.json", tmp_path / "bench.json"),
                      "garbled_reference": (garbled, tmp_path / "bench.json"),
                      "unwritable_json": (garbled, tmp_path / "no_such_dir" / "bench.json")}[case]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "diamond_jax.benchmark", f"--config={REPO}/configs/atari100k.py:debug",
           "--only=compute_lambda_returns", f"--reference={reference}", f"--json={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    named = out if case == "unwritable_json" else reference
    assert proc.stderr.startswith("error: ") and str(named) in proc.stderr and "Fix:" in proc.stderr
    assert proc.stdout == "" and not out.exists()  # the device line is printed once models are built


def test_donated_state_on_one_device(debug_config, debug_agent):
    """On one device placing an array does not copy it, so a donated state must not hold one buffer twice (the
    reward/end model's initial LSTM state is one array of zeros for both h and c)."""
    agent, variables = debug_agent
    setup = items.Setup(debug_config, agent, variables, parallel.make_mesh(1), jax.random.key(0), 1, 1)
    measured = timing.measure_program(items.imagination_step(setup).program, warmup=1, repeats=1)
    assert measured["repeats"] == 1 and measured["flops_per_call"] > 0
    assert all(not leaf.is_deleted() for leaf in jax.tree.leaves(variables))


def test_no_ratio_across_devices_or_model_sizes():
    results = {"inner_model_forward": {"reference_item": "inner_model_forward", "batch_size": 32, "median_ms": 1.0,
                                       "throughput_per_s": 32000.0, "throughput_unit": "images/s"}}
    params = {"denoiser": 10, "rew_end_model": 20, "actor_critic": 30}
    reference = {"meta": {"device": "cuda", "cuda": {"device_name": "NVIDIA H100 80GB HBM3", "matmul_allow_tf32": True,
                                                     "cudnn_allow_tf32": True}},
                 "params": dict(params, denoiser=11),
                 "results": {"inner_model_forward": {"median_ms": 2.0, "throughput_per_s": 16000.0,
                                                     "throughput_unit": "images/s"}}}
    comparison = report.compare_with_reference(results, "NVIDIA H200", params, reference, "default")
    assert not comparison["comparable"]
    assert any("devices differ" in r for r in comparison["reasons"])
    assert any("model sizes differ" in r for r in comparison["reasons"])
    assert comparison["items"]["inner_model_forward"]["time_ratio"] is None
    assert report.comparison_warnings(comparison)

    same = report.compare_with_reference(results, "NVIDIA H100 80GB HBM3", params, dict(reference, params=params),
                                         "highest")
    assert same["comparable"] and same["items"]["inner_model_forward"]["time_ratio"] == pytest.approx(0.5)
    assert same["items"]["inner_model_forward"]["throughput_ratio"] == pytest.approx(2.0)
    assert any("TF32 differs" in n for n in same["notes"])


def test_paper_schedule():
    s = report.schedule(atari100k.get_config(""))
    assert s["num_epochs"] == 1000  # (100k - 5k) / 100 collecting epochs + 50 final ones
    assert s["updates"] == {"denoiser": 10_000 + 999 * 400, "rew_end_model": 10_000 + 999 * 400,
                            "actor_critic": 5_000 + 999 * 400}
    assert s["env_steps"] == 100_000 and s["num_evaluations"] == 100 and s["test_episodes"] == 100 * 4 + 100


def test_projection_by_phase():
    config = atari100k.get_config("")
    per_call = {"denoiser_train_step_seq6": (100.0, 640.0), "rew_end_train_step": (50.0, 11520.0),
                "actor_critic_update": (400.0, 1200.0), "sampling": (2.0, 16000.0), "collection": (1.0, 1000.0)}
    results = {k: {"median_ms": ms, "throughput_per_s": tp, "compile_s": 10.0} for k, (ms, tp) in per_call.items()}
    p = report.project_run(config, results, eval_episode_steps=2000)
    phases = p["phases"]
    assert phases["denoiser_updates"]["seconds"] == pytest.approx(409_600 * 0.1)
    assert phases["actor_critic_updates"]["seconds"] == pytest.approx(404_600 * 0.4)
    assert phases["batch_sampling"]["seconds"] == pytest.approx((2 * 409_600 + 404_600) * 32 / 16000)
    assert phases["collection"]["seconds"] == pytest.approx(100.0)
    assert phases["evaluation"]["seconds"] == pytest.approx(500 * 2000 / 1000)
    assert phases["compilation"]["seconds"] == pytest.approx(30.0)
    assert p["total_hours"] == pytest.approx(sum(ph["seconds"] for ph in phases.values()) / 3600)
    assert p["missing_items"] == []


def test_flops_count_scan_bodies_times_their_length():
    """XLA's cost analysis counts a loop body once; the jaxpr count equals XLA's on the unrolled loop (without
    padding: XLA leaves out the taps that fall on it, the jaxpr count does not)."""

    def program(unroll):
        def f(x, w, k):
            def body(c, _):
                y = jax.lax.conv_general_dilated(c, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
                return (y.reshape(8, -1) @ w).reshape(c.shape), None
            return jax.lax.scan(body, x, None, length=5, unroll=unroll)[0]
        return jax.jit(f)

    args = (jnp.ones((8, 10, 10, 4)), jnp.ones((256, 400)), jnp.ones((3, 3, 4, 4)))
    body = 2 * 8 * 8 * 8 * 4 * (3 * 3 * 4) + 2 * 8 * 256 * 400
    counted = flops.count_flops(program(1).trace(*args).jaxpr)
    assert counted == 5 * body
    unrolled = flops.xla_flops(program(True).trace(*args).lower().compile())
    assert unrolled == pytest.approx(counted, rel=1e-3)
    rolled = flops.xla_flops(program(1).trace(*args).lower().compile())
    assert rolled == pytest.approx(body, rel=1e-3)
    grad = jax.jit(jax.grad(lambda *a: program(1)(*a).sum(), argnums=(1, 2)))
    # Forward, then the gradients of both operands of each product (the input's, a convolution over the
    # padded output, counts a few more taps).
    assert flops.count_flops(grad.trace(*args).jaxpr) == pytest.approx(3 * counted, rel=0.02)


def test_phase_item_times_the_training_loops_call(run):
    """On a CPU training runs one update per compiled call (phase_loop auto), and so does the phase item."""
    out, _, _ = run
    phase = out["results"]["denoiser_phase"]
    assert "one update, no loop" in phase["what"] and phase["throughput_unit"] == "updates/s"
    assert phase["throughput_per_s"] == pytest.approx(1e3 / phase["median_ms"])


def test_group_projection_by_phase():
    """5 seeds: every seed's updates at the group phases' seed-update rates, every seed's collection in turn."""
    config = atari100k.get_config("")
    rates = {"denoiser_phase_seeds5": 50.0, "rew_end_phase_seeds5": 100.0, "actor_critic_phase_seeds5": 10.0,
             "collection": 1000.0}
    results = {k: {"median_ms": 1.0, "throughput_per_s": tp, "compile_s": 20.0} for k, tp in rates.items()}
    items = {"denoiser": "denoiser_phase_seeds5", "rew_end_model": "rew_end_phase_seeds5",
             "actor_critic": "actor_critic_phase_seeds5"}
    p = report.project_group(config, results, 2000, items, 5)
    phases = p["phases"]
    assert phases["denoiser_updates"]["seconds"] == pytest.approx(409_600 * 5 / 50)
    assert phases["actor_critic_updates"]["seconds"] == pytest.approx(404_600 * 5 / 10)
    assert phases["collection"]["seconds"] == pytest.approx(100_000 * 5 / 1000)
    assert phases["evaluation"]["seconds"] == pytest.approx(500 * 2000 * 5 / 1000)
    assert phases["compilation"]["seconds"] == pytest.approx(60.0)
    assert p["total_hours"] == pytest.approx(sum(ph["seconds"] for ph in phases.values()) / 3600)
    del results["rew_end_phase_seeds5"]
    assert report.project_group(config, results, 2000, items, 5)["missing_items"] == ["rew_end_phase_seeds5"]


def test_group_items_run_on_the_debug_config(debug_config, debug_agent):
    """A seed-group item's program runs and counts the work of all its seeds."""
    agent, variables = debug_agent
    setup = items.Setup(debug_config, agent, variables, parallel.make_mesh(1), jax.random.key(0), 1, 1)
    item = items.ITEMS["imagination_rollout_seeds2"](setup)
    b, horizon = debug_config.actor_critic.training.batch_size, debug_config.world_model_env.horizon
    assert item.units_per_call == 2 * b * horizon and item.unit == "imagined frames/s"
    traj, _ = item.program.jitted(*item.program.args)
    assert traj.obs.shape[:3] == (2, b, horizon)  # the trajectories of both seeds
