"""kohya integration checks that need to look inside the trainer's process, against a stand-in of kohya's
trainer (tests/kohya_fake); the real, unmodified sd-scripts runs in tests/kohya_e2e (marker kohya_e2e).

What stays here, and why the real trainer cannot replace it: the count of losses the hook hands the optimizer
(``observe_loss``), in kohya's trainer and in a subclassed one (the real trainer's optimizer is in another
process, and the loss leaves no trace in its logs); that nothing is called without logging; the hook's
behaviour outside kohya; the launcher's name rewriting; and the --full_bf16 construction order, in a second.
These run in the default test run, which has no sd-scripts virtualenv."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd_hina_plugin import registry
from sd_hina_plugin.kohya import attach

FAKE = Path(__file__).resolve().parents[1] / "kohya_fake"


FAKE_MODULES = ("train_network", "sdxl_train_network", "library", "library.train_util", "networks", "networks.lora")


@pytest.fixture
def kohya(monkeypatch):
    """The stand-in kohya tree on sys.path; its modules are removed afterwards, so that later tests do not
    run as if inside kohya."""
    monkeypatch.syspath_prepend(str(FAKE))
    for name in FAKE_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    import train_network

    yield train_network
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)


def _args(train_network, *argv):
    return train_network.setup_parser().parse_args(list(argv))


def _event_tags(logdir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for root, _, files in os.walk(logdir):
        for f in files:
            if "tfevents" in f:
                acc = EventAccumulator(os.path.join(root, f))
                acc.Reload()
                tags |= set(acc.Tags()["scalars"])
    return tags


def test_auto_hook_feeds_the_loss_and_works_in_a_subclassed_trainer(kohya, tmp_path):
    import sdxl_train_network

    args = _args(kohya, "--optimizer_type", "support.LossObservingAdamW", "--logging_dir", str(tmp_path))
    trainer = sdxl_train_network.SdxlNetworkTrainer().train(args)
    assert trainer.optimizer.optimizer.observed == trainer.losses
    assert "hina/lr/unet" in _event_tags(tmp_path)


def test_coptim_gets_the_step_loss_and_logs_its_context(kohya, tmp_path):
    args = _args(kohya, "--optimizer_type", "sd_hina_plugin.Automagic_CameAMP_COptim8bit", "--logging_dir", str(tmp_path),
                 "--optimizer_args", "min_8bit_size=0")
    trainer = kohya.NetworkTrainer().train(args)
    inner = trainer.optimizer.optimizer
    assert inner.c_optim.losses == len(trainer.losses) - 1  # the first step only initialises
    tags = _event_tags(tmp_path)
    assert {"hina/coptim/lr_multiplier", "hina/coptim/edge", "hina/coptim/consistency", "hina/avg_lr/unet"} <= tags


def test_without_logging_nothing_is_called(kohya):
    args = _args(kohya, "--optimizer_type", "support.LossObservingAdamW")
    trainer = kohya.NetworkTrainer().train(args)
    assert trainer.logged == [] and not hasattr(trainer.optimizer.optimizer, "observed")
    assert trainer.losses[-1] < trainer.losses[0]


def test_outside_kohya_attach_is_silent_and_inside_without_trainer_says_so(monkeypatch, caplog):
    import sd_hina_plugin.kohya.hook as hook

    opt = registry.resolve("HinaAdamWCore").cls([torch.nn.Parameter(torch.zeros(2))])
    with caplog.at_level(logging.WARNING, logger="sd_hina_plugin"):
        assert attach(opt) is False
    assert caplog.text == ""
    monkeypatch.setitem(sys.modules, "library.train_util", object())
    monkeypatch.setattr(hook, "_warned", [])
    with caplog.at_level(logging.WARNING, logger="sd_hina_plugin"):
        assert attach(opt) is False
        assert attach(opt) is False
    assert caplog.text.count("accelerator.log(sd_hina_plugin.stats(optimizer)") == 1


class _Accelerator:
    """What the hook needs of accelerate's Accelerator in a full fine-tune script: ``log`` and ``trackers``."""

    def __init__(self):
        self.trackers = ["tensorboard"]
        self.logged = []

    def log(self, values, step=None, log_kwargs=None):
        self.logged.append((dict(values), step))


