"""The compiled step (``compile=True``): each pack's technique chain as one ``torch.compile`` graph.

A pack's step has three parts (``HinaOptimizer._run``):

1. eager: gather the gradients into the flat buffer ``g`` (one ``_foreach_copy_``), dequantize 8-bit state;
2. :func:`run_chain`: the non-finite screen and every technique of the group, on flat buffers only;
3. eager: the parameter write (``StepContext.commit``: foreach ops, or stochastic rounding with its generator)
   and the 8-bit requantization.

With ``compile=True`` part 2 is compiled by ``torch.compile`` (inductor: C++/OpenMP on CPU, Triton on CUDA),
so its 10 to 40 elementwise passes become a few fused loops. What keeps the graph count at one per phase:

* the graph takes the pack's flat buffers, never per-tensor lists (the write that needs them stays in part 3),
  so its size and its guards do not grow with the number of tensors;
* it is compiled with ``dynamic=True``: the lr, betas, step count and every other hyperparameter are symbolic
  inputs (host scalars passed to the kernels, no upload), so a scheduler or a new step never recompiles; a
  technique's phase test on the step (``step <= warmup_steps``, ``step == 1``) is a guard, and each phase
  gets its own graph the first time it is reached;
* every pack has its own cache (a copy of the function's code object), so dynamo's recompile limit (8 graphs
  per code object) counts the phases of one pack, not packs times phases.

A pack's first step always runs eagerly: it builds the pack's caches (index tensors, masks uploaded once)
and is a phase of one step for several techniques (ADOPT's and CAME's initialisation), which a graph would
cost seconds to compile for nothing.

Where no compiler works (no C++ toolchain on CPU, no Triton on CUDA, an op dynamo cannot capture), the step
falls back to eager for that pack with one log line saying why: compiling happens before the graph runs
(``fullgraph=True`` captures all of part 2 or nothing), so a failed compile has changed no state and the
eager chain runs the same step instead.
"""

from __future__ import annotations

import logging
import types
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

if TYPE_CHECKING:  # pragma: no cover
    from .base import HinaOptimizer
    from .context import StepContext
    from .pack import Pack
    from .technique import Technique

logger = logging.getLogger("sd_hina_plugin")

#: attempts to compile a pack's chain before it stays eager (a first attempt may meet a cache being built)
ATTEMPTS = 2
#: graphs one pack may compile (its phases, plus the first graph before the scalars are known to vary); dynamo's
#: default of 8 is patched only around our calls
RECOMPILE_LIMIT = 24


def run_chain(opt: "HinaOptimizer", ctx: "StepContext", techniques: list["Technique"],
              present: torch.Tensor | None) -> None:
    """Part 2 of a pack's step: screen non-finite gradients, mask tensors without a gradient (``present``),
    then run the techniques in order (the parameter write is prepared, not done, when ``ctx.compiling``)."""
    opt._screen_nonfinite(ctx)
    if present is not None:
        ctx.keep.mul_(present)
    masked = False
    for k, tech in enumerate(techniques):
        if tech.stage == "apply" and not masked:  # skipped tensors: no update (decay masked at the write)
            opt._mask_skipped(ctx, ctx.u)
            masked = True
        tech.run(ctx)
        if ctx.done:
            for later in techniques[k + 1:]:
                later.skipped(ctx)
            break


def _own_copy(fn: Callable, tag: str) -> Callable:
    """``fn`` with a code object of its own: dynamo keeps compiled graphs (and counts recompiles) per code object."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _chain_compiled(opt: "HinaOptimizer", ctx: "StepContext", techniques: list["Technique"],
                    present: torch.Tensor | None) -> None:
    ctx.compiling = True
    ctx._local = {}  # made inside the graph: its buffers need not outlive it (a dict from outside would be replayed)
    run_chain(opt, ctx, techniques, present)
    # a tensor still referenced from ctx when the graph ends becomes a graph output, which must be materialized
    # in memory of its own: drop the references to work buffers no one reads after the chain (what the write
    # needs is in ctx.pending, bf16 state to round back in ctx._states)
    ctx.g = ctx.m_in = ctx.lr_scale = None
    ctx._local = {}
    # likewise a symbolic float left on ctx (the lr times a bias correction) would be returned to Python, which
    # makes dynamo specialize it: a graph per value
    ctx.step_scale = ctx.decay = 1.0


def compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this could not be compiled" (raised before the graph runs), as opposed to errors
    of the step itself (out of memory, a wrong dtype), which propagate."""
    from torch._dynamo import exc

    return (exc.TorchDynamoException, exc.BackendCompilerFailed, exc.FailOnRecompileLimitHit, NotImplementedError,
            OSError, ImportError)


class CompiledSteps:
    """Per-pack compiled chains of one optimizer."""

    def __init__(self, mode: str | None = None) -> None:
        self.mode = mode
        self._fns: dict[int, Callable] = {}
        self._failures: dict[int, int] = {}
        #: why packs run eagerly (pack id -> reason), for ``get_optimization_info`` and tests
        self.eager_reasons: dict[int, str] = {}
        self._logged: set[str] = set()

    def _fn(self, pack: "Pack") -> Callable:
        fn = self._fns.get(id(pack))
        if fn is None:
            fn = self._fns[id(pack)] = torch.compile(_own_copy(_chain_compiled, f"pack{len(self._fns)}"),
                                                     dynamic=None, fullgraph=True, mode=self.mode)
        return fn

    def forget(self) -> None:
        """Drop every pack's graphs (packs were planned again)."""
        self._fns.clear()
        self._failures.clear()
        self.eager_reasons.clear()

    def run(self, opt: "HinaOptimizer", pack: "Pack", ctx: "StepContext", techniques: list["Technique"],
            present: torch.Tensor | None) -> None:
        key = id(pack)
        # under a TorchDispatchMode (an op counter, FakeTensor tracing) dynamo compiles nothing: such a caller wants
        # to see the ops, so the step runs eagerly for this call
        if key not in self.eager_reasons and _get_current_dispatch_mode() is None:
            pack.segment_ids()  # made here: made in the graph, it would be a change of state the next call recompiles for
            ctx.gather_params32()  # the new values are computed in the gathered buffer (see StepContext.write_params)
            if pack.low_precision:
                ctx.new_buffer = opt._scratch("p_new", pack)
            u_buffer = ctx.u_buffer
            try:
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    self._fn(pack)(opt, ctx, techniques, present)
                ctx.compiling = False
                return
            except compile_errors() as error:
                ctx.compiling = False
                ctx.pending = None
                ctx.u_buffer = u_buffer
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                if failures >= ATTEMPTS:
                    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                    self.eager_reasons[key] = reason
                    if reason not in self._logged:
                        self._logged.add(reason)
                        logger.warning("%s: compile=True, but this pack's step could not be compiled, so it runs eagerly "
                                       "(%s)", opt.NAME, reason[:400])
        run_chain(opt, ctx, techniques, present)


def summary(steps: Any) -> dict[str, Any]:
    """What ``get_optimization_info`` reports about compiling."""
    if steps is None:
        return {"compiled": False}
    return {"compiled": True, "packs_eager": len(steps.eager_reasons), "eager_reasons": sorted(set(steps.eager_reasons.values()))}
