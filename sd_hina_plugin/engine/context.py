"""The per-pack, per-step view techniques work on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from ..numerics.rounding import kahan_add_, stochastic_round_
from .pack import join

if TYPE_CHECKING:  # pragma: no cover
    from .base import HinaOptimizer
    from .pack import Bucket, Pack


class StepContext:
    """Flat fp32 tensors of one pack for one step.

    ``g``            the gathered gradient (fp32, flat, padding zero)
    ``u``            the update direction techniques build (fp32, flat scratch); ``set_u(src)`` makes it a
                     copy of ``src`` made on first use, so a technique that reads ``src`` anyway can write
                     ``u_buffer`` directly (``take_u_source``) and save the copy pass
    ``state(name)``  a state slot as an fp32 flat tensor (dequantized for 8-bit packs, written back after)
    ``lr``           the group's learning rate as set by the scheduler (``group["lr"]``)
    ``step``         the group's step count, starting at 1 (host int: phase switches cost no sync)
    ``hp``           the param group dict (hyperparameters, possibly overridden per group)
    ``step_scale``   a host multiplier on ``lr`` (e.g. Adam's bias correction)
    ``lr_scale``     optional flat per-element multiplier on the update (lr masks, LoRA+ ratios)
    """

    def __init__(self, opt: "HinaOptimizer", pack: "Pack", group: dict[str, Any], g: torch.Tensor,
                 states: dict[str, torch.Tensor]):
        self.opt = opt
        self.pack = pack
        self.hp = group
        self.lr = group["lr"]
        self.step: int = group["step"]
        self.g = g
        self._states = states
        #: the update direction's buffer; read it through ``u`` (which first fills it from a pending source)
        self.u_buffer: torch.Tensor = opt._scratch("u", pack)
        self._u_source: torch.Tensor | None = None
        #: what the first moment accumulates (ADOPT normalizes it, TAM weights it); the gradient by default
        self.m_in: torch.Tensor = g
        self.step_scale = 1.0
        self.lr_scale: torch.Tensor | None = None
        #: parameter decay factor: a float, or a per-tensor device vector
        self.decay: float | torch.Tensor = 1.0
        #: new parameter values computed in flat form (e.g. by SPD); the writer copies them instead
        self.new_params: torch.Tensor | None = None
        #: set by a technique to end this step for the pack (e.g. ADOPT's initialising first step)
        self.done = False
        #: 1.0 for tensors whose gradient is finite, 0.0 for those skipped this step (set by the engine)
        self.keep: torch.Tensor | None = None
        #: how many tensors were skipped this step (a 0-d device tensor, set by the engine's screen)
        self.nonfinite: torch.Tensor | None = None
        self._p32: torch.Tensor | None = None
        #: bf16 slots changed this step (techniques call ``touch``)
        self.dirty: set[str] = set()
        #: the step's techniques run inside ``torch.compile`` (see ``engine/compiled.py``): no value-dependent
        #: host branches, and the parameter write waits for :meth:`commit`
        self.compiling = False
        #: the parameter write prepared by :meth:`write_params`, done by :meth:`commit`
        self.pending: tuple | None = None
        #: per-step host scalars of the techniques (``Technique.scalars``), by technique name; computed before
        #: the chain runs, so that a compiled step receives them as inputs (see ``engine/compiled.py``)
        self.scalars: dict[str, dict[str, float]] = {}
        #: flat tensors techniques prepared eagerly for a compiled chain (``Technique.before_graph``), by name
        self.inputs: dict[str, torch.Tensor] = {}
        #: adapter factors' weight-decay ratio this step (DynamicWeightDecay), None when it is 1
        self.wd_ratio: float | None = None
        #: compiled bf16/fp16 step: the pool buffer the new fp32 values are computed in (an input of the graph)
        self.new_buffer: torch.Tensor | None = None
        self._local: dict[tuple, torch.Tensor] = {}

    @property
    def u(self) -> torch.Tensor:
        if self._u_source is not None:
            self.u_buffer.copy_(self._u_source)
            self._u_source = None
        return self.u_buffer

    def set_u(self, source: torch.Tensor) -> None:
        """``u = source`` (e.g. ADOPT's ``u = m``), copied only when ``u`` is next read."""
        self._u_source = source

    def take_u_source(self) -> torch.Tensor | None:
        """The pending source of ``u`` if ``set_u`` was called and ``u`` not read since (the caller must then
        write all of ``u_buffer`` itself), else None (``u`` holds the direction)."""
        source, self._u_source = self._u_source, None
        return source

    @property
    def buckets(self) -> list["Bucket"]:
        return self.pack.buckets

    def state(self, name: str) -> torch.Tensor:
        value = self._states[name]
        if callable(value):  # a bf16 slot, read into fp32 on first use (see HinaOptimizer._run)
            value = self._states[name] = value()
        return value

    def read_states(self) -> None:
        """Read every bf16 slot into fp32 now (they are otherwise read on first use)."""
        for name in list(self._states):
            self.state(name)

    @property
    def count_dtype(self) -> torch.dtype:
        """The integer dtype for lattice counts (the lr masks' ``j``): int16 as stored, int32 in a compiled step
        (inductor's CPU vectorizer has no int16; int16 slots enter the graph widened, see ``HinaOptimizer._run``)."""
        return torch.int32 if self.compiling else torch.int16

    def touch(self, name: str) -> None:
        """Mark a bf16 slot as changed this step: it is written back (stochastically rounded) after the step; also an
        int16 slot in a compiled step (written back from its int32 copy)."""
        self.dirty.add(name)

    def scratch(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A flat work buffer of this pack's size kept under ``name``: for values that outlive the technique
        that makes them (``m_in``, ``new_params``, ``params32``). Its contents are not kept between steps."""
        if self.compiling:
            return self.local(name, dtype)
        return self.opt._scratch(name, self.pack, dtype)

    def local(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """In a compiled step, work buffers are made inside the graph (one per name and dtype per step), not taken
        from the pool: a pool buffer is an input the graph would have to write back, a pass over memory that no
        one reads, while a buffer made inside it is fused away."""
        key = (name, dtype)
        buf = self._local.get(key)
        if buf is None:
            buf = self._local[key] = torch.empty(self.pack.total, dtype=dtype, device=self.pack.device)
        return buf

    def temp(self, index: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Transient work buffer ``index`` (0 or 1) of ``dtype``: valid only until the calling technique's
        ``run`` returns, because every technique shares it. Sharing keeps a step's working set small: with
        one buffer per technique, the CameAMP step touched ~12 fp32 buffers of 4 MB per CPU pack, more than
        a 32 MB L3 holds, and each pass evicted what the next one read (sharing took ~10% off that step)."""
        if index not in (0, 1):
            raise ValueError(f"temp index must be 0 or 1, got {index}")
        return self.scratch(f"temp{index}", dtype)

    # -- reductions over tensors, rows and columns: every one a technique needs goes through these, so that for
    # tensors sharded between ranks (engine/sharding.py) each is summed across the ranks, one collective per call
    # and pack; ops grow with the number of shapes, not of tensors ------------------------------------------
    def _per_tensor(self, reduce, buckets: list | None = None) -> torch.Tensor:
        """``reduce(bucket)`` -> one value per tensor of the bucket; concatenated in pack order (of ``buckets`` only,
        if given)."""
        parts = [reduce(b) for b in (self.pack.buckets if buckets is None else buckets)]
        return join(parts)

    def tensor_reductions(self, *terms: tuple, buckets: list | None = None) -> list[torch.Tensor]:
        """Several per-tensor reductions of flat buffers at once, each ``(n_params,)`` in pack order (or, given
        ``buckets``, one value per tensor of those buckets, in their order): a term is ``("sum", x)``,
        ``("dot", x, y)`` or ``("norm", x)``. For sharded tensors, one collective for all of them."""
        sharded = self.pack.mesh is not None
        parts = []
        for kind, x, *rest in terms:
            if kind == "sum":
                parts.append(self._per_tensor(lambda b: b.rows(x).sum(1), buckets))
            elif kind == "dot":
                # a batched (1 x n) @ (n x 1) product, the second operand a transposed view: BLAS' fast path (2.5x a
                # multiply-then-sum and 6x a contiguous (k, n, 1) operand on CPU), no temporary
                y = rest[0]
                parts.append(self._per_tensor(
                    lambda b: torch.bmm(b.rows(x).unsqueeze(1), b.rows(y).unsqueeze(1).transpose(1, 2)).view(-1), buckets))
            elif kind == "norm":  # (sharded: the squares summed across ranks, the root after)
                parts.append(self._per_tensor(lambda b: torch.linalg.vector_norm(b.rows(x), dim=1), buckets))
                if sharded:
                    parts[-1] = parts[-1].square_()
            else:
                raise ValueError(f"unknown reduction {kind!r}")
        if sharded:
            parts = self.pack.sum_all_(parts)
            parts = [p.sqrt_() if term[0] == "norm" else p for p, term in zip(parts, terms)]
        return parts

    def total_dots(self, *pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``sum(x * y)`` over the pack's elements for each ``(x, y)`` of flat buffers: ``(len(pairs),)``, for sums over
        all tensors that the engine completes across ranks (``opt.add_step_sum``). A tensor held whole by several
        ranks (a DeepSpeed replica) is left out on all but one of them, so that it counts once."""
        counted = self.opt.counted_weights(self.pack)
        if counted is None:
            return torch.stack([torch.dot(x, y) for x, y in pairs])
        return torch.stack(self.tensor_reductions(*(("dot", x, y) for x, y in pairs))) @ counted

    def tensor_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of each tensor's elements of flat ``x``: shape ``(n_params,)`` in pack order."""
        return self.tensor_reductions(("sum", x))[0]

    def tensor_dot(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-tensor inner products of flat ``x`` and ``y``."""
        return self.tensor_reductions(("dot", x, y))[0]

    def tensor_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.tensor_reductions(("norm", x))[0]

    def param_norms(self) -> torch.Tensor:
        """Per-tensor norms of the parameters themselves (fp32)."""
        if self.compiling or self.pack.mesh is not None:  # (compiled: the gathered flat weights, one graph input)
            return self.tensor_norm(self.params32())
        return torch.stack(torch._foreach_norm(self.pack.params)).float()

    def row_means(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of each row of each tensor of flat ``x`` viewed as a matrix ``(shape[0], prod(rest))``: a "rows"
        buffer (rows are never split between ranks)."""
        return join([b.matrix(x).mean(dim=-1).reshape(-1) for b in self.pack.buckets])

    def col_means(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of each column of each tensor of flat ``x`` viewed as a matrix, over all its rows: a "cols" buffer."""
        return join([mean.reshape(-1) for mean in self._means_over_rows(lambda b: b.matrix(x), dim=1)])

    def _means_over_rows(self, view: Callable[[Any], torch.Tensor], dim: int, keepdim: bool = False) -> list[torch.Tensor]:
        """Per bucket, the mean of ``view(bucket)`` over ``dim``, the dimension of a tensor's rows: over all of each
        tensor's rows when the pack is sharded (sums completed in one collective, divided by the whole row count)."""
        buckets = self.pack.buckets
        if self.pack.mesh is None:
            return [view(b).mean(dim=dim, keepdim=keepdim) for b in buckets]
        sums = self.pack.sum_all_([view(b).sum(dim=dim, keepdim=keepdim) for b in buckets])
        return [part.div_(b.full_rows) for part, b in zip(sums, buckets)]

    def across_rows_(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-bucket sums over rows (column sums, ``(count, 1, cols)``, or per-tensor sums) made from this rank's
        rows, completed over all the rows of each tensor (one collective for all of ``parts``); in place."""
        return self.pack.sum_all_(parts)

    def factored_means(self, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column means of flat ``x`` plus ``eps``: a "rows" and a "cols" buffer (Adafactor/CAME)."""
        return self.row_means(x).add_(eps), self.col_means(x).add_(eps)

    def factored_roots(self, r: torch.Tensor, c: torch.Tensor, scale: float = 1.0,
                       inverse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """From a "rows" buffer ``r`` and a "cols" buffer ``c`` of factored statistics: row and column factors whose
        outer product is ``sqrt(scale * r_i c_j / mean(r))`` per tensor (mean over the tensor's rows), or its
        reciprocal with ``inverse``, as a "rows" and a "cols" buffer."""
        means = self._means_over_rows(lambda b: b.row_stats(r), dim=-1, keepdim=True)
        rows = join([(b.row_stats(r) / mean).mul_(scale).reshape(-1) for b, mean in zip(self.pack.buckets, means)])
        return (rows.rsqrt_(), c.rsqrt()) if inverse else (rows.sqrt_(), c.sqrt())

    def outer_(self, out: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``out = rows_i * cols_j`` (times ``x`` elementwise, if given) for every tensor viewed as a matrix, from a
        "rows" and a "cols" buffer; padding of 8-bit packs is left as it was (eager) or set (compiled)."""
        if self.compiling:
            spread = self.pack.spread_rows(rows)
            if x is not None:
                return torch.mul(x, spread, out=out).mul_(self.pack.spread_cols(cols))
            return torch.mul(spread, self.pack.spread_cols(cols), out=out)
        for b in self.pack.buckets:
            r, c = b.row_stats(rows).unsqueeze(-1), b.col_stats(cols).unsqueeze(1)
            if x is not None:
                torch.mul(b.matrix(x), r, out=b.matrix(out)).mul_(c)
            else:
                torch.mul(r, c, out=b.matrix(out))
        return out

    def tensor_scale_(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Multiply each tensor's elements of flat ``x`` by its entry of ``scale`` (n_params,), in place."""
        if self.compiling:
            return x.mul_(self.pack.spread(scale))
        for b in self.pack.buckets:
            b.rows(x).mul_(scale[b.first:b.first + b.count].unsqueeze(1))
        return x

    def tensor_axpy_(self, y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``y += scale_i * x`` per tensor i (flat buffers, one pass), in place; returns ``y``."""
        if self.compiling:
            return y.addcmul_(x, self.pack.spread(scale))
        for b in self.pack.buckets:
            b.rows(y).addcmul_(b.rows(x), scale[b.first:b.first + b.count].unsqueeze(1))
        return y

    def numels(self) -> torch.Tensor:
        """Element count of each (whole) tensor, ``(n_params,)`` fp32, on the device (see :meth:`Pack.numels`)."""
        return self.pack.numels()

    def moment_input(self) -> torch.Tensor:
        """The buffer a moments-stage technique writes ``m_in`` into (ADOPT's normalised gradient, CAME's
        normalised update, TAM's weighted copy of the gradient): ``u_buffer``, which nothing reads before the
        direction stage. A direction-stage technique that reads ``m_in`` must do so before it writes ``u``
        (CAME's confidence does). One 4 MB buffer less in a CPU pack's working set."""
        return self.u_buffer

    def params32(self) -> torch.Tensor:
        """The pack's current parameter values as a flat fp32 buffer (gathered once per step, padding zero)."""
        if self._p32 is None:
            if self.compiling:
                # a compiled step's graph takes flat buffers only: CompiledSteps.run gathers them before it
                raise RuntimeError("params32() in a compiled step after release_params32(): nothing to gather from")
            p32 = self.scratch("p32")
            torch._foreach_copy_(self.pack.views(p32), self.pack.params)
            if self.pack.pad_index is not None:
                p32.index_fill_(0, self.pack.pad_index, 0.0)
            self._p32 = p32
        return self._p32

    def release_params32(self) -> torch.Tensor:
        """``params32()`` handed over to the caller, who may overwrite it (SPD computes the new values in it);
        a later ``params32()`` gathers the parameters again."""
        p32, self._p32 = self.params32(), None
        return p32

    def effective_decay(self) -> float | torch.Tensor:
        """``self.decay`` as applied: a float, or a per-tensor vector in which skipped tensors (non-finite
        gradient) keep 1.0."""
        decay = self.decay
        if not self.compiling and not isinstance(decay, torch.Tensor) and decay == 1.0:
            return 1.0  # (compiled: no branch on a value that follows the lr, which would be a graph per value)
        if self.keep is None:
            return decay
        keep = self.keep.double() if self.pack.dtype == torch.float64 else self.keep  # float64 weights: factors in float64
        return keep * (decay - 1.0) + 1.0

    def decay_flat_(self, x: torch.Tensor, decay: float | torch.Tensor | None = None) -> torch.Tensor:
        """Apply the decay (float or per tensor; ``effective_decay()`` unless given) to flat ``x`` in place."""
        decay = self.effective_decay() if decay is None else decay
        if isinstance(decay, torch.Tensor) and decay.dim():
            return self.tensor_scale_(x, decay)
        if isinstance(decay, torch.Tensor):  # one factor for the pack, as a 0-d tensor in a compiled step
            return x.mul_(decay)
        return x.mul_(decay) if decay != 1.0 else x

    # -- the one place parameters are written -----------------------------------------------------------
    def write_params(self, direction: torch.Tensor | None, alpha: float) -> None:
        """``p <- p * decay + alpha * direction`` for every parameter of the pack, or ``p <- new_params``
        when a technique computed the new values in flat form.

        fp32 parameters are updated in place with foreach ops. bf16/fp16 parameters are computed in fp32 and
        written back by the group's ``low_precision_update`` rule: unbiased stochastic rounding, Kahan
        compensation (slot ``kahan_comp``) or plain round-to-nearest.

        In a compiled step (``compiling``) only the flat arithmetic happens here; what touches the parameters
        one by one (foreach ops, the rounding's random bits) is kept in ``pending`` and done by :meth:`commit`
        after the compiled part returns, so that the compiled graph takes flat buffers only and its size does
        not grow with the number of tensors. There the parameters were gathered before the graph and the new
        values are computed in the gathered buffer (fp32) or in ``new_buffer`` (bf16/fp16): the write is then one
        copy per parameter, where the eager fp32 write is a multiply and an add over every parameter.
        """
        pack = self.pack
        if self.compiling and not pack.low_precision:
            new = self.new_params
            if new is None:
                # (alpha as a factor: as add_'s keyword, a symbolic float is specialized, a graph per value)
                new = self.decay_flat_(self.params32()).add_(direction * alpha)
            self.pending = ("copy", new)
        elif not pack.low_precision:
            if self.new_params is not None:
                self.pending = ("copy", self.new_params)
            else:
                self.pending = ("axpy", direction, self.effective_decay(), alpha)
        else:
            p32 = self.params32()
            if self.new_params is None:
                new = self.new_buffer if self.compiling else self.temp(0)
                new.copy_(p32)
                if self.compiling:
                    self.decay_flat_(new).add_(direction * alpha)
                else:
                    self.decay_flat_(new).add_(direction, alpha=alpha)
            else:
                new = self.new_params
            self.pending = ("round", new, p32)
        if not self.compiling:
            self.commit()

    def commit(self) -> None:
        """Write what :meth:`write_params` prepared into the parameters."""
        if self.pending is None:
            return
        pack = self.pack
        params = pack.params
        kind, *args = self.pending
        self.pending = None
        if kind == "copy":
            torch._foreach_copy_(params, pack.views(args[0]))
            return
        if kind == "axpy":
            direction, decay, alpha = args
            if isinstance(decay, torch.Tensor):
                torch._foreach_mul_(params, list(decay.unbind(0)))
            elif decay != 1.0:
                torch._foreach_mul_(params, decay)
            torch._foreach_add_(params, pack.views(direction), alpha=alpha)
            return
        new, p32 = args
        rule = self.hp.get("low_precision_update", "stochastic")
        low = self.scratch("p_low", pack.dtype)
        if rule == "kahan":
            low.copy_(p32)
            comp = pack.storage["kahan_comp"]
            # skipped tensors keep value and compensation: their pending compensation alone must not enter the
            # write (where it is exactly half an ulp, which its bf16 storage makes possible, it would move the value)
            applied = None if self.keep is None else self.tensor_scale_(self.scratch("kahan_applied").copy_(comp), self.keep)
            kahan_add_(low, comp, new.sub_(p32), work=self.temp(1), applied=applied)
        elif rule == "stochastic" and pack.dtype == torch.bfloat16:
            stochastic_round_(low, new, self.opt._generator(pack.device), scratch=self.scratch("sr_bits", torch.int32))
        else:
            low.copy_(new)
        torch._foreach_copy_(params, pack.views(low))