def _full_finetune_train(args, blocks):
    """The shape of kohya's sdxl_train.py / flux_train.py ``train(args)``: the accelerator first, then one optimizer
    per block (``--fused_optimizer_groups``), each built through get_optimizer (here: the class itself)."""
    accelerator = _Accelerator()
    optimizers = [registry.resolve(args.optimizer_type).cls([{"params": list(block.parameters()), "lr": 1e-3}])
                  for block in blocks]
    for step in range(3):
        for block in blocks:
            for p in block.parameters():
                p.grad = torch.randn_like(p)
        for opt in optimizers:
            opt.step()
        accelerator.log({"loss": 0.5, "lr/unet": 1e-3}, step=step)
    accelerator.log({"loss/epoch": 0.5}, step=1)
    return accelerator, optimizers


def test_full_finetune_scripts_log_one_merged_set_for_per_block_optimizers():
    import types

    blocks = [torch.nn.Linear(4, 4) for _ in range(3)]
    args = types.SimpleNamespace(optimizer_type="Automagic_CameAMP")
    accelerator, optimizers = _full_finetune_train(args, blocks)
    step_logs = [values for values, _ in accelerator.logged if "loss" in values]
    assert len(step_logs) == 3 and "hina/lr/block00" not in accelerator.logged[-1][0]  # epoch logs left alone
    for values in step_logs:
        assert {"hina/lr/block00", "hina/lr/block01", "hina/lr/block02", "hina/nonfinite_skipped"} <= values.keys()
        assert values["loss"] == 0.5 and values["lr/unet"] == 1e-3
    assert "hina/avg_lr/block02" in step_logs[-1]
    one = _full_finetune_train(args, blocks[:1])[0]
    assert "hina/lr/group0" in one.logged[0][0]  # a single optimizer keeps its group names


def _launch(*argv, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FAKE.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "sd_hina_plugin.kohya.launcher", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_launcher_rewrites_only_our_names():
    from sd_hina_plugin.kohya.launcher import resolve_optimizer_type, rewrite_arguments

    assert resolve_optimizer_type("hinaadamw") == "sd_hina_plugin.HinaAdamWOptimizer"
    assert resolve_optimizer_type("AdamW8bit") == "AdamW8bit"
    assert resolve_optimizer_type("bitsandbytes.optim.AdEMAMix8bit") == "bitsandbytes.optim.AdEMAMix8bit"
    assert rewrite_arguments(["--optimizer_type=CustomAdamW", "--x", "1"])[0] == "--optimizer_type=sd_hina_plugin.HinaAdamWOptimizer"


def test_full_bf16_cast_after_construction_is_checked_at_the_first_step():
    """kohya's train_network builds the optimizer, then casts the network for --full_bf16: the bf16-only
    optimizer accepts fp32 parameters there and checks them at its first step. Elsewhere it refuses at once."""
    import argparse

    from sd_hina_plugin import AdamWBF16_HinaAdaptive

    class Trainer:
        def generate_step_logs(self, *a, **k):
            return {}

    def train(self, args, network):  # the locals kohya's NetworkTrainer.train has
        return AdamWBF16_HinaAdaptive(network.parameters(), lr=1e-3)

    network = torch.nn.Linear(4, 4)
    with pytest.raises(TypeError, match="needs bfloat16"):
        train(Trainer(), argparse.Namespace(full_bf16=False, full_fp16=False), network)
    with pytest.raises(TypeError, match="needs bfloat16"):
        AdamWBF16_HinaAdaptive(network.parameters(), lr=1e-3)
    optimizer = train(Trainer(), argparse.Namespace(full_bf16=True, full_fp16=False), network)
    network.to(torch.bfloat16)
    network(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    late = train(Trainer(), argparse.Namespace(full_bf16=True, full_fp16=False), torch.nn.Linear(4, 4))
    for p in late.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="needs bfloat16"):
        late.step()


def test_the_step_loss_is_not_used_by_several_processes(monkeypatch):
    """kohya logs (and so hands over the loss) on the main process only: under several processes the COptim context
    must not follow it, or the ranks' lr multipliers, and so their replicas, would drift apart."""
    import torch.distributed as dist

    from sd_hina_plugin.kohya.hook import feed_loss

    opt = registry.resolve("Automagic_CameAMP_COptim").cls([torch.nn.Parameter(torch.zeros(2))])
    seen = []
    opt.observe_loss = seen.append
    feed_loss(opt, 0.5)
    assert seen == [0.5]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    feed_loss(opt, 0.25)
    assert seen == [0.5]
