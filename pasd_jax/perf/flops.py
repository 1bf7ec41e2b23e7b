"""Model FLOPs of one call, counted from the jaxpr (independent of XLA's cost analysis).

    count_flops(fn, *args, **kwargs) -> int        FLOPs of fn(*args, **kwargs)
    flop_breakdown(fn, *args, **kwargs) -> dict    {primitive name: FLOPs}

Arguments may be arrays or `jax.ShapeDtypeStruct`s (nothing is materialised: `jax.make_jaxpr` only
traces shapes). Counted, at 2 FLOPs per multiply-add, as `torch.utils.flop_counter` does:

* `dot_general`: 2 · (batch · lhs-free · rhs-free · contracted sizes);
* `conv_general_dilated`: 2 · |out| · |kernel| / kernel output features (groups and dilation
  included through the kernel shape);
* the cuDNN fused attention primitives (`dot_product_attention_fwd*`, what
  `jax.nn.dot_product_attention(..., implementation="cudnn")` lowers to; XLA's cost analysis sees
  only an opaque custom call): forward 2·B·N·T·S·(H + Hv) (q·kᵀ and p·v), backward twice that
  (dq, dk, dv and dp, torch's convention; FlashAttention's recomputed q·kᵀ is not counted).

Everything else (elementwise ops, reductions, softmax, norms, RNG) counts 0, like torch.
Control flow and calls are entered recursively: `scan` (also `lax.map`, `fori_loop` with static
bounds) × `length`; `while` × its trip count when it is a counted loop with literal bounds
(`i < n`, i and n literal at entry, i += 1), else one iteration with a warning; `cond`/`switch`:
the **most expensive branch** (an upper bound: the count must not depend on traced values);
`remat`/`checkpoint`, `custom_jvp_call`, `custom_vjp_call`, `jit`/`pjit`, `closed_call` and any
other primitive carrying a jaxpr: its body once. A differentiated function's jaxpr already holds
the backward dots (and remat's recomputation), so `count_flops(jax.grad(f), ...)` counts
forward + backward as executed. `shard_map` bodies see per-shard shapes and are multiplied by the
number of shards.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Callable

import jax
import numpy as np
from jax.extend import core as jcore

#: Name scope whose FLOPs are also reported apart: the q·kᵀ and p·v products of attention (what
#: torch's counter misses on a CPU, where it has no rule for the fused SDPA kernel).
ATTENTION_SCOPE = "attention_core"

#: Primitive names of the cuDNN fused attention (forward and backward, plain and fp8).
ATTENTION_FWD = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper",
                 "dot_product_attention_fp8_fwd", "dot_product_attention_fp8_fwd_wrapper")
ATTENTION_BWD = ("dot_product_attention_bwd", "dot_product_attention_bwd_wrapper",
                 "dot_product_attention_fp8_bwd", "dot_product_attention_fp8_bwd_wrapper")


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def dot_general_flops(lhs_shape, rhs_shape, dimension_numbers) -> int:
    """2 · lhs elements · rhs free (non-contracted, non-batch) elements."""
    (_, rhs_contract), (_, rhs_batch) = dimension_numbers
    rhs_free = [d for i, d in enumerate(rhs_shape) if i not in rhs_contract and i not in rhs_batch]
    return 2 * _size(lhs_shape) * _size(rhs_free)


def conv_flops(out_shape, kernel_shape, kernel_out_dim: int) -> int:
    """2 · output elements · (kernel elements per output feature)."""
    return 2 * _size(out_shape) * (_size(kernel_shape) // kernel_shape[kernel_out_dim])


def attention_flops(q_shape, k_shape, v_shape, layout: int = 0) -> int:
    """Forward FLOPs of fused attention: 2·B·N·T·S·(H + Hv); layout 0 = BTNH, 1 = BNTH."""
    if layout == 1:
        b, n, t, h = q_shape
        s, hv = v_shape[2], v_shape[3]
    else:
        b, t, n, h = q_shape
        s, hv = v_shape[1], v_shape[3]
    return 2 * b * n * t * s * (h + hv)


def _layout(params) -> int:
    layout = params.get("layout", 0)
    return int(getattr(layout, "value", layout))


def _literal(atom):
    return atom.val if isinstance(atom, jcore.Literal) else None


def _while_trips(eqn) -> int | None:
    """Trip count of a counted `while` (cond `carry[i] < carry[j]` or `< literal`, body i += 1)."""
    p = eqn.params
    cond, body = p["cond_jaxpr"].jaxpr, p["body_jaxpr"].jaxpr
    n_cc, n_bc = p["cond_nconsts"], p["body_nconsts"]
    if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != "lt":
        return None
    carry_in = eqn.invars[n_cc + n_bc:]
    cond_carry = cond.invars[n_cc:]

    def entry_value(atom):
        if isinstance(atom, jcore.Literal):
            return atom.val
        if atom in cond_carry:
            return _literal(carry_in[cond_carry.index(atom)])
        if atom in cond.invars[:n_cc]:
            return _literal(eqn.invars[cond.invars.index(atom)])
        return None

    lhs, rhs = cond.eqns[0].invars
    if lhs not in cond_carry:
        return None
    k = cond_carry.index(lhs)
    start, stop = entry_value(lhs), entry_value(rhs)
    if start is None or stop is None:
        return None
    if rhs in cond_carry:
        j = cond_carry.index(rhs)
        if body.outvars[j] is not body.invars[n_bc + j]:
            return None  # the bound changes inside the loop
    out = body.outvars[k]
    step = next((e for e in body.eqns if out in e.outvars), None)
    if (step is None or step.primitive.name != "add" or body.invars[n_bc + k] not in step.invars
            or 1 not in [_literal(a) for a in step.invars]):
        return None
    return max(0, int(stop) - int(start))


def _closed(j):
    return j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j


def _jaxprs_in(params):
    for value in params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                yield _closed(v)


def _count(jaxpr, scale: int, acc: dict, in_scope: bool = False) -> None:
    for eqn in jaxpr.eqns:
        name, p = eqn.primitive.name, eqn.params
        scoped = in_scope or ATTENTION_SCOPE in str(eqn.source_info.name_stack)
        before = sum(v for k, v in acc.items() if k != ATTENTION_SCOPE)
        _count_eqn(eqn, name, p, scale, acc, scoped)
        if scoped and not in_scope:
            acc[ATTENTION_SCOPE] += sum(v for k, v in acc.items() if k != ATTENTION_SCOPE) - before


def _count_eqn(eqn, name, p, scale: int, acc: dict, scoped: bool) -> None:
    rec = lambda sub, mult=1, into=acc: _count(sub, scale * mult, into, scoped)
    shapes = [getattr(v.aval, "shape", ()) for v in eqn.invars]
    if name == "dot_general":
        acc[name] += scale * dot_general_flops(shapes[0], shapes[1], p["dimension_numbers"])
    elif name == "conv_general_dilated":
        out_dim = p["dimension_numbers"].rhs_spec[0]
        acc[name] += scale * conv_flops(eqn.outvars[0].aval.shape, shapes[1], out_dim)
    elif name in ATTENTION_FWD or name in ATTENTION_BWD:
        fwd = attention_flops(shapes[0], shapes[1], shapes[2], _layout(p))
        acc["fused_attention"] += scale * (fwd if name in ATTENTION_FWD else 2 * fwd)
        if not scoped:  # fused attention is attention wherever it is called from
            acc[ATTENTION_SCOPE] += scale * (fwd if name in ATTENTION_FWD else 2 * fwd)
    elif name == "scan":
        rec(_closed(p["jaxpr"]), int(p["length"]))
    elif name == "while":
        trips = _while_trips(eqn)
        if trips is None:
            warnings.warn("count_flops: while loop with unknown trip count, counted as one iteration")
            trips = 1
        rec(_closed(p["body_jaxpr"]), trips)
        rec(_closed(p["cond_jaxpr"]), trips + 1)
    elif name == "cond":
        branch_counts = []
        for branch in p["branches"]:
            sub = defaultdict(int)
            rec(_closed(branch), 1, sub)
            branch_counts.append(sub)
        best = max(branch_counts, key=lambda d: sum(v for k, v in d.items() if k != ATTENTION_SCOPE))
        for k, v in best.items():
            acc[k] += v
    elif name == "shard_map":
        mesh = p.get("mesh")
        manual = p.get("manual_axes", getattr(mesh, "axis_names", ()))
        shards = math.prod(mesh.shape[a] for a in manual) if mesh is not None else 1
        for sub in _jaxprs_in(p):
            rec(sub, shards)
    else:  # jit/pjit, closed_call, remat, custom_jvp_call, custom_vjp_call, ...
        for sub in _jaxprs_in(p):
            rec(sub)


def jaxpr_flop_breakdown(closed_jaxpr) -> dict[str, int]:
    """{primitive: FLOPs} of a (closed) jaxpr; see the module docstring for the rules.

    The extra key `ATTENTION_SCOPE` (when present) is a sub-total, not an addend: the FLOPs of
    equations under `jax.named_scope(ATTENTION_SCOPE)` (softmax(q·kᵀ)·v in `pasd_jax.nn.attention`)."""
    acc: dict[str, int] = defaultdict(int)
    _count(_closed(closed_jaxpr), 1, acc)
    return dict(acc)


def _is_array_tree(value) -> bool:
    leaves = jax.tree.leaves(value)
    return bool(leaves) and all(isinstance(x, (jax.ShapeDtypeStruct, jax.Array, np.ndarray)) for x in leaves)


def flop_breakdown(fn: Callable, *args, **kwargs) -> dict[str, int]:
    """{primitive: FLOPs} of one call `fn(*args, **kwargs)`.

    Positional args and array-valued kwargs are traced (arrays or ShapeDtypeStructs); other
    kwargs (modules, methods, flags) are passed through as static values."""
    traced = {k: v for k, v in kwargs.items() if _is_array_tree(v)}
    static = {k: v for k, v in kwargs.items() if k not in traced}
    jaxpr = jax.make_jaxpr(lambda a, kw: fn(*a, **kw, **static))(args, traced)
    return jaxpr_flop_breakdown(jaxpr)


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """Model FLOPs of one call `fn(*args, **kwargs)`, counted from its jaxpr (module docstring)."""
    return int(sum(v for k, v in flop_breakdown(fn, *args, **kwargs).items() if k != ATTENTION_SCOPE))
