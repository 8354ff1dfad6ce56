"""Pack layout: shape buckets, matrix views of conv kernels, padding, op counts; host syncs and uploads."""

from __future__ import annotations

import torch

import sd_hina_plugin
from sd_hina_plugin.diagnostics import OpCounter
from sd_hina_plugin.engine.pack import Pack, plan_packs


def test_buckets_view_same_shape_params_without_copy():
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 6), (3,), (4, 6), (2, 3, 3, 3), (4, 6)]]
    for quantized in (False, True):
        (pack,) = plan_packs(0, params, lambda numel: quantized)
        flat = torch.zeros(pack.total)
        for view, p in zip(pack.views(flat), pack.params):
            view.copy_(p.detach())
        by_shape = {b.shape: b for b in pack.buckets}
        assert by_shape[(4, 6)].count == 3
        batch = by_shape[(4, 6)].view(flat)
        assert batch.shape == (3, 4, 6)
        assert batch.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        members = [p for p in pack.params if tuple(p.shape) == (4, 6)]
        for i, p in enumerate(members):
            assert torch.equal(batch[i], p.detach())
        conv = by_shape[(2, 3, 3, 3)].matrix(flat)
        assert conv.shape == (1, 2, 27)
        batch.mul_(2)  # a view: writes land in the flat buffer
        index = next(i for i, p in enumerate(pack.params) if p is members[0])
        assert torch.equal(pack.views(flat)[index], 2 * members[0].detach())


def test_plan_splits_by_dtype_and_precision_and_skips_empty():
    # (which tensors are trainable is the binding's decision: frozen parameters never reach plan_packs)
    a = torch.nn.Parameter(torch.randn(8))
    b = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    c = torch.nn.Parameter(torch.randn(5000))
    e = torch.nn.Parameter(torch.randn(0))
    packs = plan_packs(0, [a, b, c, e], lambda numel: numel >= 4096)
    keyed = {(pk.dtype, pk.quantized): [id(p) for p in pk.params] for pk in packs}
    assert keyed == {(torch.float32, False): [id(a)], (torch.bfloat16, False): [id(b)], (torch.float32, True): [id(c)]}
    quantized = next(pk for pk in packs if pk.quantized)
    assert quantized.total % 256 == 0 and quantized.pad_index.numel() == quantized.total - 5000


def test_chunking_caps_pack_size(monkeypatch):
    import sd_hina_plugin.engine.pack as pack_module
    monkeypatch.setattr(pack_module, "CHUNK", 100)
    params = [torch.nn.Parameter(torch.randn(40)) for _ in range(5)]
    packs = plan_packs(0, params, lambda numel: False)
    assert [len(p.params) for p in packs] == [2, 2, 1]


def test_runs_cover_exactly_the_indexed_parameters_with_adjacent_ones_merged():
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 6), (3,), (4, 6), (2, 3, 3, 3), (4, 6)]]
    for quantized in (False, True):
        (pack,) = plan_packs(0, params, lambda numel: quantized)
        n = len(pack.params)
        for index in ([0, 1, 2], [0, 2], [n - 1], list(range(n)), [1, 0]):
            runs = pack.runs(index)
            covered = torch.zeros(pack.total, dtype=torch.bool)
            for start, end in runs:
                covered[start:end] = True
            for i, view in enumerate(pack.views(torch.arange(pack.total), shaped=False)):
                assert bool(covered[view].all()) == (i in index)  # every element of an indexed tensor, none of another
            assert all(a[1] < b[0] for a, b in zip(runs, runs[1:]))  # adjacent parameters merged into one run
        assert pack.runs(list(range(n))) == [(0, pack.total)]


def test_op_counter_counts_host_syncs_and_uploads():
    """What the conformance suite forbids inside ``step()``: reads of tensor values on the host (syncs on CUDA)
    and tensors made from host values (uploads, which on CUDA wait for the GPU)."""
    x = torch.ones(4)
    with OpCounter() as counter:
        x.mul_(2.0)                      # a Python scalar argument: neither
        torch.full((3,), 2.0)            # a fill from a scalar: neither
        float(x.sum())                   # a sync
        torch.tensor([1.0, 2.0])         # an upload
        x[0] = 3.0                       # a Python number assigned into a tensor: an upload
    assert counter.syncs == 1 and counter.uploads == 2, counter.ops


