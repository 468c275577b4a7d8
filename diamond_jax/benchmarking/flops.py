"""FLOPs of a program, counted on its jaxpr.

XLA's cost analysis (`compiled.cost_analysis()["flops"]`) counts the body of a while loop once, whatever its
trip count: on jax 0.10.2 a 10-step `lax.scan` of a matrix product reports one product. Every loop here is a
scan (denoising passes, sampler steps, the imagination horizon, the LSTMs), so that figure undercounts by up to
the product of the trip counts. Counting on the jaxpr instead multiplies each scan body by its length.

Only matrix products and convolutions are counted, 2 FLOPs per multiply-add: the work that an accelerator's
peak FLOP/s refers to. Elementwise operations, normalisations and reductions are left out. A convolution counts
every tap of its window, those on the padding included (XLA leaves them out: 16% of a 3x3 convolution's taps
on the U-Net's 8x8 level, 3% at 64x64).
"""

import math
from typing import Any

import jax
from jax.extend import core


def count_flops(jaxpr: Any) -> float:
    """Matrix-product and convolution FLOPs of one evaluation of a (closed) jaxpr."""
    if isinstance(jaxpr, core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    return float(sum(_eqn_flops(eqn) for eqn in jaxpr.eqns))


def _eqn_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * _size(eqn.outvars[0]) * math.prod(lhs[d] for d in lhs_contracting)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        # Each output element sums over one kernel slice: input features (per group) x window.
        return 2.0 * _size(eqn.outvars[0]) * math.prod(rhs) / out_features
    if name == "cond":
        return max(count_flops(branch) for branch in eqn.params["branches"])  # one branch runs
    inner = sum(count_flops(v) for v in eqn.params.values() if isinstance(v, (core.Jaxpr, core.ClosedJaxpr)))
    # A while loop's trip count is unknown here: its body counts once, as in XLA's analysis. None of the
    # benchmarked programs has one (scans stay scans in the jaxpr).
    return inner * eqn.params["length"] if name == "scan" else inner


def _size(var) -> int:
    return math.prod(var.aval.shape)


def xla_flops(compiled: jax.stages.Compiled):
    """XLA's own count (see the module docstring for why it is not the one reported as FLOPs per call), or
    None where the backend gives none. Older jax versions return one dict per program in a list."""
    analysis = compiled.cost_analysis()
    analyses = analysis if isinstance(analysis, (list, tuple)) else [analysis]
    values = [a["flops"] for a in analyses if a and "flops" in a]
    return float(sum(values)) if values else None
