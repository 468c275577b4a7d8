"""Timing one program: compiled once ahead of time, then called with its state threaded through."""

import statistics
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax

from diamond_jax.benchmarking import flops

MIB = 2 ** 20


class Program(NamedTuple):
    """A jitted function and the arguments of its first call, placed on the mesh as the training loop places
    them. `advance(args, outputs)` gives the next call's arguments: the donated state comes back as an
    output, so it has to be passed on."""

    jitted: Any
    args: Tuple
    advance: Callable[[Tuple, Any], Tuple]


def same_args(args: Tuple, outputs: Any) -> Tuple:
    return args


def next_state(args: Tuple, outputs: Any) -> Tuple:
    """For update(state, batch, key) -> (state, metrics, ...): the new state, the same batch and key."""
    return (outputs[0],) + tuple(args[1:])


def summarize(times_s: Sequence[float]) -> Dict[str, Any]:
    ms = [t * 1e3 for t in times_s]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "times_ms": [round(x, 4) for x in ms], "repeats": len(ms)}


def measure_program(program: Program, warmup: int, repeats: int) -> Dict[str, Any]:
    """Compile time, FLOPs, XLA's memory plan and the call times of a program.

    The calls go to the ahead-of-time compiled executable, which refuses arguments whose placement differs
    from the one it was compiled for instead of silently compiling again, as a jitted function would.
    """
    start = time.perf_counter()
    traced = program.jitted.trace(*program.args)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - start
    args, times = program.args, []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        outputs = jax.block_until_ready(compiled(*args))
        if i >= warmup:
            times.append(time.perf_counter() - start)
        args = program.advance(args, outputs)
    jax.block_until_ready(args)
    return dict(summarize(times), warmup=warmup, compile_s=compile_s, flops_per_call=flops.count_flops(traced.jaxpr),
                xla_cost_analysis_flops=flops.xla_flops(compiled), xla_memory_mib=xla_memory_mib(compiled))


def measure_rates(measure_rate: Callable[[], float], units_per_call: float, repeats: int) -> Dict[str, Any]:
    """For host-driven items measured by their own function (which compiles and warms up inside): one rate
    (units/s) per repeat, turned into times per call of `units_per_call` units."""
    times: List[float] = [units_per_call / measure_rate() for _ in range(repeats)]
    return dict(summarize(times), warmup=None, compile_s=None, flops_per_call=None, xla_cost_analysis_flops=None,
                xla_memory_mib=None)


def xla_memory_mib(compiled: jax.stages.Compiled) -> Optional[Dict[str, float]]:
    """XLA's memory plan of the program per device (arguments, outputs, temporaries; donated arguments alias
    outputs), or None where the backend gives none."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    fields = {"arguments": "argument_size_in_bytes", "outputs": "output_size_in_bytes",
              "aliased": "alias_size_in_bytes", "temporaries": "temp_size_in_bytes"}
    return {name: round(getattr(analysis, attr) / MIB, 2) for name, attr in fields.items()}
