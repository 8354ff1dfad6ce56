"""A tiny run of the built-in benchmark: outputs exist and parse."""

from __future__ import annotations

import json

import pytest
import torch

from sd_hina_plugin import cli
from sd_hina_plugin.bench.runner import BASELINE, parse_optimizer


def test_tiny_bench_writes_table_json_plots_and_tensorboard(tmp_path, capsys):
    out = tmp_path / "results"
    code = cli.main(["bench", "--task", "rosenbrock", "--task", "quadratic", "--optimizer", "HinaAdamWCore",
                     "--optimizer", "HinaAdamWOptimizer:optim_bits=32", "--optimizer", "NoSuchOptimizer",
                     "--steps", "12", "--seeds", "2", "--lr-multipliers", "0.5,1", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 2 * 3 * 2 * 2  # tasks x optimizers (+ AdamW baseline) x lrs x seeds
    assert "NoSuchOptimizer" in results["skipped"]
    for task in ("rosenbrock", "quadratic"):
        rows = {row["optimizer"]: row for row in results["summary"][task]}
        assert set(rows) == {BASELINE, "HinaAdamWCore", "HinaAdamWOptimizer:optim_bits=32"}
        assert rows[BASELINE]["steps_to_90"] is not None
        assert len(rows["HinaAdamWCore"]["lr_sweep"]) == 2
        # HinaAdamWCore computes what torch.optim.AdamW computes
        assert rows["HinaAdamWCore"]["final_mean"] == pytest.approx(rows[BASELINE]["final_mean"], rel=1e-4)
    table = (out / "table.md").read_text()
    assert "| HinaAdamWCore |" in table and "skipped NoSuchOptimizer" in table
    pytest.importorskip("matplotlib")
    assert (out / "curves_rosenbrock.png").stat().st_size > 1000
    pytest.importorskip("tensorboard")
    assert list((out / "tb" / "quadratic").rglob("*tfevents*"))
    assert "results in" in capsys.readouterr().out


def test_optimizer_spec_parsing():
    assert parse_optimizer("HinaAdamWOptimizer:optim_bits=32,use_spd=False") == (
        "HinaAdamWOptimizer", {"optim_bits": 32, "use_spd": False})
    assert parse_optimizer("torch.AdamW") == ("torch.AdamW", {})


def test_unknown_task_is_rejected(capsys):
    assert cli.main(["bench", "--task", "nope", "--quick"]) == 2
    assert "available" in capsys.readouterr().err


def _bench_step_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_step.py"
    spec = importlib.util.spec_from_file_location("bench_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_cost_script_reports_per_round_ratios(tmp_path):
    """scripts/bench_step.py on the LoRA set, a few rounds: the reference's ratio is exactly 1, each row's
    quartiles bracket its median ratio, and our optimizer makes no host sync in a step."""
    bench_step = _bench_step_module()
    out = tmp_path / "rows.json"
    assert bench_step.main(["--set", "lora", "--opt", "HinaAdamWCore", "--reps", "4", "--warmup", "1", "--json", str(out)]) == 0
    rows = {row["optimizer"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"torch.AdamW", "HinaAdamWCore"}
    assert rows["torch.AdamW"]["x_adamw_foreach"] == 1.0 and rows["torch.AdamW"]["x_quartiles"] == [1.0, 1.0]
    core = rows["HinaAdamWCore"]
    assert core["x_quartiles"][0] <= core["x_adamw_foreach"] <= core["x_quartiles"][1]
    assert core["syncs_per_step"] == 0 and core["uploads_per_step"] == 0 and core["state_bytes_per_param"] == 8.0


def test_step_cost_script_compile_rows(tmp_path):
    """--compile: a compile=True row after each of our optimizers (not after the baselines), timed after a warm-up
    long enough for its graphs, with its syncs counted by the profiler (none) and no op count."""
    bench_step = _bench_step_module()
    assert bench_step.with_compiled(["torch.AdamW.fused", "HinaAdamWCore:optim_bits=32"]) == [
        "torch.AdamW.fused", "HinaAdamWCore:optim_bits=32", "HinaAdamWCore:optim_bits=32,compile=True"]
    out = tmp_path / "rows.json"
    assert bench_step.main(["--set", "lora", "--opt", "HinaAdamWCore", "--compile", "--reps", "2", "--warmup", "1",
                            "--json", str(out)]) == 0
    rows = {row["optimizer"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"torch.AdamW", "HinaAdamWCore", "HinaAdamWCore:compile=True"}
    compiled = rows["HinaAdamWCore:compile=True"]
    # (uploads: the lr and the step's scalars, which dynamo wraps in 0-d CPU tensors as the graph's inputs)
    assert compiled["ops_per_step"] is None and compiled["syncs_per_step"] == 0
    assert compiled["warmup_s"] > 0 and rows["HinaAdamWCore"]["ops_per_step"] > 0


def test_step_cost_script_drops_the_same_modules_for_every_optimizer(tmp_path):
    """--module-dropout: in a round, both factors of a dropped module have no gradient, in every optimizer's copy."""
    import random

    bench_step = _bench_step_module()
    grads = [torch.ones(1) for _ in range(6)]
    entries = [{"params": [torch.nn.Parameter(torch.zeros(1)) for _ in range(6)], "grads": grads} for _ in range(2)]
    seen = set()
    rng = random.Random(0)
    for _ in range(20):
        bench_step.drop_modules(entries, 0.5, rng)
        pattern = [p.grad is None for p in entries[0]["params"]]
        assert pattern == [p.grad is None for p in entries[1]["params"]]
        assert pattern[0::2] == pattern[1::2]  # down and up of a module together
        seen.add(tuple(pattern))
    assert len(seen) > 2
    out = tmp_path / "rows.json"
    assert bench_step.main(["--set", "lora", "--opt", "HinaAdamWCore", "--reps", "2", "--warmup", "1",
                            "--module-dropout", "0.3", "--json", str(out)]) == 0
    core = {row["optimizer"]: row for row in json.loads(out.read_text())}["HinaAdamWCore"]
    assert core["syncs_per_step"] == 0


def test_step_cost_ablation_flips_each_switch_once():
    """--ablate: the given configuration, then one copy per distinct technique switch of the class, flipped from
    its value in that configuration; the other arguments are kept."""
    from sd_hina_plugin.registry import resolve

    bench_step = _bench_step_module()
    specs = bench_step.ablations("HinaAdamWOptimizer:optim_bits=32,use_spd=False")
    assert specs[0] == "HinaAdamWOptimizer:optim_bits=32,use_spd=False"
    switches = {t.switch.name for t in resolve("HinaAdamWOptimizer").cls.TECHNIQUES if t.switch is not None}
    flipped = {}
    for text in specs[1:]:
        name, kwargs = bench_step.parse_opt(text)
        assert name == "HinaAdamWOptimizer" and kwargs["optim_bits"] == 32
        changed = {k: v for k, v in kwargs.items() if k != "optim_bits" and (k, v) != ("use_spd", False)}
        if not changed:  # use_spd itself, flipped back on
            assert kwargs["use_spd"] is True
            changed = {"use_spd": True}
        assert len(changed) == 1
        flipped.update(changed)
    assert set(flipped) == switches and len(specs) == 1 + len(switches)
    assert flipped["use_alora"] is False and flipped["use_orthogonal_grad"] is True  # on -> off, off -> on
    assert bench_step.ablations("HinaAdamWCore") == ["HinaAdamWCore"]  # no switches: only itself
    with pytest.raises(SystemExit, match="baseline"):
        bench_step.ablations("torch.AdamW")


def test_step_cost_ablation_run(tmp_path):
    bench_step = _bench_step_module()
    out = tmp_path / "rows.json"
    assert bench_step.main(["--set", "lora", "--ablate", "Automagic_Sinkgd:warmup_steps=0", "--reps", "2", "--warmup", "1",
                            "--json", str(out)]) == 0
    rows = [row["optimizer"] for row in json.loads(out.read_text())]
    assert rows == ["torch.AdamW", "Automagic_Sinkgd:warmup_steps=0", "Automagic_Sinkgd:warmup_steps=0,orthograd=True",
                    "Automagic_Sinkgd:warmup_steps=0,full_finetune=True"]


def test_convergence_ablation_expands_switches_and_phases():
    """sd-hina bench --ablate: the configuration, each use_* and technique switch flipped once, no warm-up phase,
    a fixed lr mask where the mask has no switch, and no weight decay; other arguments kept."""
    from sd_hina_plugin.bench.ablation import ablations, parse_spec

    specs = ablations("Automagic_CameAMP:eta=3.0", phases=True)
    assert specs[0] == "Automagic_CameAMP:eta=3.0"
    changes = []
    for text in specs[1:]:
        name, kwargs = parse_spec(text)
        assert name == "Automagic_CameAMP" and kwargs.pop("eta") == 3.0 and len(kwargs) == 1
        changes.append(kwargs)
    flipped = {k: v for c in changes for k, v in c.items()}
    assert flipped["use_orthogonal_grad"] is True and flipped["use_tam"] is True  # off by default: switched on
    assert flipped["use_grams"] is False and flipped["use_agr"] is False and flipped["full_finetune"] is True
    assert {"warmup_steps": 0} in changes and {"lr_bump": 0.0} in changes and {"weight_decay": 0.0} in changes
    masked = ablations("AdamW_HinaAdaptive", phases=True)
    assert "AdamW_HinaAdaptive:use_lr_mask=False" in masked and not any("lr_bump" in s for s in masked)
    with pytest.raises(ValueError, match="baseline"):
        ablations("torch.AdamW", phases=True)


def test_bench_ablate_command_runs_every_row(tmp_path):
    from sd_hina_plugin import cli
    from sd_hina_plugin.bench.ablation import ablations

    out = tmp_path / "abl"
    assert cli.main(["bench", "--task", "quadratic", "--ablate", "Automagic_Sinkgd", "--steps", "3", "--seeds", "1",
                     "--lr-multipliers", "1", "--out", str(out)]) == 0
    rows = {row["optimizer"] for row in json.loads((out / "results.json").read_text())["summary"]["quadratic"]}
    assert rows == {"torch.AdamW", *ablations("Automagic_Sinkgd", phases=True)}
    assert cli.main(["bench", "--task", "quadratic", "--ablate", "torch.AdamW", "--out", str(tmp_path / "x")]) == 2


def test_optimizer_specs_take_tuple_values():
    """NAME:k=(a,b),k2=v: commas inside parentheses belong to the value (a plain split broke lr_mask_bounds=(0.1,3.0))."""
    assert parse_optimizer("Automagic_Sinkgd:lr_mask_bounds=(0.1,3.0),beta1=0.9") == (
        "Automagic_Sinkgd", {"lr_mask_bounds": (0.1, 3.0), "beta1": 0.9})
    assert parse_optimizer("Automagic_CameAMP:betas=(0.9,0.99,0.999)") == ("Automagic_CameAMP", {"betas": (0.9, 0.99, 0.999)})
    assert parse_optimizer("torch.AdamW") == ("torch.AdamW", {})


def test_plots_mark_curves_that_lie_on_another():
    """On small tasks the 8-bit names keep 32-bit state and draw their fp32 twin's curve, and HinaAdamWCore draws
    torch AdamW's: such a curve is dashed on top of the other and its legend entry says so."""
    from sd_hina_plugin.bench.runner import curve_twins, line_styles

    curves = {"Automagic_CameAMP8bit": [0.9, 0.4, 0.2], "torch.AdamW": [1.0, 0.5, 0.25],
              "Automagic_CameAMP": [0.9, 0.4, 0.2], "HinaAdamWCore": [1.0, 0.5, 0.25 * (1 + 1e-5)],
              "Automagic_Sinkgd": [1.0, 0.3, 0.1]}
    twins = curve_twins(curves)
    assert set(twins) == {"Automagic_CameAMP8bit", "HinaAdamWCore"}
    assert twins["Automagic_CameAMP8bit"] == ("Automagic_CameAMP", 0.0)
    assert twins["HinaAdamWCore"][0] == BASELINE and twins["HinaAdamWCore"][1] == pytest.approx(1e-5)
    pytest.importorskip("matplotlib")
    styles = line_styles([{"optimizer": name, "best_lr": 1e-3} for name in curves], curves)
    assert "[same curve as Automagic_CameAMP]" in styles["Automagic_CameAMP8bit"]["label"]
    assert f"[on {BASELINE}'s curve: within less than 0.01%]" in styles["HinaAdamWCore"]["label"]
    for twin, ref in (("Automagic_CameAMP8bit", "Automagic_CameAMP"), ("HinaAdamWCore", BASELINE)):
        assert styles[twin]["linestyle"] != styles[ref]["linestyle"] and styles[twin]["zorder"] > styles[ref]["zorder"]
    assert "[" not in styles["Automagic_Sinkgd"]["label"] and "[" not in styles["Automagic_CameAMP"]["label"]


def _small_encoder_task(seed: int):
    from sd_hina_plugin.bench.encoder import encoder_lora

    return encoder_lora(seed, pretrain_steps=30, width=32, layers=1, batch=8, context=16, heldout=32)


def test_encoder_lora_task_runs_in_the_bench(tmp_path, monkeypatch):
    """The encoder-lora task (here with a small base model) through `sd-hina bench`: its LoRA factors and the trained
    head reach the optimizer under PEFT's names, the pretraining lowered the LM loss, and the fine-tune lowers the
    held-out loss."""
    from sd_hina_plugin.bench import tasks
    from sd_hina_plugin.bench.encoder import CLASS_MODULES, pretrained
    from sd_hina_plugin.lora.names import Role, classify

    monkeypatch.setitem(tasks.TASKS, "encoder-lora", (_small_encoder_task,) + tasks.TASKS["encoder-lora"][1:])
    problem = _small_encoder_task(0)
    roles = [classify(name).role for name, _ in problem.named]
    assert roles.count(Role.LORA_A) == roles.count(Role.LORA_B) == 2  # query and value of the one layer
    head = [name for name, _ in problem.named if "classifier" in name]
    assert head == ["base_model.model.classifier.modules_to_save.default.weight",
                    "base_model.model.classifier.modules_to_save.default.bias"]
    assert dict(problem.named)[head[0]].shape == (len(CLASS_MODULES), 32)
    _, start, end = pretrained(32, 1, 16, 30)
    assert end < start - 0.5
    out = tmp_path / "results"
    assert cli.main(["bench", "--task", "encoder-lora", "--optimizer", "AdamW_HinaAdaptive", "--steps", "30",
                     "--seeds", "1", "--lr-multipliers", "3", "--out", str(out)]) == 0
    rows = {row["optimizer"]: row for row in json.loads((out / "results.json").read_text())["summary"]["encoder-lora"]}
    assert set(rows) == {BASELINE, "AdamW_HinaAdaptive"}
    for row in rows.values():
        assert row["final_mean"] < row["initial"]


def test_encoder_lora_task_is_what_peft_builds():
    """attach_lora gives the trainable parameters, names and forward pass of get_peft_model with the same LoraConfig."""
    import copy

    peft = pytest.importorskip("peft")
    from sd_hina_plugin.bench.encoder import CharTransformer, TextClassifier, attach_lora

    torch.manual_seed(0)
    model = TextClassifier(CharTransformer(32, 2, 16), 4)
    ours_model, peft_model = copy.deepcopy(model), copy.deepcopy(model)
    ours = attach_lora(ours_model, rank=8, alpha=16.0)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                             modules_to_save=["classifier"])
    peft_model = peft.get_peft_model(peft_model, config)
    theirs = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert sorted((n, p.shape) for n, p in ours) == sorted((n, p.shape) for n, p in theirs.items())
    for name, p in ours:  # PEFT zero-initialises B: give every trained tensor a value, the same in both models
        assert torch.equal(p, theirs[name]) or "lora_" in name
        with torch.no_grad():
            p.normal_()
            theirs[name].copy_(p)
    idx = torch.randint(0, 96, (3, 16))
    torch.testing.assert_close(ours_model(idx), peft_model(idx))