def test_host_values_upload_only_when_the_values_change():
    opt = sd_hina_plugin.HinaAdamWCore([torch.nn.Parameter(torch.zeros(2))])
    with OpCounter() as counter:
        first = opt.host_values("present", [True, False], torch.device("cpu"))
        again = opt.host_values("present", [True, False], torch.device("cpu"))
    assert again is first and counter.uploads == 1
    with OpCounter() as counter:
        changed = opt.host_values("present", [True, True], torch.device("cpu"))
    assert counter.uploads == 1 and changed.tolist() == [True, True]


def test_numels_are_built_without_an_upload():
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((3, 4), (3, 4), (5,), ())]
    pack = Pack(0, torch.device("cpu"), torch.float32, False, params)
    with OpCounter() as counter:
        numels = pack.numels()
    assert counter.uploads == 0 and numels.tolist() == [12.0, 12.0, 5.0, 1.0]


def _spread_reference(pack: Pack, values: torch.Tensor, kind: str) -> torch.Tensor:
    """Element by element: the value of the element's tensor, row or column (padding: the tensor's last one)."""
    out = torch.empty(pack.total)
    for i, (p, start) in enumerate(zip(pack.params, pack.offsets)):
        b = next(b for b in pack.buckets if b.first <= i < b.first + b.count)
        for k in range(b.seg):
            row, col = divmod(min(k, p.numel() - 1), b.n_cols)
            if kind == "tensor":
                out[start + k] = values[i]
            elif kind == "rows":
                out[start + k] = values[pack.row_offsets[i] + row]
            else:
                out[start + k] = values[pack.col_offsets[i] + col]
    return out


def test_spread_broadcasts_per_tensor_row_and_column_values_in_every_form():
    """Pack.spread / spread_rows / spread_cols (the compiled step's per-tensor, per-row and per-column factors) give
    every element the value of its tensor, row and column, padding included, in every form: one broadcast
    (segments of one size; one bucket for rows and columns), a broadcast per bucket (a few sizes) and a gather
    (many sizes; several buckets for rows and columns)."""
    gather = [(n, 3) for n in range(1, Pack.CAT_BUCKETS + 3)] + [(7,), ()]
    cases = [  # (shapes, 8-bit state: segments padded to 256-element blocks, the per-tensor form expected)
        ([(4, 6), (6, 4), (4, 6), (24,), (2, 3, 2, 2)], False, "uniform"),
        ([(4, 6), (4, 6), (4, 6)], False, "uniform"),
        ([(4, 6), (3,), (4, 6), (2, 3, 3, 3), (5, 1)], False, "cat"),
        (gather, False, "gather"),
        ([(4, 6), (3,), (2, 3, 3, 3)], True, "uniform"),
        ([(20, 20), (20, 20)], True, "uniform"),
        ([(20, 20), (4, 6), (30, 30), (20, 20)], True, "cat"),
        ([(100 * n, 3) for n in range(1, Pack.CAT_BUCKETS + 3)], True, "gather"),
    ]
    for shapes, quantized, mode in cases:
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        (pack,) = plan_packs(0, params, lambda numel: quantized)
        assert pack.spread_mode() == mode, (shapes, quantized)
        pack.index_tensors({"rows", "cols"})
        per_tensor = torch.randn(len(pack.params))
        rows, cols = torch.randn(pack.total_rows), torch.randn(pack.total_cols)
        assert torch.equal(pack.spread(per_tensor), _spread_reference(pack, per_tensor, "tensor"))
        assert torch.equal(pack.spread_rows(rows), _spread_reference(pack, rows, "rows"))
        assert torch.equal(pack.spread_cols(cols), _spread_reference(pack, cols, "cols"))
