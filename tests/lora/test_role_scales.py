"""Per-role scales against their formulas, computed densely here; factored norms; LoKr stats; name discovery."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from adapter_networks import KohyaLoRANetwork, TinyTextEncoder, TinyUNet
from support import RoleScaledAdamW

from sd_hina_plugin import HinaAdamWCore
from sd_hina_plugin.diagnostics import count_step
from sd_hina_plugin.lora import discovery
from sd_hina_plugin.lora.factors import as_matrices, batched_row_norms, product_fro_norms


# Deltas are measured as p_new - p_old on weights of magnitude <= 2, which carries up to ~2.4e-7 of fp32
# rounding; compare with that absolute tolerance.
ATOL = 3e-7


def _net():
    torch.manual_seed(0)
    net = KohyaLoRANetwork(TinyUNet(), [TinyTextEncoder()])
    with torch.no_grad():
        for lora in net.unet_loras + net.text_encoder_loras:
            lora.lora_up.weight.normal_(0, 0.05)  # non-zero B so that B A has structure
    return net


def _first_step_deltas(net, **kwargs):
    """Parameter change of one step of RoleScaledAdamW(kwargs) and of the plain AdamW core, same grads."""
    named = list(net.named_parameters())
    start = {n: p.detach().clone() for n, p in named}
    torch.manual_seed(1)
    grads = {n: torch.randn_like(p) for n, p in named}
    deltas = []
    for opt_cls, kw in ((RoleScaledAdamW, kwargs), (HinaAdamWCore, {"weight_decay": 0.0})):
        with torch.no_grad():
            for n, p in named:
                p.copy_(start[n])
                p.grad = grads[n].clone()
        opt = opt_cls([p for _, p in named], lr=1e-3, **kw)
        if opt_cls is RoleScaledAdamW:
            opt.attach_names(named)
        opt.step()
        deltas.append({n: p.detach() - start[n] for n, p in named})
    with torch.no_grad():
        for n, p in named:
            p.copy_(start[n])
    return start, deltas[0], deltas[1]


def test_lora_plus_ratio_on_up_only():
    net = _net()
    _, scaled, plain = _first_step_deltas(net, use_plus=True, alora_ratio=16.0)
    for name in scaled:
        factor = 16.0 if ".lora_up." in name else 1.0
        torch.testing.assert_close(scaled[name], factor * plain[name], rtol=1e-5, atol=ATOL)


def test_alora_rows_match_dense_product_formula():
    net = _net()
    start, scaled, plain = _first_step_deltas(net, use_alora_rows=True)
    for lora in net.unet_loras + net.text_encoder_loras:
        down, up = f"{lora.lora_name}.lora_down.weight", f"{lora.lora_name}.lora_up.weight"
        b = start[up].reshape(start[up].shape[0], -1)
        a = start[down].reshape(start[down].shape[0], -1)
        rows = (b @ a).norm(dim=1)  # the dense B A, only here in the test
        expected_up = plain[up] / (1 + rows).view(-1, *([1] * (plain[up].dim() - 1)))
        torch.testing.assert_close(scaled[up], expected_up, rtol=1e-5, atol=ATOL)
        torch.testing.assert_close(scaled[down], plain[down] / (1 + rows.mean()), rtol=1e-5, atol=ATOL)


def test_allora_rows_match_formula_for_linear_conv_and_vectors():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.5) for s in [(6, 10), (4, 3, 3, 3), (7,), (6, 10)]]
    params[3].data.zero_()  # a zero-initialised up factor: every row moves eta times faster
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    deltas = []
    for cls, kw in ((RoleScaledAdamW, {"use_allora": True, "eta": 2.0}), (HinaAdamWCore, {"weight_decay": 0.0})):
        for p, s, g in zip(params, start, grads):
            p.data.copy_(s)
            p.grad = g.clone()
        cls(params, lr=1e-3, **kw).step()
        deltas.append([p.detach() - s for p, s in zip(params, start)])
    for s, scaled, plain in zip(start, *deltas):
        rows = s.reshape(s.shape[0], -1) if s.dim() >= 2 else s.reshape(-1, 1)
        scale = 1.0 / torch.sqrt(rows.pow(2).sum(1) + 1.0 / 2.0 ** 2)
        expected = plain.reshape(rows.shape[0], -1) * scale[:, None]
        torch.testing.assert_close(scaled, expected.reshape(s.shape), rtol=1e-5, atol=ATOL)
    torch.testing.assert_close(deltas[0][3], 2.0 * deltas[1][3], rtol=1e-5, atol=ATOL)


def test_role_scales_keep_op_count_and_no_syncs():
    counts = []
    for copies in (1, 2):
        nets = [_net() for _ in range(copies)]
        named = [(f"n{i}.{n}", p) for i, net in enumerate(nets) for n, p in net.named_parameters()]
        opt = RoleScaledAdamW([p for _, p in named], use_plus=True, use_alora_rows=True, use_allora=True)
        opt.attach_names(named)
        for _ in range(3):
            for _, p in named:
                p.grad = torch.randn_like(p)
            counter = count_step(opt)
        assert counter.syncs == 0, counter.sync_ops()
        counts.append(counter.total)
    assert counts[0] == counts[1], counts


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 9), r=st.integers(1, 5), cols=st.integers(1, 9), k=st.integers(1, 3))
def test_factored_norms_equal_dense(out, r, cols, k):
    torch.manual_seed(1000 * out + 100 * r + 10 * cols + k)  # one draw per example: no flaky reruns
    bs = [torch.randn(out, r) for _ in range(k)] + [torch.randn(out, r, 1, 1)]
    as_ = [torch.randn(r, cols) for _ in range(k)] + [torch.randn(r, cols, 1, 1)]
    dense = [b.reshape(out, r) @ a.reshape(r, -1) for b, a in zip(bs, as_)]
    rows = batched_row_norms(as_matrices(bs[:k]), as_matrices(as_[:k]))  # one same-shape batch
    for r, d in zip(rows, dense[:k]):
        torch.testing.assert_close(r, d.norm(dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(product_fro_norms(bs, as_), torch.stack([d.norm() for d in dense]), rtol=1e-4, atol=1e-5)


def test_row_norms_stay_accurate_when_a_row_of_ba_nearly_vanishes():
    """Rank-1 A and a B row almost orthogonal to it (true norm 8e-6 against terms ~1). The quadratic form
    b (A A^T) b^T evaluated in fp32 cancels to noise; the Cholesky form stays within the documented bound
    (fp32 rounding plus the jitter a semi-definite Gram matrix needs): 4e-7 ||b_i|| ||A||_F."""
    a = torch.tensor([[0.6], [0.8], [0.0]])                  # (r=3, in=1)
    b = torch.tensor([[0.8, -0.6 + 1e-5, 5.0], [1.0, 2.0, 0.0]])  # row 0 . a = 8e-6
    dense = (b.double() @ a.double()).norm(dim=1)
    bound = 4e-7 * b.double().norm(dim=1) * a.double().norm()
    rows = batched_row_norms(b[None], a[None])[0]
    assert ((rows.double() - dense).abs() <= bound).all(), (rows, dense, bound)
    quadratic = ((b @ (a @ a.T)) * b).sum(1).clamp_min(0).sqrt()  # the fp32 quadratic form
    assert (quadratic.double() - dense).abs()[0] > 2 * bound[0]  # it cancels to 0
    torch.testing.assert_close(product_fro_norms([b], [a]).double(), (b.double() @ a.double()).norm()[None], rtol=1e-4, atol=1e-7)


def test_row_norms_of_lora_shaped_factors_match_the_dense_product():
    """Full-rank LoRA-shaped factors (rank 16, 768 wide, conv kernels as matrices): relative accuracy 1e-5,
    and a module whose A is zero (rank 0) gives zero norms, not NaN."""
    torch.manual_seed(7)
    b = torch.randn(5, 768, 16) * 0.01
    a = torch.randn(5, 16, 768) * 0.02
    a[3] = 0.0
    b[4, :, 8:] = 0.0
    a[4, 8:] = a[4, 0]  # rank-deficient A (repeated rows)
    dense = torch.linalg.vector_norm(torch.bmm(b.double(), a.double()), dim=-1)
    rows = batched_row_norms(b, a, {})
    assert torch.isfinite(rows).all()
    assert (rows[3] == 0).all()
    torch.testing.assert_close(rows.double(), dense, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lokr_stats_equal_kronecker_product_norms(dtype):
    lycoris = pytest.importorskip("lycoris")
    from adapter_networks import base_module

    net = lycoris.create_lycoris(base_module(), 1.0, 4, 1, algo="lokr", factor=8)
    net.apply_to()
    net.to(dtype)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for _, p in named:
            p.normal_(0, 0.1)
    opt = RoleScaledAdamW([p for _, p in named]).attach_names(named)
    stats = opt.lokr_stats(per_module=True)
    params = dict(named)
    krons = []
    for module in sorted({n.rsplit(".", 1)[0] for n in params}):
        w1 = params[f"{module}.lokr_w1"]
        w2 = params.get(f"{module}.lokr_w2")
        if w2 is None:
            w2 = params[f"{module}.lokr_w2_a"] @ params[f"{module}.lokr_w2_b"]
        kron = torch.kron(w1.float().reshape(w1.shape[0], -1), w2.float().reshape(w2.shape[0], -1))  # dense, test only
        krons.append(kron.norm().item())
        assert stats[f"hina/lokr/{module}/kron_norm"] == pytest.approx(krons[-1], rel=1e-4 if dtype == torch.float32 else 2e-2)
    assert stats["hina/lokr/kron_norm_mean"] == pytest.approx(sum(krons) / len(krons), rel=1e-4 if dtype == torch.float32 else 2e-2)
    assert "hina/lokr/kron_norm_mean" in opt.stats()


# -- name discovery --------------------------------------------------------------------------------------------

class MinimalTrainer:
    """kohya's NetworkTrainer as the optimizer sees it: ``generate_step_logs`` and a ``train`` whose frame
    holds ``network`` when it calls get_optimizer."""

    def generate_step_logs(self, args, current_loss, avr_loss, lr_scheduler, lr_descriptions, optimizer=None, **kwargs):
        return {"loss/current": current_loss}

    def get_optimizer(self, trainable_params):
        return RoleScaledAdamW(trainable_params, lr=1e-4, use_plus=True)

    def train(self):
        network = KohyaLoRANetwork(TinyUNet(), [TinyTextEncoder()])
        trainable_params, lr_descriptions = network.prepare_optimizer_params(5e-5, 1e-4)
        optimizer = self.get_optimizer(trainable_params)
        return network, optimizer


def test_names_found_in_kohya_trainer_frame():
    network, opt = MinimalTrainer().train()
    assert opt.lora.source == "kohya frame"
    assert opt.lora.name_of[id(network.unet_loras[0].lora_up.weight)] == f"{network.unet_loras[0].lora_name}.lora_up.weight"
    assert opt.diagnose_lora_pairing()["unpaired"] == []


def test_names_found_by_module_scan():
    net = KohyaLoRANetwork(TinyUNet(), [TinyTextEncoder()])
    found = discovery.names_from_module_scan(net.parameters())
    assert found == {id(p): n for n, p in net.named_parameters()}


def test_attach_names_rejects_foreign_names():
    opt = RoleScaledAdamW([torch.nn.Parameter(torch.zeros(3, 3))])
    with pytest.raises(ValueError, match="none of the given names"):
        opt.attach_names([("x.lora_up.weight", torch.nn.Parameter(torch.zeros(3, 3)))])


def test_module_scan_is_the_fallback_inside_kohya(monkeypatch):
    import sys
    import types

    net = KohyaLoRANetwork(TinyUNet(), [TinyTextEncoder()])
    assert RoleScaledAdamW(net.parameters()).lora.source == "shape rules"  # outside kohya: no scan
    monkeypatch.setitem(sys.modules, "library.train_util", types.ModuleType("library.train_util"))
    opt = RoleScaledAdamW(net.parameters())
    assert opt.lora.source == "module scan" and opt.diagnose_lora_pairing()["unpaired"] == []
