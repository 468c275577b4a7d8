"""What the benchmark ran on: the device's name for comparisons, its peak FLOP/s, its memory high-water mark."""

import platform
from typing import Dict, Optional, Sequence, Tuple

import jax

# Dense peak TFLOP/s (no structured sparsity) of one device, from the vendors' datasheets, by the arithmetic
# a float32 matrix product or convolution uses: "fp32" on CUDA cores, "tf32" on tensor cores, "bf16".
# Matched by substring of jax's device_kind, first match wins (so "H100 PCIe" precedes "H100", the SXM part).
PEAK_TFLOPS: Tuple[Tuple[str, Dict[str, float]], ...] = (
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0}),
    ("H100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),
    ("H200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    ("RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2}),  # the paper's GPU
    ("TPU v4", {"bf16": 275.0}),
    ("TPU v5 lite", {"bf16": 197.0}),
    ("TPU v5", {"bf16": 459.0}),  # v5p
    ("TPU v6 lite", {"bf16": 918.0}),
)
# A float32 product at JAX's "highest" precision takes 6 bf16 passes on a TPU.
TPU_HIGHEST_PASSES = 6


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def device_name(device: jax.Device) -> str:
    """The name two benchmarks must share to be compared: the GPU's or TPU's kind (for a GPU, the name that
    torch.cuda.get_device_name also reports), or the CPU's model."""
    return cpu_model() if device.platform == "cpu" else device.device_kind


def peak_tflops(device: jax.Device, matmul_precision: str) -> Tuple[Optional[float], str]:
    """(peak TFLOP/s of one device for float32 programs at this JAX matmul precision, or None; why)."""
    kind = device.device_kind
    if device.platform == "cpu":
        return None, "no peak table for CPUs: pass --peak_tflops to get a fraction of peak"
    entry = next((peaks for key, peaks in PEAK_TFLOPS if key in kind), None)
    if entry is None:
        return None, f"device kind {kind!r} is not in the peak table: pass --peak_tflops"
    if device.platform == "tpu":
        if matmul_precision == "highest":
            return entry["bf16"] / TPU_HIGHEST_PASSES, (
                f"{kind}: bf16 peak / {TPU_HIGHEST_PASSES}, float32 products at 'highest' precision take "
                f"{TPU_HIGHEST_PASSES} bf16 passes")
        return entry["bf16"], f"{kind}: bf16 peak, float32 products run as one bf16 pass at JAX's default precision"
    if matmul_precision == "highest":
        return entry["fp32"], f"{kind}: float32 (CUDA-core) dense peak, TF32 is off at 'highest' precision"
    return entry["tf32"], (f"{kind}: TF32 tensor-core dense peak, since JAX's default precision runs float32 "
                           f"products and convolutions in TF32 (the reference trainer allows TF32 too)")


def peak_bytes_in_use(devices: Sequence[jax.Device]) -> Optional[int]:
    """The largest memory high-water mark over the devices since the process started (JAX cannot reset it),
    or None where the backend keeps no statistics (CPU)."""
    stats = [d.memory_stats() for d in devices]
    if not all(s and "peak_bytes_in_use" in s for s in stats):
        return None
    return max(int(s["peak_bytes_in_use"]) for s in stats)
