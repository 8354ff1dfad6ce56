"""What a technique declares: its arguments, its state slots, the stage it runs in, and its tensor code.

A named optimizer is an ordered tuple of techniques (see ``optimizers/``). At every step, for every pack
of same-device, same-dtype tensors (see ``engine/pack.py``), the engine calls each enabled technique's
``run(ctx)`` in the declared order. Stages make the order checkable: a technique may only follow
techniques of the same or an earlier stage.

Stages, in order:

``grad``       transform the raw gradient ``ctx.g`` (OrthoGrad, AGR, ...)
``moments``    update running statistics from ``ctx.g`` (Adam moments, CAME factors, ...)
``direction``  write the update direction into ``ctx.u`` (Adam normalization, Grams, Cautious, SinkGD, ...)
``scale``      per-element learning-rate multipliers into ``ctx.lr_scale`` (lr masks, LoRA+ ratios, ...)
``apply``      how the parameter changes (decoupled weight decay, the step itself); exactly one
               technique of the optimizer owns the final write (``writes_params = True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

from ..config import Field

if TYPE_CHECKING:  # pragma: no cover
    from .context import StepContext

STAGES = ("grad", "moments", "direction", "scale", "apply")


@dataclass(frozen=True)
class Slot:
    """A per-parameter state tensor, stored flat per pack and exposed as ``state[p][name]``.

    ``quantizable``: stored blockwise 8-bit (``name.q`` uint8 codes + ``name.absmax`` fp32) when the pack
    uses 8-bit state; ``signed`` picks the quantization map. ``dtype`` ``"fp32"`` keeps full precision,
    ``"param"`` uses the parameter's dtype (e.g. a Kahan compensation buffer). ``low_precision_only``
    allocates the slot only for packs of bf16/fp16 parameters.

    ``layout`` ``"elem"`` is one value per element; ``"rows"`` / ``"cols"`` one value per row / column of each
    tensor viewed as a matrix ``(shape[0], prod(rest))`` (factored statistics, Adafactor/CAME); ``"bits"`` one
    bit per element, packed eight to a uint8 (8-bit packs only: their segments are multiples of 256).
    """

    name: str
    quantizable: bool = False
    signed: bool = True
    #: storage dtype: "fp32", "param" (the parameter's), "bf16" (read as fp32 on first use and written back with
    #: unbiased stochastic rounding when a technique called ``ctx.touch(name)``), "int8", "int16", "uint8" (used as stored)
    dtype: str = "fp32"
    low_precision_only: bool = False
    #: one value per tensor instead of one per element (e.g. TAM's cosine EMA)
    per_tensor: bool = False
    #: initial value: "zeros", "ones", or "param" (a copy of the parameter when state is created, e.g. SPD anchors)
    init: str = "zeros"
    layout: str = "elem"


class Technique:
    """Base class. Subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    fields: ClassVar[tuple[Field, ...]] = ()
    slots: ClassVar[tuple[Slot, ...]] = ()
    writes_params: ClassVar[bool] = False
    #: whether the technique depends on LoRA/LoKr roles (then missing parameter names are reported)
    uses_roles: ClassVar[bool] = False
    #: one-line description and paper, shown by ``sd-hina show`` and get_optimization_info()
    summary: ClassVar[str] = ""
    #: per-row / per-column factors the technique broadcasts in a compiled step (``Pack.spread_rows`` /
    #: ``Pack.spread_cols``): ``"rows"``, ``"cols"``; their index tensors are built before the graph
    spreads: ClassVar[tuple[str, ...]] = ()

    #: whether the technique computes statistics over the tensors of several param groups (importance, C-Optim's
    #: context): then stepping groups one at a time (DeepSpeed) or on separate ranks gives a nearby, not the same,
    #: result (see docs/multi_gpu.md)
    spans_groups: ClassVar[bool] = False

    #: an optional bool field that switches the technique on (or off, with ``switch_on=False``)
    switch: Field | None = None
    switch_on: bool = True

    def __init__(self, switch: Field | None = None, switch_on: bool = True):
        self.switch, self.switch_on = switch, switch_on

    def enabled(self, hp: Any) -> bool:
        """Whether this technique runs for a param group ``hp`` (its ``switch`` field, if it has one)."""
        return self.switch is None or bool(hp[self.switch.name]) == self.switch_on

    def note(self, hp: Any) -> str | None:
        """A message explaining why a switched-on technique is inactive in this combination (or ``None``)."""
        return None

    def layout_note(self, opt: Any, hp: Any) -> str | None:
        """Like :meth:`note`, for reasons that depend on the optimizer's parameters (names, LoRA roles, groups)."""
        return None

    def all_fields(self) -> tuple[Field, ...]:
        return self.fields + ((self.switch,) if self.switch is not None else ())

    def prepare(self, opt: Any) -> None:
        """Called once per ``step()`` before any pack runs, for work that spans packs (e.g. LoRA pairs
        whose halves live in different param groups). Results go in ``opt.step_cache``."""

    def finish(self, opt: Any) -> None:
        """Called once per iteration after every pack ran (e.g. to fold per-pack sums into global statistics): at the
        end of each ``step()``, or, under an engine that steps one group per call (DeepSpeed), of the call that
        completes the iteration (see ``engine/distributed.py``: ``Iteration``)."""

    def slots_for(self, hp: Any, pack: Any) -> tuple[Slot, ...]:
        """The slots this technique needs for a pack (bf16/fp16-only slots only for low-precision packs)."""
        return tuple(s for s in self.slots if pack.low_precision or not s.low_precision_only)

    def pack_tag(self, opt: Any, hp: Any, p: Any) -> Any:
        """A value that must be equal for parameters sharing a pack (``None``: no constraint)."""
        return None

    def scalars(self, hp: Any, step: int) -> dict[str, float | bool | None] | None:
        """Host numbers ``run`` needs that follow the step count (bias corrections, warm-up ramps), computed before
        the chain runs and read in ``run`` as ``ctx.scalars[self.name]``. A compiled step receives the floats as 0-d
        tensors (inputs of the graph), so ``run`` must not branch on them: a phase test goes in as a bool beside them
        (``{"ratio": r, "relaxed": step > T}``), which stays a host value. Computed inside the graph from the
        symbolic step, a ``pow`` or ``sqrt`` of the step would be evaluated again for every element of the pack
        (the C++ compiler may not hoist libm calls out of the loop)."""
        return None

    def before_graph(self, ctx: "StepContext") -> None:
        """Called eagerly before a compiled chain runs (``compile=True``), for inputs the graph should receive as
        one flat tensor rather than build from per-tensor lists (kept in ``ctx.inputs[self.name]``), and for what
        ``run`` derives once per pack (``Pack.derive``): made inside the graph, a new key is a change of state that
        makes the next step compile again."""

    def run(self, ctx: "StepContext") -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def skipped(self, ctx: "StepContext") -> None:
        """Called instead of :meth:`run` when an earlier technique ended the step (``ctx.done``: ADOPT's and
        CAME's first step only initialise), for techniques that must still observe the gradient (the lr mask
        records its signs, so that the second step can compare against them)."""


def validate_techniques(name: str, techniques: Iterable[Technique]) -> None:
    """Techniques must come in stage order and exactly one of them writes the parameters."""
    last = 0
    writers = 0
    for tech in techniques:
        if tech.stage not in STAGES:
            raise ValueError(f"{name}: technique {tech.name!r} has unknown stage {tech.stage!r}")
        index = STAGES.index(tech.stage)
        if index < last:
            raise ValueError(f"{name}: technique {tech.name!r} (stage {tech.stage}) comes after a later stage")
        last = index
        writers += tech.writes_params
    if writers != 1:
        raise ValueError(f"{name}: exactly one technique must write the parameters, found {writers}")
