"""Flat layout of a set of parameters: the reason a step costs the same number of ops for 200 or 4000 tensors.

A :class:`Pack` holds parameters of one param group that share device, dtype and state precision, sorted
by shape. Each state slot of the pack is **one flat buffer**; ``optimizer.state[p][slot]`` is a view of the
parameter's segment in it, so the state stays a plain per-parameter tensor for ``state_dict`` while the
arithmetic runs on the whole buffer with one op. Gradients are gathered into a flat scratch buffer with
one ``_foreach_copy_``; parameter updates go back with one ``_foreach_*`` op. Parameters of the same shape
are adjacent, so matrix techniques see them as one ``(k, rows, cols)`` batch (:meth:`Pack.buckets`).

With 8-bit state every segment is padded to a multiple of the 256-element block so each parameter's blocks
are exactly the blocks bitsandbytes would use for it alone.

Packs are capped at ``CHUNK`` elements (at parameter boundaries) so that scratch memory stays bounded for
full fine-tuning; on CUDA a LoRA network of up to ~33 M parameters per group is one pack. On CPU the cap is
``CPU_CHUNK`` (2^20 elements, 4 MB per fp32 buffer): a step makes 20 to 40 passes over each pack's
buffers, and with packs that size the ~8 buffers a step touches stay in a 32 MB L3 cache from one pass to
the next (measured on the LoRA set: 10-15% less time per step, with about 0.5 ms of Python per extra pack
already counted). The number of ops then grows with the number of elements in 1 M steps on CPU, never with
the number of tensors.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..numerics.quant8 import BLOCK, padded

CHUNK = 1 << 25
CPU_CHUNK = 1 << 20


def join(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-bucket parts (flat, in bucket order) as one tensor: the part itself when the pack is one bucket (no copy),
    else their concatenation. Per-tensor, "rows" and "cols" values of a pack are laid out this way."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def upload(values: list, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device`` without waiting for the GPU. A plain ``torch.tensor(..., device=
    "cuda")`` copies from pageable memory, which PyTorch follows with a stream synchronisation; here the values
    go through pinned memory with a non-blocking copy (PyTorch's caching host allocator keeps the pinned block
    until the copy has run). For per-tensor facts known on the host that a step needs on the device."""
    host = torch.tensor(values)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class Bucket:
    """``count`` same-shape parameters starting at element ``start`` with per-parameter stride ``seg``."""

    shape: tuple[int, ...]
    start: int
    count: int
    seg: int
    first: int = 0  # index of the bucket's first parameter in ``Pack.params``
    row_start: int = 0  # offsets of the bucket in "rows" / "cols" buffers (factored statistics)
    col_start: int = 0
    #: the whole tensors' shape where the bucket holds local shards of sharded tensors (see engine/sharding.py)
    full_shape: tuple[int, ...] | None = None

    @property
    def n_rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def n_cols(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def full_rows(self) -> int:
        """Rows of the whole tensors (of a matrix view), where ``n_rows`` counts the local shard's."""
        shape = self.shape if self.full_shape is None else self.full_shape
        return shape[0] if shape else 1

    @property
    def full_numel(self) -> int:
        return math.prod(self.shape if self.full_shape is None else self.full_shape)

    def row_stats(self, buf: torch.Tensor) -> torch.Tensor:
        """The bucket's part of a "rows" buffer as ``(count, rows)``."""
        return buf[self.row_start:self.row_start + self.count * self.n_rows].view(self.count, self.n_rows)

    def col_stats(self, buf: torch.Tensor) -> torch.Tensor:
        """The bucket's part of a "cols" buffer as ``(count, cols)``."""
        return buf[self.col_start:self.col_start + self.count * self.n_cols].view(self.count, self.n_cols)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def rows(self, flat: torch.Tensor) -> torch.Tensor:
        """The bucket's parameters as a ``(count, numel)`` view of ``flat`` (padding excluded, no copy)."""
        block = flat[self.start:self.start + self.count * self.seg].view(self.count, self.seg)
        return block[:, :self.numel] if self.seg != self.numel else block

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """The bucket's parameters as one ``(count, *shape)`` view of ``flat`` (no copy)."""
        return self.rows(flat).view(self.count, *self.shape)

    def matrix(self, flat: torch.Tensor) -> torch.Tensor:
        """The same view with every tensor as a matrix ``(shape[0], prod(rest))`` (conv kernels included)."""
        return self.view(flat).view(self.count, self.n_rows, self.n_cols)


@dataclass
class Pack:
    group_index: int
    device: torch.device
    dtype: torch.dtype
    quantized: bool
    params: list[torch.nn.Parameter]
    offsets: list[int] = field(default_factory=list)
    total: int = 0
    buckets: list[Bucket] = field(default_factory=list)
    storage: dict[str, torch.Tensor] = field(default_factory=dict)
    #: kind of each storage key: "elem" (one value per element), "blocks" (8-bit absmax), "tensor" (per tensor)
    kinds: dict[str, str] = field(default_factory=dict)
    #: technique tags that split packs (e.g. SPD anchors needed or not), from the optimizer's pack key
    tags: tuple = ()
    #: per-pack values derived once by techniques (index lists, host scales); never state
    derived: dict[str, object] = field(default_factory=dict)
    _views: dict[tuple, list[torch.Tensor]] = field(default_factory=dict)
    pad_index: torch.Tensor | None = None
    #: the ranks these tensors are sharded over (``engine/sharding.py``: members are local shards, reductions over a
    #: tensor are summed across them) and the whole tensors' shapes; None for tensors held whole
    mesh: Any = None
    full_shapes: list[tuple[int, ...]] | None = None
    #: per-parameter offsets into "rows" / "cols" buffers, and their totals
    row_offsets: list[int] = field(default_factory=list)
    col_offsets: list[int] = field(default_factory=list)
    total_rows: int = 0
    total_cols: int = 0

    def __post_init__(self) -> None:
        offset = 0
        pads: list[torch.Tensor] = []
        for index, p in enumerate(self.params):
            rows = p.shape[0] if p.dim() else 1
            self.row_offsets.append(self.total_rows)
            self.col_offsets.append(self.total_cols)
            self.total_rows += rows
            self.total_cols += math.prod(p.shape[1:]) if p.dim() > 1 else 1
            self.offsets.append(offset)
            seg = padded(p.numel()) if self.quantized else p.numel()
            if seg != p.numel():
                # made on the device: an arange is a kernel, not an upload
                pads.append(torch.arange(offset + p.numel(), offset + seg, device=self.device))
            shape = tuple(p.shape)
            full = None if self.full_shapes is None else self.full_shapes[index]
            last = self.buckets[-1] if self.buckets else None
            if last is not None and last.shape == shape and last.full_shape == full and last.start + last.count * last.seg == offset:
                last.count += 1
            else:
                self.buckets.append(Bucket(shape, offset, 1, seg, index, self.row_offsets[-1], self.col_offsets[-1], full))
            offset += seg
        self.total = offset
        if pads:
            self.pad_index = torch.cat(pads)

    def derive(self, key: str, make: Callable[[], Any]) -> Any:
        """``derived[key]``, made by ``make()`` the first time it is asked for."""
        value = self.derived.get(key)
        if value is None:
            value = self.derived[key] = make()
        return value

    def numels(self) -> torch.Tensor:
        """Element count of each parameter (of the whole tensor, for a shard), ``(n_params,)`` fp32, on the device
        (built once per pack, one fill per bucket: no host-to-device copy, so it may be built in any step)."""
        return self.derive("numels", lambda: torch.cat([
            torch.full((b.count,), float(b.full_numel), device=self.device) for b in self.buckets]))

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` (partial results of this rank's shards) across the ranks the pack is sharded over, in place;
        ``x`` itself when its tensors are held whole."""
        return x if self.mesh is None else self.mesh.sum_(x)

    def sum_all_(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`sum_` of several tensors with one collective."""
        return parts if self.mesh is None else self.mesh.sum_all_(parts)

    #: packs of up to this many buckets of different segment sizes spread per-tensor values by concatenating one
    #: broadcast per bucket (:meth:`spread`); above it, a gather from :meth:`segment_ids` (measured on CPU, 0.4 to
    #: 1.4 M elements, one thread: the concatenation took 0.6 to 0.95x the gather's time up to 6 buckets; from 8 on,
    #: multiplied in place, it took 1.1x, and 5x at 12 buckets)
    CAT_BUCKETS = 6

    def spread_mode(self) -> str:
        """How :meth:`spread` broadcasts per-tensor values: ``"uniform"`` (every segment of the same size: one
        broadcast view), ``"cat"`` (a broadcast per bucket, concatenated) or ``"gather"`` (index tensors)."""
        if len({b.seg for b in self.buckets}) == 1:
            return "uniform"
        return "cat" if len(self.buckets) <= self.CAT_BUCKETS else "gather"

    def spread(self, values: torch.Tensor) -> torch.Tensor:
        """Per-tensor ``values`` ``(n_params,)`` as one value per element ``(total,)``, for a compiled step (eager
        steps scale bucket by bucket instead). As broadcast views, the generated loop reads one value per tensor
        where its index is the element's index divided by the segment size (on CPU as fast as a plain multiply, and
        2 to 3 times faster than a gather, whose values inductor loads element by element); in-place slices of a
        flat buffer, per bucket, would instead become one nested mask per bucket."""
        mode = self.spread_mode()
        if mode == "uniform":
            return values.view(-1, 1).expand(len(self.params), self.buckets[0].seg).reshape(-1)
        if mode == "cat":
            return torch.cat([values[b.first:b.first + b.count].view(-1, 1).expand(b.count, b.seg).reshape(-1)
                              for b in self.buckets])
        return values[self.segment_ids()]

    def spread_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row ``values`` (a "rows" buffer, ``(total_rows,)``) as one value per element ``(total,)``, like
        :meth:`spread` (each tensor viewed as a matrix ``(shape[0], prod(rest))``); padding takes its tensor's
        last row."""
        return self._spread_matrix(values, "rows")

    def spread_cols(self, values: torch.Tensor) -> torch.Tensor:
        """Per-column ``values`` (a "cols" buffer, ``(total_cols,)``) as one value per element ``(total,)``; padding
        takes its tensor's last column."""
        return self._spread_matrix(values, "cols")

    def _spread_matrix(self, values: torch.Tensor, kind: str) -> torch.Tensor:
        # several buckets: a gather. Measured on CPU, one pack of two LoRA shapes, whole steps against the gather's:
        # with a broadcast per bucket, concatenated, CameAMP's step took 2x as long (inductor writes the
        # concatenation to memory first, and a column pattern is not vectorized in a flat loop); with each bucket's
        # product computed into its part of a new buffer, CameAMP's took 1.3x and SinkGD's 1.4x as long
        if len(self.buckets) > 1:
            return values[self.matrix_ids(kind)]
        b = self.buckets[0]
        if kind == "rows":
            part = b.row_stats(values).unsqueeze(-1).expand(b.count, b.n_rows, b.n_cols)
        else:
            part = b.col_stats(values).unsqueeze(1).expand(b.count, b.n_rows, b.n_cols)
        part = part.reshape(b.count, b.numel)
        if b.seg != b.numel:
            part = torch.cat([part, part[:, -1:].expand(b.count, b.seg - b.numel)], 1)
        return part.reshape(-1)

    def segment_ids(self) -> torch.Tensor:
        """The index of the parameter each element belongs to, ``(total,)`` int32 on the device (padding included;
        built once per pack from the buckets, without an upload): :meth:`spread`'s gather for packs of many
        bucket sizes."""
        return self.derive("segment_ids", lambda: torch.cat([
            torch.arange(b.first, b.first + b.count, device=self.device, dtype=torch.int32).repeat_interleave(b.seg)
            for b in self.buckets]))

    def matrix_ids(self, kind: str) -> torch.Tensor:
        """The index, in "rows" (or "cols") buffers, of the row (column) each element belongs to, ``(total,)`` int32
        on the device; padding takes its tensor's last one. Built once per pack, like :meth:`segment_ids`, for the
        gather of :meth:`spread_rows` / :meth:`spread_cols`."""
        def make() -> torch.Tensor:
            parts = []
            for b in self.buckets:
                local = torch.arange(b.seg, device=self.device).clamp_max(max(b.numel - 1, 0))
                if kind == "rows":
                    local, size, offset = local // max(b.n_cols, 1), b.n_rows, b.row_start
                else:
                    local, size, offset = local % max(b.n_cols, 1), b.n_cols, b.col_start
                starts = torch.arange(b.count, device=self.device) * size + offset
                parts.append((starts[:, None] + local[None, :]).reshape(-1))
            return torch.cat(parts).to(torch.int32)

        return self.derive(f"{kind}_ids", make)

    def index_tensors(self, kinds: set[str]) -> None:
        """Build, outside a compiled graph, the index tensors :meth:`spread`, :meth:`spread_rows` (``"rows"`` in
        ``kinds``) and :meth:`spread_cols` (``"cols"``) will gather from in it, where they need one (made in the
        graph, they would be a change of state the next call recompiles for): int32, 4 bytes per element each."""
        if len(self.buckets) > 1:
            for kind in kinds & {"rows", "cols"}:
                self.matrix_ids(kind)
        if self.spread_mode() == "gather":
            self.segment_ids()

    @property
    def low_precision(self) -> bool:
        return self.dtype in (torch.bfloat16, torch.float16)

    def runs(self, index: list[int]) -> list[tuple[int, int]]:
        """The flat element ranges ``[start, end)`` covered by the parameters at ``index`` (sorted), adjacent
        parameters merged: one slice per run instead of one view per parameter. A run includes the padding of
        its 8-bit segments: fine for scaling a flat buffer, whose padding is never written to a parameter."""
        out: list[tuple[int, int]] = []
        for i in sorted(index):
            start = self.offsets[i]
            end = self.offsets[i + 1] if i + 1 < len(self.offsets) else self.total
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
        return out

    def views(self, flat: torch.Tensor, shaped: bool = True) -> list[torch.Tensor]:
        """Per-parameter views of a flat buffer of this pack's layout (cached: no ops after the first call)."""
        key = (flat.data_ptr(), flat.dtype, flat.numel(), shaped)
        views = self._views.get(key)
        if views is None:
            views = [flat[o:o + p.numel()].view(p.shape if shaped else (p.numel(),)) for o, p in zip(self.offsets, self.params)]
            self._views[key] = views
        return views

    def buffer_size(self, kind: str) -> int:
        """Length of a storage buffer of the given kind (see :meth:`key_views`)."""
        if kind == "blocks":
            return self.total // BLOCK
        if kind == "tensor":
            return len(self.params)
        if kind == "rows":
            return self.total_rows
        if kind == "cols":
            return self.total_cols
        if kind == "bits":
            return self.total // 8
        return self.total

    def key_views(self, key: str, buf: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views of a storage buffer of the given key's kind."""
        kind = self.kinds.get(key, "elem")
        return self.views(buf) if kind == "elem" else self.kind_views(kind, buf)

    def spans(self, kind: str) -> list[tuple[int, int]]:
        """(start, length) of each parameter's part of a buffer of a kind other than "elem"."""
        if kind == "tensor":
            return [(i, 1) for i in range(len(self.params))]
        if kind in ("blocks", "bits"):
            per = BLOCK if kind == "blocks" else 8
            return [(o // per, padded(p.numel()) // per) for o, p in zip(self.offsets, self.params)]
        starts = self.row_offsets if kind == "rows" else self.col_offsets
        ends = starts[1:] + [self.total_rows if kind == "rows" else self.total_cols]
        return [(a, b - a) for a, b in zip(starts, ends)]

    def kind_views(self, kind: str, buf: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views of a "tensor", "blocks", "rows", "cols" or "bits" buffer (cached)."""
        key = (buf.data_ptr(), buf.dtype, buf.numel(), kind)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = [buf[a:a + n] for a, n in self.spans(kind)]
        return views

    def forget_views(self, data_ptrs: set[int] | None = None) -> None:
        """Drop cached views (of the buffers at ``data_ptrs`` only, if given); they are made again on first use."""
        if data_ptrs is None:
            self._views.clear()
        else:
            for key in [k for k in self._views if k[0] in data_ptrs]:
                del self._views[key]


def plan_packs(group_index: int, params: list[torch.nn.Parameter], quantize: Callable[[int], bool],
               tag: Callable = lambda p: (), shard_of: Callable = lambda p: None) -> list[Pack]:
    """Split a group's trainable tensors (see engine/binding.py: which tensors those are is decided there) into packs
    by (device, dtype, 8-bit or not by ``quantize(numel)``, technique tags, mesh), sorted by shape.

    Local shards of sharded tensors (``shard_of(p)`` not None, see engine/sharding.py) are planned by their whole
    tensors' shapes and sizes, so that every rank of the mesh plans the same packs of the same tensors in the same
    order; a rank whose shard is empty keeps the tensor with no elements."""
    keyed: dict[tuple, list[tuple[torch.nn.Parameter, Any]]] = {}
    for p in params:
        shard = shard_of(p)
        full = math.prod(shard.shape) if shard is not None else p.numel()
        if full == 0:
            continue
        mesh = shard.mesh if shard is not None else None
        keyed.setdefault((str(p.device), p.dtype, bool(quantize(full)), tag(p), id(mesh)), []).append((p, shard))
    packs = []
    for (_, dtype, quantized, tags, _), members in keyed.items():
        mesh = members[0][1].mesh if members[0][1] is not None else None

        def shape(entry: tuple) -> tuple[int, ...]:
            return tuple(entry[1].shape if entry[1] is not None else entry[0].shape)

        def pack(chunk: list[tuple]) -> Pack:
            full = [shape(e) for e in chunk] if mesh is not None else None
            return Pack(group_index, chunk[0][0].device, dtype, quantized, [p for p, _ in chunk], tags=tags, mesh=mesh, full_shapes=full)

        members.sort(key=lambda e: (len(shape(e)), shape(e)))
        cap = min(CHUNK, CPU_CHUNK) if members[0][0].device.type == "cpu" else CHUNK
        chunk: list[tuple] = []
        size = 0
        for entry in members:
            numel = math.prod(shape(entry))
            seg = padded(numel) if quantized else numel
            if chunk and size + seg > cap:
                packs.append(pack(chunk))
                chunk, size = [], 0
            chunk.append(entry)
            size += seg
        if chunk:
            packs.append(pack(chunk))
    return packs


_SHARED: "weakref.WeakValueDictionary[str, ScratchPool]" = weakref.WeakValueDictionary()


class ScratchPool:
    """Reusable flat work buffers, one set per device, grown to the largest pack and never freed per step.

    Every optimizer of a process shares one pool (:meth:`shared`): their steps never run at the same time (a step
    uses its buffers only while it runs), so kohya's per-block optimizers (``--fused_optimizer_groups``,
    ``--blockwise_fused_optimizers``: one optimizer per block, each stepped from a backward hook) hold one set of
    buffers sized to the largest pack of any of them, not a set each. The pool lives while an optimizer uses it."""

    @classmethod
    def shared(cls) -> "ScratchPool":
        pool = _SHARED.get("pool")
        if pool is None:
            pool = cls()
            _SHARED["pool"] = pool
        return pool

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}
        #: bumped whenever a buffer is replaced by a larger one; ``retired[g]`` is the data pointer of the buffer that
        #: generation ``g`` replaced (each optimizer sharing the pool drops its cached views of those it has not seen)
        self.generation = 0
        self.retired: dict[int, int] = {}
        self._parts: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, str(device), dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            if buf is not None:
                self.generation += 1
                self.retired[self.generation] = buf.data_ptr()
                self.retired.pop(self.generation - self.KEEP, None)
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
            self._parts = {k: v for k, v in self._parts.items() if k[0] != key}
        if buf.numel() == numel:
            return buf
        # a pack smaller than the buffer (another pack, or another optimizer sharing the pool, grew it): its part,
        # made once, so that a step issues the same ops whatever the other packs' sizes
        part = self._parts.get((key, numel))
        if part is None:
            part = self._parts[(key, numel)] = buf[:numel]
        return part

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def describe(self) -> dict[str, int]:
        return {f"{name}@{dev}:{str(dt).replace('torch.', '')}": b.numel() * b.element_size()
                for (name, dev, dt), b in self._buffers.items()}

    #: retired pointers remembered (an optimizer that has missed more than this many drops all its cached views)
    KEEP = 4096

    def retired_since(self, generation: int) -> set[int] | None:
        """Data pointers of the buffers replaced after ``generation`` (None: too long ago, or a clear: all of them)."""
        if self.generation - generation >= self.KEEP:
            return None
        found = set()
        for g in range(generation + 1, self.generation + 1):
            ptr = self.retired.get(g)
            if ptr is None:
                return None
            found.add(ptr)
        return found

    def clear(self) -> None:
        self._buffers.clear()
        self._parts.clear()
        self.generation += 1  # (no retired pointer for it: everyone drops every cached view)
