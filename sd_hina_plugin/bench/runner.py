"""``sd-hina bench``: run optimizers on the built-in tasks, over seeds and a small lr sweep, and report.

For each task, optimizer and lr (the task's Adam-scale base lr times each multiplier) and each seed: a fresh
problem, ``steps`` optimizer steps, the held-out loss every ``eval_every`` steps, the median time of
``optimizer.step()``, and the optimizer's state bytes per parameter. The best lr of each optimizer is the one
with the lowest mean final held-out loss. The table reports:
- final held-out loss (mean ± std over seeds) at that lr;
- the number of steps until the mean held-out curve first reaches 90% of the improvement that the tuned
  AdamW (its best lr) reaches by the end;
- ms per step and state bytes per parameter.

Outputs, under one results directory:
- ``results.json`` (every run);
- ``table.md``;
- ``curves_<task>.png`` (mean and min-max band over seeds, best lr of each optimizer);
- ``tb/<task>/<optimizer>/lr<lr>_seed<seed>`` TensorBoard logs, including each optimizer's ``stats()``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import registry
from ..diagnostics import state_bytes
from .ablation import parse_spec
from .tasks import TASKS

BASELINE = "torch.AdamW"


@dataclass
class Run:
    task: str
    optimizer: str
    lr: float
    seed: int
    steps: list[int] = field(default_factory=list)
    heldout: list[float] = field(default_factory=list)
    ms_per_step: float = math.nan
    state_bytes_per_param: float = math.nan
    diverged: bool = False


#: ``NAME[:k=v,...]`` -> (name, kwargs); tuple values in parentheses, e.g. ``lr_mask_bounds=(0.1,3.0)``
parse_optimizer = parse_spec


def available(text: str) -> tuple[bool, str]:
    """Whether an optimizer spec can run on these fp32 tasks here (and why not)."""
    name, _ = parse_optimizer(text)
    if name == BASELINE:
        return True, ""
    if name == "bnb.AdamW8bit":
        from ..numerics.quant8 import bnb_available

        return bnb_available()
    if name == "Prodigy":
        try:
            import prodigyopt  # noqa: F401
        except ImportError:
            return False, "prodigyopt is not installed"
        return True, ""
    try:
        registry.resolve(name)
    except ValueError as exc:
        return False, str(exc)
    return True, ""


def weight_dtype(text: str) -> torch.dtype:
    """fp32, or the first dtype a dtype-restricted optimizer accepts (AdamWBF16_HinaAdaptive: bf16)."""
    name, _ = parse_optimizer(text)
    try:
        allowed = registry.resolve(name).cls.PARAM_DTYPES
    except ValueError:
        return torch.float32
    return torch.float32 if allowed is None or torch.float32 in allowed else allowed[0]


def build_optimizer(text: str, named: list, lr: float):
    name, kwargs = parse_optimizer(text)
    params = [p for _, p in named]
    if name == BASELINE:
        return torch.optim.AdamW(params, lr=lr, **kwargs)
    if name == "bnb.AdamW8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, **kwargs)
    if name == "Prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(params, lr=lr, **kwargs)
    return registry.create_optimizer(name, named, lr=lr, **kwargs)


def run_one(task: str, text: str, lr: float, seed: int, steps: int, eval_every: int, tb_dir: Path | None) -> Run:
    build = TASKS[task][0]
    problem = build(seed)
    if weight_dtype(text) != torch.float32:
        problem.cast(weight_dtype(text))
    torch.manual_seed(seed)
    opt = build_optimizer(text, problem.named, lr)
    run = Run(task, text, lr, seed, [0], [problem.heldout()])
    writer = _writer(tb_dir)
    times = []
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = problem.loss(i)
        loss.backward()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            value = problem.heldout()
            run.steps.append(i + 1)
            run.heldout.append(value)
            if writer is not None:
                writer.add_scalar("heldout_loss", value, i + 1)
                writer.add_scalar("train_loss", loss.item(), i + 1)
                for key, stat in (opt.stats().items() if hasattr(opt, "stats") else ()):
                    writer.add_scalar(key, stat, i + 1)
            if not math.isfinite(value):
                run.diverged = True
                break
    if writer is not None:
        writer.close()
    run.ms_per_step = statistics.median(times) * 1e3
    numel = sum(p.numel() for _, p in problem.named)
    run.state_bytes_per_param = state_bytes(opt) / numel
    return run


def _writer(tb_dir: Path | None):
    if tb_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(tb_dir))


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="run", dynamic_ncols=True)
    except ImportError:
        class Plain:
            done = 0

            def update(self, n=1):
                self.done += n
                print(f"  {self.done}/{total} runs", flush=True)

            def set_description(self, text):
                pass

            def close(self):
                pass

        return Plain()


def bench(tasks: list[str], optimizers: list[str], steps: int, seeds: int, multipliers: list[float],
          out_dir: Path, eval_every: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_every = eval_every or max(1, steps // 20)
    if BASELINE not in optimizers:
        optimizers = [BASELINE] + optimizers
    skipped = {}
    for text in list(optimizers):
        ok, why = available(text)
        if not ok:
            skipped[text] = why
            optimizers.remove(text)
    runs: list[Run] = []
    jobs = [(t, o, TASKS[t][1] * m, s) for t in tasks for o in optimizers for m in multipliers for s in range(seeds)]
    bar = _progress(len(jobs))
    for task, text, lr, seed in jobs:
        bar.set_description(f"{task} {text} lr={lr:.2g} seed={seed}")
        tb = out_dir / "tb" / task / _slug(text) / f"lr{lr:.3g}_seed{seed}"
        runs.append(run_one(task, text, lr, seed, steps, eval_every, tb))
        bar.update(1)
    bar.close()
    (out_dir / "runs.json").write_text(json.dumps([asdict(r) for r in runs], indent=1))  # kept if a summary step fails
    summary = summarize(runs, tasks, optimizers)
    table = markdown(summary, steps, seeds, multipliers, skipped)
    (out_dir / "table.md").write_text(table)
    (out_dir / "results.json").write_text(json.dumps({"runs": [asdict(r) for r in runs], "summary": summary,
                                                       "skipped": skipped}, indent=1))
    plots = plot(runs, summary, out_dir)
    log(table)
    log(f"results in {out_dir}" + (f" (plots: {', '.join(p.name for p in plots)})" if plots else " (matplotlib not installed: no plots)"))
    return {"summary": summary, "table": table, "skipped": skipped, "out_dir": str(out_dir)}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def _mean_curve(runs: list[Run]) -> tuple[list[int], list[float]]:
    length = min(len(r.heldout) for r in runs)
    return runs[0].steps[:length], [statistics.fmean(r.heldout[i] for r in runs) for i in range(length)]


def summarize(runs: list[Run], tasks: list[str], optimizers: list[str]) -> dict[str, list[dict]]:
    summary: dict[str, list[dict]] = {}
    for task in tasks:
        rows = []
        best_runs: dict[str, list[Run]] = {}
        for text in optimizers:
            by_lr: dict[float, list[Run]] = {}
            for r in runs:
                if r.task == task and r.optimizer == text:
                    by_lr.setdefault(r.lr, []).append(r)
            if not by_lr:
                continue
            score = {lr: (statistics.fmean(r.heldout[-1] for r in rs) if not any(r.diverged for r in rs) else math.inf)
                     for lr, rs in by_lr.items()}
            best_lr = min(score, key=score.get)
            best_runs[text] = by_lr[best_lr]
            finals = [r.heldout[-1] for r in by_lr[best_lr]]
            finite = math.isfinite(score[best_lr])  # False: it diverged at every lr of the sweep
            rows.append({"optimizer": text, "best_lr": best_lr, "final_mean": statistics.fmean(finals) if finite else math.inf,
                         "final_std": statistics.pstdev(finals) if finite and len(finals) > 1 else 0.0,
                         "ms_per_step": statistics.median(r.ms_per_step for r in by_lr[best_lr]),
                         "state_bytes_per_param": by_lr[best_lr][0].state_bytes_per_param,
                         "initial": statistics.fmean(r.heldout[0] for r in by_lr[best_lr]),
                         "lr_sweep": {f"{lr:.3g}": s for lr, s in score.items()}})
        if BASELINE in best_runs:
            _, base_curve = _mean_curve(best_runs[BASELINE])
            target = base_curve[0] - 0.9 * (base_curve[0] - base_curve[-1])
            for row in rows:
                steps_axis, curve = _mean_curve(best_runs[row["optimizer"]])
                reached = [s for s, v in zip(steps_axis, curve) if v <= target]
                row["steps_to_90"] = reached[0] if reached else None
        summary[task] = rows
    return summary


def markdown(summary: dict[str, list[dict]], steps: int, seeds: int, multipliers: list[float], skipped: dict) -> str:
    lines = [f"{steps} steps, {seeds} seed(s), lr = task base lr x {', '.join(f'{m:g}' for m in multipliers)}; "
             f"best lr per optimizer by mean final held-out loss.", ""]
    for task, rows in summary.items():
        lines += [f"**{task}**: {TASKS[task][2]}", "",
                  "| optimizer | best lr | final held-out loss | steps to 90% of tuned AdamW's gain | ms/step | state B/param |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in sorted(rows, key=lambda r: r["final_mean"]):
            reached = row.get("steps_to_90")
            label = row["optimizer"] + (" (bf16 weights)" if weight_dtype(row["optimizer"]) != torch.float32 else "")
            final = f"{row['final_mean']:.4g} ± {row['final_std']:.2g}" if math.isfinite(row["final_mean"]) else "diverged at every lr"
            lines.append(f"| {label} | {row['best_lr']:.3g} | {final} | "
                         f"{reached if reached is not None else 'not reached'} | {row['ms_per_step']:.2f} | "
                         f"{row['state_bytes_per_param']:.2f} |")
        lines.append("")
    for text, why in skipped.items():
        lines.append(f"- skipped {text}: {why}")
    return "\n".join(lines).rstrip() + "\n"


#: mean curves closer than this (largest relative difference) are drawn as one line at the plots' scale
COINCIDE = 2e-3


def curve_twins(curves: dict[str, list[float]], tolerance: float = COINCIDE) -> dict[str, tuple[str, float]]:
    """For each optimizer whose mean curve lies on another's, (that optimizer, largest relative difference; 0.0
    when identical). The other is the baseline where it is one, else an fp32 name before an ``8bit`` name (an
    8-bit name keeps 32-bit state on tensors below ``min_8bit_size``, so on small tasks it equals its twin)."""
    order = sorted(curves, key=lambda o: (o != BASELINE, o.split(":")[0].endswith("8bit")))
    references: list[str] = []
    twins: dict[str, tuple[str, float]] = {}
    for name in order:
        curve = curves[name]
        for ref in references:
            other = curves[ref]
            if len(other) != len(curve):
                continue
            diff = max((abs(a - b) / max(abs(b), 1e-30) for a, b in zip(curve, other)), default=0.0)
            if diff <= tolerance:
                twins[name] = (ref, diff)
                break
        else:
            references.append(name)
    return twins


def line_styles(rows: list[dict], curves: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """matplotlib keywords per optimizer: 10 colours x 4 line styles keep 11+ optimizers apart; baselines black and
    thick; a curve lying on another's (:func:`curve_twins`) dashed on top of it, its legend entry saying so."""
    import matplotlib.pyplot as plt

    styles = ("-", "--", "-.", ":")
    colours = plt.get_cmap("tab10").colors
    twins = curve_twins(curves)
    out = {}
    for k, row in enumerate(rows):
        name = row["optimizer"]
        baseline = name in (BASELINE, "bnb.AdamW8bit")
        label = f"{name} (lr {row['best_lr']:.2g})" + (" [baseline]" if baseline else "")
        style = {"color": "black" if name == BASELINE else colours[k % len(colours)],
                 "linestyle": ":" if name == "bnb.AdamW8bit" else styles[k % len(styles)] if not baseline else "-",
                 "linewidth": 2.4 if baseline else 1.3, "zorder": 3 if baseline else 2}
        if name in twins:
            ref, diff = twins[name]
            within = "less than 0.01%" if diff < 1e-4 else f"{diff * 100:.2g}%"
            label += f" [same curve as {ref}]" if diff == 0.0 else f" [on {ref}'s curve: within {within}]"
            style.update(linestyle=(0, (2, 2)), linewidth=1.8, zorder=5)
        out[name] = {"label": label, **style}
    return out


