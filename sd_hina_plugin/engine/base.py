"""The optimizer base every named optimizer declares itself on.

A subclass sets three class attributes and nothing else is needed for a working optimizer:

``NAME``        the registered name
``TECHNIQUES``  the ordered techniques (instances of :class:`~sd_hina_plugin.engine.technique.Technique`)
``Config``      the config dataclass built from the techniques' fields (:func:`~sd_hina_plugin.config.make_config`)

What the base guarantees for every optimizer:

* ``group["lr"]`` and every other hyperparameter are read from the param group at each step, so lr
  schedulers and per-group values (kohya's unet / text-encoder lrs) work; per-group values are validated.
* A host-side step count per group (``group["step"]``) drives phases; ``step()`` never reads device values
  (no ``.item()``, no tensor-valued ``if``) and dispatches the same number of ops for 200 or 4000 tensors
  of the same shapes (see ``engine/pack.py``).
* State lives in ``optimizer.state[p]`` under semantic keys (``exp_avg``, ``exp_avg.q``,
  ``exp_avg.absmax``, ...). ``load_state_dict`` copies into the already allocated state, so 8-bit codes,
  fp32 absmax and fp32 moments of bf16 parameters keep their dtypes (torch's default would cast them to
  the parameter dtype), a state dict saved on CUDA loads on CPU, and a state dict from another optimizer
  or with missing keys is rejected with a message saying what differs.
* ``stats()`` is the only method that reads device values; ``get_optimization_info()`` describes the setup.
  Both live in ``engine/report.py``, away from the step.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar

import torch

from ..config import ConfigBase, describe_arguments
from ..kohya.hook import attach as attach_to_kohya
from ..lora import discovery
from ..numerics import quant8
from ..numerics.rounding import stochastic_round_
from . import sharding
from .binding import Binding
from .checkpoint import FORMAT_VERSION, Checkpointing
from .naming import NameMemo, Naming
from .compiled import CompiledSteps, run_chain
from .context import StepContext
from .distributed import Iteration
from .pack import Pack, ScratchPool, plan_packs, upload
from .report import Reporting
from .state import StateTable
from .technique import Slot, Technique, validate_techniques

__all__ = ["FORMAT_VERSION", "HinaOptimizer", "validate_techniques"]
_RNG_SEED = 0x5EED_0001
logger = logging.getLogger("sd_hina_plugin")


class HinaOptimizer(Naming, Reporting, Checkpointing, sharding.ShardAccess, torch.optim.Optimizer):
    NAME: ClassVar[str] = ""
    TECHNIQUES: ClassVar[tuple[Technique, ...]] = ()
    Config: ClassVar[type[ConfigBase]]
    #: parameter dtypes the optimizer accepts (None: any floating dtype)
    PARAM_DTYPES: ClassVar[tuple[torch.dtype, ...] | None] = None
    #: the optimizer to suggest instead when the dtype is wrong
    OTHER_DTYPES_HINT: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TECHNIQUES:
            validate_techniques(cls.NAME or cls.__name__, cls.TECHNIQUES)
        if "Config" in cls.__dict__:
            describe_arguments(cls)

    def __init__(self, params: Any, lr: float | None = None, **kwargs: Any):
        if lr is not None:
            kwargs["lr"] = lr
        self._adamw_notes: list[str] = []
        kwargs = self.adamw_keywords(kwargs)
        self.config = self.Config.from_kwargs(kwargs)
        if isinstance(params, torch.Tensor):
            raise TypeError(f"{self.NAME}: params must be an iterable of tensors or of param-group dicts, got a Tensor")
        params = list(params)
        if not params:
            raise ValueError(f"{self.NAME}: got an empty parameter list")
        #: where each trained tensor lives: groups by identity, their members and packs (see engine/binding.py)
        self._binding = Binding()
        self._binding.module_of = self._module_of
        #: the packs of the groups being stepped, while step() runs
        self._step_packs: list[list[Pack]] | None = None
        #: names learnt for tensors so far (by id), which the views an engine cuts from its partitions inherit
        self._names_seen = NameMemo()
        self._pool = ScratchPool.shared()  # one per process, shared by every optimizer (see ScratchPool)
        self._pool_generation = self._pool.generation
        self._stats: dict[str, torch.Tensor | float] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._host_values: dict[str, tuple[tuple, torch.Tensor]] = {}
        #: per-pack compiled chains, made when a group with ``compile=True`` first steps (see engine/compiled.py)
        self._compiled: CompiledSteps | None = None
        #: per-step results of techniques' ``prepare`` (transient, rebuilt every step)
        self.step_cache: dict[str, Any] = {}
        #: sums over all tensors that techniques' ``finish`` folds in once per iteration (see ShardAccess.add_step_sum)
        self.iteration_sums: dict[str, Any] = {}
        #: the groups called in this iteration (an iteration spans several calls under DeepSpeed)
        self._iteration = Iteration()
        #: lr-mask means per pack (group index, 0-d device tensor, elements), for hina/avg_lr in stats()
        self.mask_means: dict[int, tuple[int, torch.Tensor, int] | None] = {}
        super().__init__(params, self.config.as_dict())
        self.state = StateTable(self)  # torch's defaultdict(dict), plus the upstream's read-only lr_mask / avg_lr
        self._check_setup()
        self._discover_names()
        attach_to_kohya(self)  # inside kohya's trainer: add stats() to its step logs
        for note in self.notes():
            logger.info("%s: %s", self.NAME, note)

    def notes(self) -> list[str]:
        """Why switched-on techniques are inactive in this combination (logged once at construction)."""
        out: list[str] = list(self._adamw_notes)
        for group in self.param_groups:
            for tech in self.TECHNIQUES:
                message = tech.note(group) or (tech.layout_note(self, group) if tech.enabled(group) else None)
                if message and message not in out:
                    out.append(message)
        return out

    # -- construction -------------------------------------------------------------------------------------
    def _note_once(self, message: str) -> None:
        """Say ``message`` with :meth:`notes` (logged at construction), once however many groups repeat it."""
        if message not in self._adamw_notes:
            self._adamw_notes.append(message)

    def adamw_keywords(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Hook: map torch AdamW's keywords (``betas=(b1, b2)``, ``eps``), as diffusers' and HF scripts pass them,
        onto this optimizer's own arguments where they differ. The base has AdamW's, so nothing changes."""
        return kwargs

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            extra = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
            param_group = {**{k: v for k, v in param_group.items() if k in ("params", "param_names")}, **self.adamw_keywords(extra)}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        self._binding.home(group)  # its tensors now: what an engine's later forms of them stand for
        overrides = {k: group[k] for k in self.Config.FIELDS if k in group}
        validated = self.Config.from_kwargs(overrides)
        group.update(validated.as_dict())
        group.setdefault("step", 0)
        # the lr the group was built with: the unit of the per-element lr masks (a scheduler's warm-up, which
        # starts after construction, never moves it; torch's schedulers record the same value as initial_lr)
        group.setdefault("hina_lr0", float(group["lr"]))
        for j, p in enumerate(group["params"]):
            if sharding.is_dtensor(p):
                sharding.shard_of(p, f"{self.NAME}: parameter {j} of group {index}")  # a layout we can follow
            if p.is_complex():
                raise TypeError(f"{self.NAME}: parameter {j} of group {index} is complex ({p.dtype}); complex parameters are not supported")
            if not p.is_floating_point():
                raise TypeError(f"{self.NAME}: parameter {j} of group {index} has dtype {p.dtype}; only floating-point parameters can be optimized")
        if self._binding.any_planned:  # added after state exists: roles now, packs when it first steps
            self._discover_names()

    def _check_dtypes(self, members: list[torch.Tensor] | None = None) -> None:
        """Every parameter (or, given ``members``, every tensor a group trains now) has a dtype this optimizer takes."""
        if self.PARAM_DTYPES is None:
            return
        if members is None:
            wrong = [(gi, j, p.dtype) for gi, g in enumerate(self.param_groups) for j, p in enumerate(g["params"])
                     if p.dtype not in self.PARAM_DTYPES]
        else:
            # (and an engine's form of them: DeepSpeed's partition, FSDP2's sharded parameter, whose dtype is its shard's)
            mine = {id(m) for m in members} | {id(f.owner) for m in members if (f := self._binding.fragment(m)) is not None} \
                | {id(self._binding.source(m)) for m in members}
            wrong = [(self._binding.home(g), j, p.dtype) for g in self.param_groups for j, p in enumerate(g["params"])
                     if id(p) in mine and p.dtype not in self.PARAM_DTYPES]
        if wrong:
            listed = ", ".join(f"group {gi} parameter {j} ({str(dt).replace('torch.', '')})" for gi, j, dt in wrong[:5])
            more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
            allowed = "/".join(str(d).replace("torch.", "") for d in self.PARAM_DTYPES)
            hint = self.OTHER_DTYPES_HINT
            if members is not None and any(self._binding.fragment(m) is not None for m in members):
                hint = (f"{self._binding.fragments()[0].engine} keeps fp32 master copies of the weights and steps the "
                        f"optimizer on them, whatever the model's dtype; use an optimizer for fp32 weights "
                        f"(AdamW_HinaAdaptive is this one's).")
            raise TypeError(f"{self.NAME} needs {allowed} parameters; got {listed}{more}. {hint}".strip())

    def _check_setup(self) -> None:
        """Reject parameter/argument combinations that cannot work (subclasses may add checks)."""
        self._dtypes_checked = True
        try:
            self._check_dtypes()
        except TypeError:
            # kohya's train_network builds the optimizer first and casts the network for --full_bf16 / --full_fp16
            # after: check again at the first step, when the cast has happened (a full fine-tune script likewise)
            trainer = discovery.find_kohya_trainer_frame() or discovery.find_kohya_script_frame()
            args = trainer.get("args") if trainer else None
            if not (getattr(args, "full_bf16", False) or getattr(args, "full_fp16", False)):
                raise
            self._dtypes_checked = False
        if any(self._wants_8bit(g) for g in self.param_groups):
            ok, why = quant8.bnb_available()
            if not ok:
                if "optim_bits" in self.Config.FIELDS:
                    instead = "use optim_bits=32"
                elif self.NAME.endswith("8bit"):
                    instead = f"use {self.NAME[:-len('8bit')]} (the same optimizer with 32-bit state)"
                else:
                    instead = "set min_8bit_size above your largest tensor"
                raise RuntimeError(f"{self.NAME}: 8-bit state needs bitsandbytes' blockwise kernels, which failed here ({why}); {instead}")

    @staticmethod
    def _wants_8bit(group: dict[str, Any]) -> bool:
        return group.get("optim_bits", 32) == 8

    def _quantize_param(self, group: dict[str, Any]) -> Callable[[int], bool]:
        """Whether a tensor of ``numel`` elements (the whole tensor's, for a shard) keeps 8-bit state."""
        wants = self._wants_8bit(group)
        threshold = group.get("min_8bit_size", 4096)
        return lambda numel: wants and numel >= threshold

    def techniques(self, group: dict[str, Any]) -> list[Technique]:
        return [t for t in self.TECHNIQUES if t.enabled(group)]

    def _slots(self, group: dict[str, Any], pack: Pack) -> list[Slot]:
        slots: dict[str, Slot] = {}
        for tech in self.techniques(group):
            for slot in tech.slots_for(group, pack):
                slots[slot.name] = self.slot_policy(slot)
        return list(slots.values())

    def slot_policy(self, slot: Slot) -> Slot:
        """Hook: an optimizer may change how slots are stored (e.g. all moments in bf16)."""
        return slot

    # -- state layout -------------------------------------------------------------------------------------
    @staticmethod
    def _slot_keys(slot: Slot, pack: Pack) -> list[tuple[str, str]]:
        if slot.per_tensor:
            return [(slot.name, "tensor")]
        if slot.layout != "elem":
            if slot.layout == "bits" and not pack.quantized:
                raise ValueError(f"slot {slot.name!r}: packed bits need an 8-bit pack (segments padded to 256)")
            return [(slot.name, slot.layout)]
        if pack.quantized and slot.quantizable:
            return [(f"{slot.name}.q", "elem"), (f"{slot.name}.absmax", "blocks")]
        return [(slot.name, "elem")]

    @staticmethod
    def _buffer(pack: Pack, slot: Slot, key: str, kind: str) -> torch.Tensor:
        """A new storage buffer for ``key`` of ``slot`` in ``pack``, holding zeros (8-bit codes: the code of 0,
        which padding must hold, since its blocks' absmax is computed over it)."""
        if key.endswith(".q"):
            return torch.full((pack.buffer_size(kind),), quant8.zero_code(slot.signed), dtype=torch.uint8, device=pack.device)
        if kind in ("blocks", "tensor", "rows", "cols"):
            dtype = torch.float32
        elif kind == "bits":
            dtype = torch.uint8
        else:
            dtype = {"fp32": torch.float32, "param": pack.dtype, "bf16": torch.bfloat16, "int8": torch.int8,
                     "int16": torch.int16, "uint8": torch.uint8}[slot.dtype]
        return torch.zeros(pack.buffer_size(kind), dtype=dtype, device=pack.device)

    def _allocate(self, pack: Pack, group: dict[str, Any]) -> None:
        pack.storage.clear()
        pack.forget_views()
        for slot in self._slots(group, pack):
            for key, kind in self._slot_keys(slot, pack):
                buf = self._buffer(pack, slot, key, kind)
                pack.storage[key] = buf
                pack.kinds[key] = kind
                views = pack.key_views(key, buf)
                if slot.init == "param":
                    torch._foreach_copy_(views, pack.params)
                elif slot.init == "ones":
                    buf.fill_(1.0)
                for p, view in zip(pack.params, views):
                    self.state[p][key] = view

    def _pack_tag(self, group: dict[str, Any]) -> Callable[[torch.Tensor], tuple]:
        """Techniques that need parameters kept apart (e.g. SPD: anchored or zero-anchored) tag them."""
        techniques = self.techniques(group)

        def tag(p: torch.Tensor) -> tuple:
            return tuple((t.name, value) for t in techniques if (value := t.pack_tag(self, group, p)) is not None)

        return tag

    def _init_state(self, fresh: bool = False) -> None:
        """Plan every group now (its state allocated; ``fresh``: anew, its state zeroed, as before loading a checkpoint)."""
        if not self._dtypes_checked:
            self._check_dtypes()
            self._dtypes_checked = True
        if fresh:
            self._binding.forget()
        for group in self.param_groups:
            self._group_packs(group, carry=not fresh)
        self._report_missing_names()

    @property
    def _packs(self) -> list[list[Pack]] | None:
        """The packs of each group in ``param_groups`` (None before any group was planned)."""
        if self._step_packs is not None:
            return self._step_packs
        if not self._binding.any_planned:
            return None
        return [self._group_packs(group) for group in self.param_groups]

    def _all_planned(self) -> list[Pack]:
        return [pack for group in self._binding.groups for pack in self._binding.planned(group) or []]

    def _group_packs(self, group: dict[str, Any], carry: bool = True) -> list[Pack]:
        """``group``'s packs for the tensors it holds now, planned again when they changed (see engine/binding.py)."""
        packs = self._binding.current(group)
        return packs if packs is not None else self._replan(group, carry)

    def _replan(self, group: dict[str, Any], carry: bool = True) -> list[Pack]:
        """Plan ``group`` for the tensors it holds now. A tensor it held before keeps its state; one it no longer holds
        keeps its state in ``optimizer.state`` (as in torch.optim) and continues from it if it comes back; a new one
        starts fresh."""
        old_packs = self._binding.planned(group) or []
        old = [p for pack in old_packs for p in pack.params]
        members = self._binding.members(group)
        # state held in this group's old buffers: a tensor that moved to another group since holds its state there
        # (planned first, it must not be cut off from it here)
        buffers = {buf.untyped_storage().data_ptr() for pack in old_packs for buf in pack.storage.values()}
        previous: dict[int, dict[str, Any]] = {}
        for p in old + members if carry else ():
            entry = dict.get(self.state, p)
            if entry and id(p) not in previous:
                previous[id(p)] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in dict.items(entry)}
                if any(isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() in buffers for v in dict.values(entry)):
                    # copies, so that the old buffers can go; the entry keeps them until the tensor is planned again
                    dict.update(entry, previous[id(p)])
        for pack in old_packs:
            self.mask_means.pop(id(pack), None)
        self._check_dtypes(members)
        if any(id(p) not in self._lora.name_of for p in members):
            self._discover_names()
        if self._compiled is not None:
            self._compiled.forget()
        packs = self._binding.plan(group, members, self._plan_members)
        for pack in packs:
            for p in pack.params:
                for key, value in previous.get(id(p), {}).items():
                    mine = dict.get(self.state[p], key)
                    if isinstance(mine, torch.Tensor) and isinstance(value, torch.Tensor) and mine.shape == value.shape:
                        mine.copy_(value)
        line = self._binding.describe()
        if line and line not in self._adamw_notes:
            self._note_once(line)
            logger.info("%s: %s", self.NAME, line)
        return packs

    def _plan_members(self, gi: int, group: dict[str, Any], members: list[torch.Tensor]) -> list[Pack]:
        packs = plan_packs(gi, members, self._quantize_param(group), self._pack_tag(group), self._binding.shard)
        for pack in packs:
            self._allocate(pack, group)
        return packs

    def packs(self) -> list[Pack]:
        """Every pack of the groups in ``param_groups`` (planned if need be)."""
        return [pack for packs in self._packs or [] for pack in packs]

    def per_tensor(self, key: str) -> tuple[list[Pack], torch.Tensor | None]:
        """A per-tensor slot of all packs as one vector (packs that have it, and their values concatenated)."""
        packs = [pack for pack in self.packs() if key in pack.storage]
        if not packs:
            return [], None
        return packs, torch.cat([pack.storage[key] for pack in packs])

    @staticmethod
    def per_tensor_slices(packs: list[Pack], vector: torch.Tensor) -> list[tuple[Pack, torch.Tensor]]:
        """Split a vector laid out as :meth:`per_tensor` concatenates it back into its packs' parts."""
        out, offset = [], 0
        for pack in packs:
            out.append((pack, vector[offset:offset + len(pack.params)]))
            offset += len(pack.params)
        return out

    def _scratch(self, name: str, pack: Pack, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buf = self._pool.get(name, pack.total, dtype, pack.device)
        if self._pool.generation != self._pool_generation:
            # buffers were replaced (by this optimizer or another one sharing the pool): cached views of them would
            # keep the old buffers alive
            retired = self._pool.retired_since(self._pool_generation)
            self._pool_generation = self._pool.generation
            for other in self._all_planned():
                other.forget_views(retired)
        return buf

    def host_values(self, name: str, values: list, device: torch.device) -> torch.Tensor:
        """``torch.tensor(values)`` on ``device``, uploaded (without a sync, see :func:`~.pack.upload`) only when
        ``values`` differ from the last call under ``name``: host-side facts that rarely change, such as which
        tensors have a gradient, reach the device this way."""
        key = (tuple(values), str(device))
        cached = self._host_values.get(name)
        if cached is None or cached[0] != key:
            cached = self._host_values[name] = (key, upload(values, device))
        return cached[1]

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(_RNG_SEED)
            self._generators[key] = gen
        return gen

    # -- the step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._dtypes_checked:
            self._check_dtypes()
            self._dtypes_checked = True
        # groups by identity, never by position: engines step a subset (DeepSpeed sets param_groups to one group),
        # replace parameters (DeepSpeed's flat partitions, FSDP2) or reorder groups (see engine/binding.py)
        visible = [self._group_packs(group) for group in self.param_groups]
        self._report_missing_names()
        iteration = self._iteration
        if iteration.starts_again(self.param_groups):  # (an engine skipped a group: finish the iteration it left)
            self._finish_iteration()
        self._step_packs = visible
        try:
            self.step_cache.clear()
            if not iteration.called:
                self.iteration_sums.clear()
            grad = self._binding.grad
            for group in self.param_groups:
                self._binding.gather(group)
            stepping = [(group, packs) for group, packs in zip(self.param_groups, visible)
                        if any(grad(p) is not None for pack in packs for p in pack.params)]
            for tech in self.TECHNIQUES:
                if any(tech.enabled(group) for group, _ in stepping):
                    tech.prepare(self)
            for group, packs in stepping:
                group["step"] += 1
                for pack in packs:
                    self._step_pack(pack, group)
            iteration.record(self.param_groups)
            # every call is an iteration, except under DeepSpeed, where the call of its last group completes one
            if iteration.complete(self._binding.groups if self._binding.partitioned else self.param_groups):
                self._finish_iteration()
            for group, _ in stepping:
                self._binding.write_back(group)
        finally:
            self._step_packs = None
        return loss

    def _finish_iteration(self) -> None:
        """Techniques' ``finish``, for those enabled in a group called in the iteration now complete."""
        called = self._iteration.take()
        for tech in self.TECHNIQUES:
            if any(tech.enabled(group) for group in called):
                tech.finish(self)

    def grad_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The gradient of a tensor packs train (``p.grad``, or its part of an engine's gradient partition)."""
        return self._binding.grad(p)

    def _step_pack(self, pack: Pack, group: dict[str, Any]) -> None:
        grads = [self._binding.grad(p) for p in pack.params]
        absent = [i for i, g in enumerate(grads) if g is None]
        if len(absent) == len(grads):
            return
        for p, g in zip(pack.params, grads):
            if g is not None and g.is_sparse:
                raise RuntimeError(f"{self.NAME}: sparse gradients are not supported (parameter of shape {tuple(p.shape)})")
        if not absent:
            self._run(pack, group, grads)
            return
        # Some tensors have no gradient this step (kohya's module dropout skips whole LoRA modules): the pack runs
        # with them skipped, as tensors with a non-finite gradient are (zero gradient, no update, no decay), and
        # their state and values are put back afterwards, so that they are untouched. Copying those few tensors
        # costs far less than running the others as a separate pack with copies of all their state.
        targets = [[pack.params[i].detach() for i in absent]]  # their values, then each state slot's views
        targets += [[views[i] for i in absent] for views in (pack.key_views(k, buf) for k, buf in pack.storage.items())]
        copies = [torch.cat([t.reshape(-1) for t in ts]) for ts in targets]
        self._run(pack, group, grads, absent)
        for ts, flat in zip(targets, copies):
            torch._foreach_copy_(ts, [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in ts]), ts)])

    def _run(self, pack: Pack, group: dict[str, Any], grads: list[torch.Tensor | None], absent: list[int] = ()) -> None:
        g = self._scratch("g", pack)
        views = pack.views(g)
        if absent:
            torch._foreach_copy_([v for v, x in zip(views, grads) if x is not None], [x for x in grads if x is not None])
            torch._foreach_zero_([views[i] for i in absent])
        else:
            torch._foreach_copy_(views, grads)
        if pack.pad_index is not None:
            g.index_fill_(0, pack.pad_index, 0.0)
        states: dict[str, torch.Tensor] = {}
        quantized: list[Slot] = []
        rounded: list[Slot] = []
        widened: list[Slot] = []
        compiled = bool(group.get("compile")) and group["step"] > 1
        for slot in self._slots(group, pack):
            if pack.quantized and slot.quantizable and not slot.per_tensor and slot.layout == "elem":
                out = None if pack.device.type == "cpu" else self._scratch(f"deq.{slot.name}", pack)
                states[slot.name] = quant8.dequantize(pack.storage[f"{slot.name}.q"], pack.storage[f"{slot.name}.absmax"], slot.signed, out=out)
                if pack.pad_index is not None:  # (the code nearest 0 need not read back as 0)
                    states[slot.name].index_fill_(0, pack.pad_index, 0.0)
                quantized.append(slot)
            elif slot.dtype == "bf16" and not slot.per_tensor and slot.layout == "elem" and slot.init != "param":
                # read into fp32 on first use; written back only if a technique touched it
                states[slot.name] = (lambda name=slot.name: self._scratch(f"sr.{name}", pack).copy_(pack.storage[name]))
                rounded.append(slot)
            elif compiled and slot.dtype == "int16":
                # inductor's CPU vectorizer has no int16: a generated loop that loads or stores one runs element by
                # element, and with it all the arithmetic fused into that loop (measured: 13 ms instead of ~0.3 ms
                # per 1 M elements); the graph works on an int32 copy, written back when a technique changed it
                states[slot.name] = self._scratch(f"wide.{slot.name}", pack, torch.int32).copy_(pack.storage[slot.name])
                widened.append(slot)
            else:
                states[slot.name] = pack.storage[slot.name]
        ctx = StepContext(self, pack, group, g, states)
        present = None
        if absent:
            flags = [1.0] * len(pack.params)
            for i in absent:
                flags[i] = 0.0
            present = self.host_values(f"present.{id(pack)}", flags, pack.device)
        techniques = self.techniques(group)
        for tech in techniques:
            values = tech.scalars(group, group["step"])
            if values is not None:
                ctx.scalars[tech.name] = values
        if compiled:
            if self._compiled is None:
                self._compiled = CompiledSteps()
            self._compiled.run(self, pack, ctx, techniques, present)
        else:
            run_chain(self, ctx, techniques, present)
        self._count_nonfinite(ctx)
        ctx.commit()
        for slot in quantized:
            if pack.pad_index is not None:  # padding holds 0, so each tensor's blocks are its own whatever ran before
                states[slot.name].index_fill_(0, pack.pad_index, 0.0)
            quant8.quantize_(states[slot.name], pack.storage[f"{slot.name}.q"], pack.storage[f"{slot.name}.absmax"], slot.signed)
        for slot in widened:
            if slot.name in ctx.dirty:
                pack.storage[slot.name].copy_(states[slot.name])
        for slot in rounded:  # bf16 state: every write unbiased (a plain bf16 EMA cannot follow falling values)
            if slot.name in ctx.dirty:
                stochastic_round_(pack.storage[slot.name], ctx.state(slot.name), self._generator(pack.device),
                                  scratch=self._scratch("sr_bits", pack, torch.int32))

    def _screen_nonfinite(self, ctx: StepContext) -> None:
        """A tensor whose gradient holds NaN/Inf is skipped: its gradient is zeroed (so the moments see no
        signal this step and never hold NaN), its update and weight decay are masked, and it is counted in
        ``hina/nonfinite_skipped``. Per step: one read (per-tensor sums: a sum is finite iff every element
        is), a nan_to_num and a multiply by the keep mask; no sync."""
        finite = torch.isfinite(ctx.tensor_sum(ctx.g))
        ctx.keep = finite.to(torch.float32)
        if ctx.compiling:  # a new tensor inside the graph: the gathered buffer need not be written back
            # nan_to_num's generated loop tests isnan element by element (3x the cost of the Adam arithmetic in it);
            # g * 0 == 0 holds exactly for finite g and compiles to one vector compare
            clean = torch.where(ctx.g * 0.0 == 0.0, ctx.g, 0.0)
            if ctx.m_in is ctx.g:
                ctx.m_in = clean
            ctx.g = clean
        else:
            torch.nan_to_num_(ctx.g, nan=0.0, posinf=0.0, neginf=0.0)  # NaN * 0 would stay NaN
        self._mask_skipped(ctx, ctx.g)
        ctx.nonfinite = (~finite).sum()  # counted into the stats after the chain (_count_nonfinite)

    def _count_nonfinite(self, ctx: StepContext) -> None:
        """Add the pack's skipped tensors to ``hina/nonfinite_skipped``, outside a compiled graph (a key added to the
        stats inside one is a guard that fails once other stats appear: a graph per pack compiled again)."""
        if ctx.nonfinite is None:
            return
        previous = self._stats.get("hina/nonfinite_skipped")
        self._stats["hina/nonfinite_skipped"] = ctx.nonfinite if previous is None else previous + ctx.nonfinite

    @staticmethod
    def _mask_skipped(ctx: StepContext, flat: torch.Tensor) -> None:
        """Zero the skipped tensors' elements of finite ``flat`` (a multiply: 10x faster than masked_fill_ here)."""
        ctx.tensor_scale_(flat, ctx.keep)
