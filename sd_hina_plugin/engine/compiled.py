"""The compiled step (``compile=True``): each pack's technique chain as one ``torch.compile`` graph.

A pack's step has three parts (``HinaOptimizer._run``):

1. eager: gather the gradients into the flat buffer ``g`` (one ``_foreach_copy_``), dequantize 8-bit state, and
   (compiled only) gather the parameters into a flat fp32 buffer;
2. :func:`run_chain`: the non-finite screen and every technique of the group, on flat buffers only;
3. eager: the parameter write (``StepContext.commit``: one ``_foreach_copy_`` of the new values, or the
   stochastic rounding with its generator for bf16) and the 8-bit requantization (bitsandbytes' kernels).

With ``compile=True`` part 2 is compiled by ``torch.compile`` (inductor: C++ on CPU, Triton on CUDA), so its 10 to
40 passes over the pack's buffers become one or a few fused loops. What keeps it to one graph per phase:

* the graph takes the pack's flat buffers, never per-tensor lists (what needs them stays in parts 1 and 3), so
  its size and its guards do not grow with the number of tensors; per-tensor, per-row and per-column factors
  are broadcast to the elements by ``Pack.spread`` / ``spread_rows`` / ``spread_cols`` (views, or a gather
  where the pack's layout allows no view), never written into slices of a flat buffer bucket by bucket (each
  such write becomes a mask over the whole buffer in the generated loop);
* numbers that follow the step (bias corrections, ramps, the delayed decay) are computed on the host before the
  chain (``Technique.scalars``) and enter, like the lr, as 0-d fp32 CPU tensors (:func:`_as_inputs`), and the
  step count as a symbolic int (``STEP_SOURCE``): inputs from the first compile on, so a scheduler or a new
  step compiles nothing. A technique's phase test is a host bool or a comparison of the step
  (``step <= warmup_steps``), which dynamo guards: each phase gets its own graph when it is first reached.
  Shapes stay static: every pack has its own cache (a copy of the function's code object), so kernels are
  specialised to the pack's layout and dynamo's recompile limit counts the phases of one pack, not packs times
  phases;
* work buffers are made inside the graph and dropped from the context at its end, so they are fused away
  instead of being written back to memory no one reads; int16 state (which inductor's CPU code does not
  vectorize) enters as an int32 copy (``HinaOptimizer._run``).

A pack's first step always runs eagerly: it builds the pack's caches (index tensors, masks uploaded once) and is
a phase of one step for several techniques (ADOPT's and CAME's initialisation), which a graph would cost
seconds to compile for nothing.

Where no compiler works (no C++ toolchain on CPU, no Triton on CUDA, an op dynamo cannot capture, the recompile
limit reached), the pack's step falls back to eager with one log line saying why. ``fullgraph=True`` captures all
of part 2 before anything runs, so a failed compile has changed no state and the eager chain runs the same
step instead. Under a ``TorchDispatchMode`` (an op counter, FakeTensor) the step runs eagerly too.
"""

from __future__ import annotations

import hashlib
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


def _layout_tag(opt: "HinaOptimizer", pack: "Pack") -> str:
    """A name for a pack's code object that is the same for the same optimizer and pack layout, in any process,
    and differs otherwise. Dynamo keeps what it learnt about a function (which inputs vary: the "automatic
    dynamic" state, also saved on disk for later runs) by file, line and name: with one name for the packs of
    different layouts, a pack would start with the sizes of another marked dynamic, which compiles slow kernels."""
    layout = (opt.NAME, str(pack.dtype), pack.quantized, pack.tags, tuple((b.shape, b.count, b.seg) for b in pack.buckets))
    return f"{opt.NAME}_{hashlib.sha1(repr(layout).encode()).hexdigest()[:16]}"


def _chain_compiled(opt: "HinaOptimizer", ctx: "StepContext", techniques: list["Technique"],
                    present: torch.Tensor | None) -> None:
    ctx.compiling = True
    ctx._local = {}  # made inside the graph: its buffers need not outlive it (a dict from outside would be replayed)
    # the update direction too: the pool's buffer is an input, which the graph would write back (a pass nobody reads)
    pool_u, ctx.u_buffer = ctx.u_buffer, ctx.local("u")
    run_chain(opt, ctx, techniques, present)
    ctx.u_buffer = pool_u
    # a tensor still referenced from ctx when the graph ends becomes a graph output, which must be materialized
    # in memory of its own: drop the references to work buffers no one reads after the chain (what the write
    # needs is in ctx.pending, bf16 state to round back in ctx._states)
    ctx.g = ctx.m_in = ctx.lr_scale = None
    ctx._local = {}
    # likewise a symbolic float left on ctx (the lr times a bias correction) would be returned to Python, which
    # makes dynamo specialize it: a graph per value
    ctx.step_scale = ctx.decay = 1.0
    ctx.wd_ratio = None


#: dynamo's name for the step count the chain reads: an int that changes every step, compiled as a symbolic input
#: from the first graph on (without it, dynamo would compile a graph for the first value and then a general one)
STEP_SOURCE = "L['ctx'].step"