def plot(runs: list[Run], summary: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for task, rows in summary.items():
        fig, ax = plt.subplots(figsize=(9, 4.6))
        drawn = {}
        for row in rows:
            chosen = [r for r in runs if r.task == task and r.optimizer == row["optimizer"] and r.lr == row["best_lr"]]
            length = min(len(r.heldout) for r in chosen)
            drawn[row["optimizer"]] = (chosen[0].steps[:length], torch.tensor([r.heldout[:length] for r in chosen]))
        styles = line_styles(rows, {name: values.mean(0).tolist() for name, (_, values) in drawn.items()})
        for row in rows:
            steps_axis, values = drawn[row["optimizer"]]
            line, = ax.plot(steps_axis, values.mean(0).tolist(), **styles[row["optimizer"]])
            if len(values) > 1:  # a band only where there is a spread to show
                ax.fill_between(steps_axis, values.min(0).values.tolist(), values.max(0).values.tolist(),
                                color=line.get_color(), alpha=0.07)
        seeds = len({r.seed for r in runs if r.task == task})
        ax.set_title(f"{task}: held-out loss" + (f" (mean, min-max over {seeds} seeds)" if seeds > 1 else " (one seed)"))
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # outside the curves
        fig.tight_layout()
        path = out_dir / f"curves_{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