def _as_inputs(ctx: "StepContext") -> None:
    """The numbers that change from step to step, as 0-d fp32 CPU tensors: the lr and the techniques' step scalars
    (``Technique.scalars``; bools, phase flags, stay host values: each phase is a graph of its own). Dynamo makes
    tensors inputs of the graph from the first compile on, where a Python float is first compiled as a constant
    and only after it changed as an input: a graph compiled for nothing, half of a pack's compile time. On CUDA
    they stay on the host too (no copy to the device). fp32, not float64: dynamo turns a 0-d float64 CPU tensor
    into a symbolic float and guards it with an ``item()`` call per step; the step's arithmetic is fp32 anyway."""
    dtype = torch.float64 if ctx.pack.dtype == torch.float64 else torch.float32  # (float64 weights: float64 factors)
    ctx.lr = torch.tensor(float(ctx.lr), dtype=dtype)
    for values in ctx.scalars.values():
        for key, value in values.items():
            if isinstance(value, float):
                values[key] = torch.tensor(value, dtype=dtype)


def compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this could not be compiled" (raised before the graph runs), as opposed to errors
    of the step itself (out of memory, a wrong dtype), which propagate."""
    from torch._dynamo import exc

    # (a missing C++ compiler or Triton surfaces as BackendCompilerFailed; errors raised while the compiled graph
    # runs are not caught: the graph may have changed state by then, and running the step again would be wrong)
    return (exc.TorchDynamoException, exc.FailOnRecompileLimitHit)


def _reason(error: BaseException) -> str:
    """One line naming why compiling failed: the compiler's own error where dynamo wraps it."""
    inner = getattr(error, "inner_exception", None) or error.__cause__ or error
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[0] if lines else type(error).__name__}"


class CompiledSteps:
    """Per-pack compiled chains of one optimizer."""

    def __init__(self, mode: str | None = None, backend: Any = "inductor") -> None:
        self.mode = mode
        self.backend = backend
        self._fns: dict[int, Callable] = {}
        self._codes: dict[int, Any] = {}
        self._failures: dict[int, int] = {}
        #: why packs run eagerly (pack id -> reason), for ``get_optimization_info`` and tests
        self.eager_reasons: dict[int, str] = {}
        self._logged: set[str] = set()

    def _fn(self, pack: "Pack", opt: "HinaOptimizer") -> Callable:
        fn = self._fns.get(id(pack))
        if fn is None:
            own = _own_copy(_chain_compiled, _layout_tag(opt, pack))
            fn = self._fns[id(pack)] = torch.compile(own, fullgraph=True, mode=self.mode, backend=self.backend)
            self._codes[id(pack)] = own.__code__
        return fn

    def graphs(self) -> dict[int, int]:
        """Compiled graphs per pack (pack id -> count), from dynamo's cache of each pack's code object."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return {key: len(_debug_get_cache_entry_list(code)) for key, code in self._codes.items()}

    def forget(self) -> None:
        """Drop every pack's graphs (packs were planned again)."""
        self._fns.clear()
        self._codes.clear()
        self._failures.clear()
        self.eager_reasons.clear()

    def run(self, opt: "HinaOptimizer", pack: "Pack", ctx: "StepContext", techniques: list["Technique"],
            present: torch.Tensor | None) -> None:
        key = id(pack)
        if pack.mesh is not None and key not in self.eager_reasons:
            # a step over shards sums across ranks inside the chain (engine/sharding.py); such collectives in a graph
            # are not supported here yet
            reason = "tensors sharded between ranks (FSDP2): the step's reductions across ranks run eagerly"
            self.eager_reasons[key] = reason
            if reason not in self._logged:
                self._logged.add(reason)
                logger.info("%s: compile=True: %s", opt.NAME, reason)
        # under a TorchDispatchMode (an op counter, FakeTensor tracing) dynamo compiles nothing: such a caller wants
        # to see the ops, so the step runs eagerly for this call
        if key not in self.eager_reasons and _get_current_dispatch_mode() is None:
            pack.index_tensors({kind for tech in techniques for kind in tech.spreads})
            for tech in techniques:
                tech.before_graph(ctx)
            ctx.params32()  # gathered here, outside the graph; the new values are computed in the gathered buffer (see StepContext.write_params)
            ctx.read_states()  # bf16 state read into fp32 here: the pool's buffers for it made in the graph would be a change of state
            if pack.low_precision:
                ctx.new_buffer = opt._scratch("p_new", pack)
            _as_inputs(ctx)
            try:
                # (our gathers index with tensors built from the pack's layout, always in range: inductor's per-element
                # bounds check made them 1.2x slower on CPU)
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT), \
                        torch.compiler.config.patch(dynamic_sources=STEP_SOURCE), \
                        torch._inductor.config.patch(assert_indirect_indexing=False):
                    self._fn(pack, opt)(opt, ctx, techniques, present)
                ctx.compiling = False
                return
            except compile_errors() as error:
                ctx.compiling = False
                ctx.pending = None
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                if failures >= ATTEMPTS:
                    reason = _reason(error)
                    self.eager_reasons[key] = reason
                    if reason not in self._logged:
                        self._logged.add(reason)
                        logger.warning("%s: compile=True, but this pack's step could not be compiled, so it runs eagerly "
                                       "(%s)", opt.NAME, reason[:400])
        run_chain(opt, ctx, techniques, present)


def summary(steps: "CompiledSteps | None") -> dict[str, Any]:
    """What ``get_optimization_info()["compile"]`` reports: packs compiled, their graphs, and why any runs eagerly."""
    if steps is None:
        return {"packs": 0, "graphs": 0, "eager": []}
    graphs = steps.graphs()
    return {"packs": len(graphs), "graphs": sum(graphs.values()), "eager": sorted(set(steps.eager_reasons.values()))}
