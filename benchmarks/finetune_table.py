"""LoRA vs RoLoRA vs their W4A4 QAT variants on SmolLM2-135M: several seeds, FP and W4A4 after merge (issue 15).

    python benchmarks/finetune_table.py                      # the full table (resumes from the cache)
    python benchmarks/finetune_table.py --quick              # ≤ 20 min on 2 CPU cores: 1 seed, q/v, 20 steps, 4 methods
    python benchmarks/finetune_table.py --only lora,rolora --seeds 0 --targets qv   # build it piecewise
    python benchmarks/finetune_table.py --quick --fp4       # issue 30: lora, rolora, rolora-qat-nvfp4 at NVFP4

Every run (method × target set × seed) is trained once and its numbers are cached by its settings as JSON under
``benchmarks/results/finetune_table/`` (committed with the repository, so a later session continues where an
earlier one stopped; the merged models go to ``$ROLORA_CACHE/bench/finetune_table/models``, see
``benchmarks/_finetune.py``); a re-run continues where an interrupted one stopped and prints the table from the
cache. ``lora-posthoc`` is a control, not a fine-tune of its own: the ``lora`` run rotated R1+R4 after merge.
After merge each run is evaluated in FP, at W4A4 RTN and at ``QuantConfig.preset("w4a4")`` (GPTQ + clip
searches, 8×256 BoolQ calibration tokens): held-out SciQ response loss, BoolQ-passage perplexity, and the 7-task
zero-shot average (lm-eval) at ``--task-limit`` documents per task (default: the smallest count with a standard
error of the average ≤ 1.5 points for any accuracies).

FP4 (issue 30), on request: ``--evals`` also takes ``nvfp4-rtn``, ``nvfp4-gptq``, ``mxfp4-rtn``, ``mxfp4-gptq``
(``QuantConfig.preset(fmt)`` after merge, at RTN without clip search or as the preset with GPTQ; calibration as
``gptq``), and ``--only`` the methods ``rolora-qat-nvfp4`` / ``rolora-qat-mxfp4`` (RoLoRA trained with
``QATConfig(preset=fmt)``). ``--fp4`` = methods lora, rolora, rolora-qat-nvfp4 and evaluations fp, nvfp4-rtn,
nvfp4-gptq (each overridable). The FP4 table and its goal (RoLoRA+QAT in NVFP4 recovers ≥ 95% of the FP margin;
LoRA vs RoLoRA at NVFP4 RTN beside it) are printed whenever FP4 evaluations are cached for the runs asked for.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _finetune as ft
from _common import append_results, machine

SE_TARGET = 0.015  # standard error of the 7-task average, as a fraction
N_TASKS = 7
QUICK = {"steps": 20, "eval_every": 10, "task_limit": 10, "n_heldout": 16, "ppl_chunks": 4, "calib_chunks": 4,
         "curve_ppl_chunks": 1, "curve_heldout_batches": 2}
QUICK_METHODS = ("lora", "rolora", "lora-qat", "rolora-qat")  # the four; the post-hoc control is in the full table
GOAL_RECOVERY, GOAL_PPL_RATIO, GOAL_FP_GAP = 0.85, 1.3, 0.01
FP4_TABLE_METHODS = ("lora", "rolora", "rolora-qat-nvfp4")  # --fp4 (issue 30)
FP4_EVALS = ("fp", "nvfp4-rtn", "nvfp4-gptq")
GOAL_FP4_RECOVERY = 0.95  # issue 30: RoLoRA+QAT in NVFP4, 7-task average, 3 seeds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="1 seed, q/v, 20 steps, 10 documents per task, the four methods (" + ", ".join(QUICK_METHODS) + ")")
    p.add_argument("--only", default=None,
                   help="comma-separated methods (default: " + ", ".join(ft.DEFAULT_METHODS) + "; --quick: without the "
                   "lora-posthoc control; also: "
                   + ", ".join(ft.NOT_TRAINED) + ", the pretrained model without fine-tune, unrotated / rotated R1+R4)")
    p.add_argument("--targets", default=None, help="comma-separated target sets: qv, all-linear (default both; --quick: qv)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 200; --quick 20)")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate of every run in this invocation")
    p.add_argument("--lr-scale", default="none",
                   help="RoLoRA runs, comma-separated: 'none', 'norm-rms' (scales each linear's LoRA learning rate by rms "
                        "of the norm folded into it); 'none,norm-rms' runs both")  # fmt: skip
    p.add_argument("--optimizer", choices=sorted(ft.OPTIMIZERS), default="adamw",
                   help="adamw (default) or sgd (momentum 0.9; give it its own --lr, e.g. 0.1)")
    p.add_argument("--lora-coords", choices=ft.LORA_COORDS, default="rotated",
                   help="RoLoRA runs: 'unfolded' trains Â with A' = Â Rᵀ diag(g) R (the FP-gap experiment)")
    p.add_argument("--task-limit", type=int, default=None, help="documents per task (0 = skip the tasks)")
    p.add_argument("--evals", default=None,
                   help="evaluations after merge: fp, rtn, gptq (default), and on request " + ", ".join(ft.FP4_SETTINGS)
                   + " (--fp4: " + ",".join(FP4_EVALS) + ")")
    p.add_argument("--fp4", action="store_true",
                   help="issue 30's FP4 rows: methods " + ",".join(FP4_TABLE_METHODS) + " and evaluations "
                   + ",".join(FP4_EVALS) + " unless --only / --evals say otherwise")
    p.add_argument("--cached-only", action="store_true", help="print the table from the cache, train nothing")
    p.add_argument("--keep-models", action="store_true",
                   help="keep the merged models after their evaluations (to evaluate them at another size later)")
    p.add_argument("--report-dir", type=Path, default=Path("rolora_report_finetune"), help="where the curves PNG goes")
    p.add_argument("--no-append", action="store_true", help="do not append the table to benchmarks/RESULTS.md")
    return p.parse_args(argv)


def evals(args) -> tuple[str, ...]:
    """The evaluations of this invocation: ``--evals``, else FP + NVFP4 with ``--fp4``, else fp, rtn, gptq."""
    default = FP4_EVALS if getattr(args, "fp4", False) else ft.EVAL_SETTINGS
    return tuple(_csv(args.evals or ",".join(default), ft.ALL_SETTINGS))


def _csv(text: str, valid=None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if valid is not None and x not in valid]
    if bad or not items:
        raise SystemExit(f"invalid value(s) {bad or text!r}; choose from {sorted(valid)}")
    return items


def planned(args) -> list[ft.RunSettings]:
    """The runs of this invocation, in the order they are trained (seed-major: each seed's table fills first)."""
    size = dict(QUICK) if args.quick else {}
    if args.steps:
        size["steps"] = args.steps
    size["task_limit"] = args.task_limit if args.task_limit is not None else size.get("task_limit", ft.docs_for_stderr(SE_TARGET, N_TASKS))
    targets = _csv(args.targets or ("qv" if args.quick else "qv,all-linear"), ft.TARGETS)
    seeds = [int(x) for x in _csv(args.seeds or ("0" if args.quick else "0,1,2"))]
    default = FP4_TABLE_METHODS if getattr(args, "fp4", False) else QUICK_METHODS if args.quick else ft.DEFAULT_METHODS
    methods = _csv(args.only or ",".join(default), ft.METHODS)
    scales = _csv(args.lr_scale, ft.LR_SCALES)
    return [ft.RunSettings(method=m, targets=t, seed=s, lr=args.lr, lr_scale=k, optimizer=args.optimizer,
                           lora_coords=args.lora_coords if ft.METHODS[m][0] else "rotated", **size)
            for s in seeds for t in targets for m in methods for k in (scales if ft.METHODS[m][0] else ["none"])]  # fmt: skip


# ---------------------------------------------------------------------------------------------- table


def _stat(values: list[float], fmt: str, scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt.replace('+', ''))}"


def _values(runs: list[dict], setting: str, key: str) -> list[float]:
    return [r[setting][key] for r in runs if r.get(setting) and r[setting].get(key) is not None]


def _mean(runs: list[dict], setting: str, key: str) -> float | None:
    vals = _values(runs, setting, key)
    return statistics.mean(vals) if vals else None


def grouped(results: list[tuple[ft.RunSettings, dict]]) -> dict[tuple[str, str], list[dict]]:
    groups: dict = {}
    for s, r in results:
        groups.setdefault((_method_label(s), s.targets), []).append(r)
    return groups


def _method_label(s: ft.RunSettings) -> str:
    extra = [f"lr×{s.lr_scale}"] * (s.lr_scale != "none") + [f"{s.optimizer} lr {s.lr:g}"] * (s.optimizer != "adamw")
    extra += [f"A {s.lora_coords}"] * (s.lora_coords != "rotated")
    return s.method + (f" ({', '.join(extra)})" if extra else "")


def table(groups: dict) -> str:
    head = ("| method | targets | seeds | held-out loss FP | ppl FP | avg FP | held-out W4A4 RTN | ppl W4A4 RTN | avg W4A4 RTN "
            "| held-out W4A4 GPTQ | ppl W4A4 GPTQ | avg W4A4 GPTQ | train s |")  # fmt: skip
    lines = [head, "|" + "---|" * 13]
    for (method, targets), runs in groups.items():
        if "(" in method and not any(r["train"] for r in runs):
            continue  # a variant (lr scale, optimizer) not run for this method: no row of dashes
        cells = [method, targets, str(sum(r["train"] is not None for r in runs))]
        for setting in ft.EVAL_SETTINGS:
            cells += [_stat(_values(runs, setting, "heldout_loss"), ".3f"), _stat(_values(runs, setting, "ppl"), ".2f"),
                      _stat(_values(runs, setting, "avg"), ".1f", 100)]  # fmt: skip
        cells.append(_stat([r["train"]["seconds"] for r in runs if r["train"]], ".0f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _recovery(runs: list[dict], setting: str, chance: float, fp_runs: list[dict] | None = None) -> list[float]:
    """Recovery of the FP margin above chance, one value per run (seed) that has both averages: each W4A4 average
    against the FP average of the *same* run, so seeds evaluated at one setting only never mix into another's
    mean. ``fp_runs``: where the FP averages come from when ``runs`` has none (a post-hoc control: its FP function
    is its base run's exactly); both lists are in the same (seed) order."""
    out = []
    for k, r in enumerate(runs):
        fp = (r.get("fp") or {}).get("avg")
        if fp is None and fp_runs and k < len(fp_runs):
            fp = (fp_runs[k].get("fp") or {}).get("avg")
        q = (r.get(setting) or {}).get("avg")
        if fp is not None and q is not None and fp > chance:
            out.append((q - chance) / (fp - chance))
    return out


def _fmt_recovery(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{_stat(values, '.1%')} ({len(values)} seed{'s' * (len(values) > 1)})"


def _mark(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**not met**")


def _fmt(x, f=".1%") -> str:
    return "-" if x is None else format(x, f)


def goal_lines(groups: dict, chance: float, limit: int = 0) -> list[str]:
    """The issue's goals per target set, each marked met / not met (or not measured: the recovery goal needs the
    7-task average at ``docs_for_stderr`` documents per task; below that its ratios are noise)."""
    out = []
    enough = limit >= ft.docs_for_stderr(SE_TARGET, N_TASKS)
    for targets in dict.fromkeys(t for _, t in groups):
        g = {m: groups.get((m, targets), []) for m in ft.METHODS}
        rec = {m: {k: _recovery(g[m], k, chance, g.get(ft.POSTHOC.get(m))) for k in ("rtn", "gptq")} for m in ft.METHODS}
        best = [statistics.mean(v) for m in ("rolora", "rolora-qat") for v in rec[m].values() if v]  # means over seeds
        methods = [m for m in ft.METHODS if m in ft.DEFAULT_METHODS or any(r.get("rtn") or r.get("gptq") for r in g[m])]
        shown = "; ".join(f"{m} RTN {_fmt_recovery(rec[m]['rtn'])} / GPTQ {_fmt_recovery(rec[m]['gptq'])}" for m in methods)
        mark = _mark(max(best) >= GOAL_RECOVERY if best else None) if enough else (
            f"not measured at {limit} documents per task (needs ≥ {ft.docs_for_stderr(SE_TARGET, N_TASKS)} for SE ≤ 1.5 points)")
        out.append(f"- [{targets}] recovery (avg_W4A4 − chance)/(avg_FP − chance) ≥ 85% for RoLoRA (+QAT): "
                   f"{mark} — {shown}")  # fmt: skip
        ratios = {k: _ratio(g["rolora-qat"], k) for k in ("rtn", "gptq")}
        ok = min(r for r in ratios.values() if r is not None) <= GOAL_PPL_RATIO if any(ratios.values()) else None
        out.append(f"- [{targets}] RoLoRA+QAT W4A4 ppl / own FP ppl ≤ 1.3×: {_mark(ok)} — RTN {_fmt(ratios['rtn'], '.2f')}×, "
                   f"GPTQ {_fmt(ratios['gptq'], '.2f')}×")  # fmt: skip
        out.append(_fp_gap_line(targets, g["lora"], g["rolora"]))
        for label, t in groups:  # the variants (lr scale, optimizer) against the LoRA runs trained the same way
            if t == targets and label.startswith("rolora (") and groups.get((_lora_label(label), t)):
                out.append(_fp_gap_line(targets, groups[(_lora_label(label), t)], groups[(label, t)], label))
    return out


def _lora_label(label: str) -> str:
    """The LoRA group a RoLoRA variant compares with: the same optimizer, no lr scale or A coordinates (RoLoRA-only)."""
    extras = [e for e in label[label.index("(") + 1 : -1].split(", ") if not e.startswith(("lr×", "A "))] if "(" in label else []
    return "lora" + (f" ({', '.join(extras)})" if extras else "")


def fp4_table(groups: dict, chance: float) -> str:
    """The FP4 rows (issue 30): per method, FP and each FP4 evaluation cached for it, with the per-seed recovery."""
    settings = [k for k in ft.FP4_SETTINGS if any(r.get(k) for runs in groups.values() for r in runs)]
    head = "| method | targets | seeds | ppl FP | avg FP | " + " | ".join(
        f"held-out {_fp4_label(k)} | ppl {_fp4_label(k)} | avg {_fp4_label(k)} | recovery {_fp4_label(k)}" for k in settings) + " |"
    lines = [head, "|" + "---|" * (5 + 4 * len(settings))]
    for (method, targets), runs in groups.items():
        if not any(r.get(k) for r in runs for k in settings):
            continue
        cells = [method, targets, str(sum(r["train"] is not None for r in runs)), _stat(_values(runs, "fp", "ppl"), ".2f"),
                 _stat(_values(runs, "fp", "avg"), ".1f", 100)]  # fmt: skip
        for k in settings:
            cells += [_stat(_values(runs, k, "heldout_loss"), ".3f"), _stat(_values(runs, k, "ppl"), ".2f"),
                      _stat(_values(runs, k, "avg"), ".1f", 100), _fmt_recovery(_recovery(runs, k, chance))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fp4_label(setting: str) -> str:
    fmt, method = setting.split("-")
    return f"{fmt.upper()} {method.upper()}"


def fp4_lines(groups: dict, chance: float, limit: int) -> list[str]:
    """The FP4 table and issue 30's goal: RoLoRA+QAT in NVFP4 recovers ≥ 95% of the FP margin above chance (7-task
    average, 3 seeds; the better of NVFP4 RTN / GPTQ), with LoRA vs RoLoRA at NVFP4 RTN beside it."""
    out = ["FP4 (issue 30; NVFP4 RTN = `QuantConfig.preset('nvfp4', method='rtn', w_clip_search=False)`, NVFP4 GPTQ = "
           "`QuantConfig.preset('nvfp4')`, after merge; NVFP4 activation global scales calibrated on the GPTQ "
           "calibration chunks):", "", fp4_table(groups, chance), "", "FP4 goals:"]  # fmt: skip
    enough = limit >= ft.docs_for_stderr(SE_TARGET, N_TASKS)
    for targets in dict.fromkeys(t for _, t in groups):
        qat = groups.get(("rolora-qat-nvfp4", targets), [])
        rec = {k: _recovery(qat, k, chance) for k in ("nvfp4-rtn", "nvfp4-gptq")}
        best = max((statistics.mean(v) for v in rec.values() if v), default=None)
        seeds = max((len(v) for v in rec.values()), default=0)
        if not enough:
            mark = f"not measured at {limit} documents per task (needs ≥ {ft.docs_for_stderr(SE_TARGET, N_TASKS)})"
        else:
            mark = _mark(None if best is None else best >= GOAL_FP4_RECOVERY) + (f" on {seeds} seed(s) of 3" if best is not None and seeds < 3 else "")
        out.append(f"- [{targets}] RoLoRA+QAT in NVFP4, recovery ≥ 95%: {mark} — NVFP4 RTN {_fmt_recovery(rec['nvfp4-rtn'])} / "
                   f"GPTQ {_fmt_recovery(rec['nvfp4-gptq'])}")  # fmt: skip
        side = []
        for m in ("lora", "rolora", "rolora-qat-nvfp4"):
            runs = groups.get((m, targets), [])
            ppl, avg = _mean(runs, "nvfp4-rtn", "ppl"), _mean(runs, "nvfp4-rtn", "avg")
            if ppl is not None:
                side.append(f"{m} ppl {ppl:.2f} ({_fmt(_ratio(runs, 'nvfp4-rtn'), '.2f')}× its FP)"
                            + (f", avg {100 * avg:.1f}, recovery {_fmt_recovery(_recovery(runs, 'nvfp4-rtn', chance))}" if avg is not None else ""))
        out.append(f"- [{targets}] at NVFP4 RTN: " + ("; ".join(side) or "not measured"))
    return out


def control_lines(groups: dict) -> list[str]:
    """The post-hoc control beside RoLoRA (and its lr-scaled variant): the same rotation, applied to LoRA's trained
    model instead of before training, so any difference is what training in the rotated basis does."""
    out = []
    for targets in dict.fromkeys(t for _, t in groups):
        post = groups.get(("lora-posthoc", targets))
        if not post:
            continue
        names = [m for m, t in groups if t == targets and (m == "rolora" or (m.startswith("rolora (") and "sgd" not in m))]
        for name in names:  # AdamW runs: the control is AdamW-trained LoRA
            runs = groups.get((name, targets))
            if not any(r["train"] for r in runs):
                continue
            cells = []
            for setting, label in (("fp", "FP"), ("rtn", "W4A4 RTN"), ("gptq", "W4A4 GPTQ")):
                a, b = _mean(post, setting, "ppl"), _mean(runs, setting, "ppl")
                if a is not None and b is not None:
                    cells.append(f"{label} ppl {a:.2f} vs {b:.2f} ({b / a - 1:+.1%})")
            out.append(f"- [{targets}] lora-posthoc vs {name}: " + ("; ".join(cells) or "not measured"))
    return out


def frontier_gap(lora_curves: list[dict], other_curves: list[dict]) -> list[float]:
    """``ppl_other / ppl_LoRA(same held-out loss) − 1`` at each of ``other``'s curve points after step 0 whose
    held-out loss lies inside LoRA's range, LoRA's ppl interpolated linearly along its own curve (sorted by
    held-out loss): is a run's extra forgetting the price of more task fit (gap ≈ 0: the same frontier, further
    along) or a worse trade (gap > 0 at equal task fit)?"""
    ref = sorted((r["heldout_fp"], r["ppl_fp"]) for r in lora_curves)
    out = []
    for r in other_curves:
        x = r["heldout_fp"]
        if r["step"] == 0 or not ref[0][0] <= x <= ref[-1][0]:
            continue
        for (x0, y0), (x1, y1) in zip(ref, ref[1:]):
            if x0 <= x <= x1:
                y = y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
                out.append(r["ppl_fp"] / y - 1)
                break
    return out


def frontier_lines(results: list[tuple[ft.RunSettings, dict]]) -> list[str]:
    """Per target set and method, the frontier gap against the LoRA run of the same seed, optimizer and learning
    rate, over seeds and points."""
    lora = {(s.targets, s.seed, s.optimizer, s.lr): r["train"] for s, r in results if s.method == "lora" and r["train"]}
    gaps: dict = {}
    for s, r in results:
        base = lora.get((s.targets, s.seed, s.optimizer, s.lr))
        if s.method in ("lora", *ft.POSTHOC) or not r["train"] or base is None:
            continue
        gaps.setdefault((_method_label(s), s.targets), []).extend(frontier_gap(base["curves"], r["train"]["curves"]))
    return [f"- [{t}] {m}: BoolQ ppl {_stat(g, '+.1%')} vs LoRA at the same held-out task loss ({len(g)} curve points)"
            for (m, t), g in gaps.items() if g]  # fmt: skip


def _ratio(runs: list[dict], setting: str) -> float | None:
    q, fp = _mean(runs, setting, "ppl"), _mean(runs, "fp", "ppl")
    return q / fp if q is not None and fp else None


def _fp_gap_line(targets: str, lora: list[dict], rolora: list[dict], name: str = "RoLoRA") -> str:
    lp, rp = _mean(lora, "fp", "ppl"), _mean(rolora, "fp", "ppl")
    if lp is None or rp is None:
        return f"- [{targets}] FP: {name} within 1% of LoRA on BoolQ ppl and within noise on the average: not measured"
    gap = rp / lp - 1
    la, ra = _mean(lora, "fp", "avg"), _mean(rolora, "fp", "avg")
    se = [_mean(x, "fp", "avg_stderr") for x in (lora, rolora)]
    noise = 2 * math.sqrt(sum(v * v for v in se)) if None not in se else None
    avg_ok = None if la is None or ra is None or noise is None else abs(ra - la) <= noise
    avg_text = "-" if avg_ok is None else f"{100 * (ra - la):+.1f} points (2·SE of the difference {100 * noise:.1f})"
    return (f"- [{targets}] FP: {name} ppl within 1% of LoRA: {_mark(abs(gap) <= GOAL_FP_GAP)} ({rp:.2f} vs {lp:.2f}, "
            f"{gap:+.1%}); task average within noise: {_mark(avg_ok)} ({avg_text})")  # fmt: skip


# ---------------------------------------------------------------------------------------------- curves


def plot_curves(results: list[tuple[ft.RunSettings, dict]], path: Path) -> Path | None:
    """Training loss, held-out loss FP and fake-quant W4A4 vs step (the first seed/target set of each method),
    and BoolQ ppl against held-out loss along training (forgetting vs task fit), in one PNG."""
    from rolora_plugin.app.plots import agg_pyplot, save_figure, smoothed

    first = {}
    for s, r in results:
        if r["train"] is not None and r["train"]["losses"] and s.method not in ft.POSTHOC:  # a post-hoc control's
            # curves are its base run's; the not-fine-tuned reference rows have none
            first.setdefault(_method_label(s), (s, r["train"]))
    if not first:
        return None
    fig, axes = agg_pyplot().subplots(2, 3, figsize=(16, 7.5), layout="constrained")
    for method, (s, train) in first.items():
        steps, losses = zip(*train["losses"])
        axes[0, 0].plot(steps, smoothed(list(losses), 10), label=method)
        c = train["curves"]
        axes[0, 1].plot([r["step"] for r in c], [r["heldout_fp"] for r in c], marker="o", label=method)
        axes[0, 2].plot([r["step"] for r in c], [r["heldout_w4a4"] for r in c], marker="o", label=method)
        axes[1, 0].plot([r["heldout_fp"] for r in c], [r["ppl_fp"] for r in c], marker="o", label=method)
        if not ft.METHODS[s.method][1]:  # the QAT runs' large ppl would flatten the others
            axes[1, 1].plot([r["heldout_fp"] for r in c], [r["ppl_fp"] for r in c], marker="o", label=method)
    titles = [("training loss (trailing mean of 10)", "step", "loss"), ("held-out task loss, FP", "step", "loss"),
              ("held-out task loss, fake-quant W4A4", "step", "loss"),
              ("forgetting vs task fit (FP, along training)", "held-out task loss", "BoolQ-passage ppl"),
              ("the same, runs without QAT", "held-out task loss", "BoolQ-passage ppl")]  # fmt: skip
    for ax, (title, xl, yl) in zip(axes.flat, titles):
        ax.set(title=title, xlabel=xl, ylabel=yl)
        if ax.lines:
            ax.legend(fontsize=8)
    axes[0, 2].set_yscale("log")
    axes[1, 2].set_axis_off()
    s0 = next(iter(first.values()))[0]
    fig.suptitle(f"SmolLM2-135M, SciQ, {s0.targets}, seed {s0.seed}, {s0.steps} steps, lr {s0.lr:g}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- main


def collect(runs: list[ft.RunSettings], cached_only: bool, evals: tuple[str, ...], keep_models: bool = False) -> list[tuple[ft.RunSettings, dict]]:
    """Train every run first, then one evaluation setting at a time over all runs (fp, rtn, gptq), so an
    invocation cut short leaves the most comparable partial table; returns what the cache holds."""
    data_cache: dict = {}
    for phase in () if cached_only else ("train", *evals):
        for i, s in enumerate(runs):
            ft.logger.info("%s %d/%d: %s", phase, i + 1, len(runs), s.label())
            ft.run_one(s, data_cache, () if phase == "train" else (phase,), keep_model=keep_models)
    return [(s, ft.load_cached(s)) for s in runs]


def compute_seconds(results, key: str = "seconds") -> float:
    """Sum of the cached stage times (training + every evaluation) of the runs in the table: wall ``seconds`` or
    process ``cpu_seconds`` (all threads; on a loaded machine the better measure of the work done)."""
    return sum(r[k].get(key, 0.0) for _, r in results for k in ("train", *ft.ALL_SETTINGS) if r.get(k))


def machine_line(results) -> str:
    """Which machines measured the cached stages of this table (unrotated W4A4 numbers differ between CPUs)."""
    counts: dict[str, int] = {}
    for _, r in results:
        for k in ("train", *ft.ALL_SETTINGS):
            if r.get(k):
                name = r[k].get("machine", "Intel(R) Xeon(R) Processor, 2 cores (not recorded: the stages of 2026-12-02 05:28–08:02 UTC)")
                counts[name] = counts.get(name, 0) + 1
    return "Measured on: " + ("; ".join(f"{m} ({n} stages)" for m, n in sorted(counts.items())) or "-") + "."


def report(args, runs, results, wall: float) -> str:
    limit = runs[0].task_limit
    chance = ft.chance_level(limit) if limit else float("nan")
    groups = grouped(results)
    done = sum(all(r.get(k) for k in ("train", *evals(args))) for _, r in results)
    worst_se = 0.5 / math.sqrt(N_TASKS * limit) if limit else float("nan")
    measured = [r[k]["avg_stderr"] for _, r in results for k in ft.ALL_SETTINGS if r.get(k) and "avg_stderr" in r[k]]
    s0 = runs[0]
    lines = [
        (f"Setup: SmolLM2-135M-Instruct, SciQ pairs (loss on the response), {s0.steps} steps × {s0.batch_size} × ≤ {s0.max_len} "
        f"tokens, LoRA r={s0.rank} α={s0.alpha}, AdamW lr {s0.lr:g} cosine; seeds vary LoRA init, data order and the "
        f"rotation. Held-out: {s0.n_heldout} SciQ pairs; ppl: {s0.ppl_chunks}×{s0.ppl_seq_len} BoolQ-passage tokens; "
        f"GPTQ = `QuantConfig.preset('w4a4')` on the merged model as it is (LoRA unrotated, RoLoRA R1+R4), "
        f"calibration {s0.calib_chunks}×{s0.calib_seq_len} tokens from the end of the BoolQ stream."),
        (f"7-task average: {limit} documents per task ({N_TASKS * limit} in all); worst-case standard error of the "
        f"average 0.5/sqrt(7·{limit}) = {100 * worst_se:.2f} points (goal ≤ {100 * SE_TARGET:.1f}); measured from "
        f"lm-eval's per-task stderr: {_stat(measured, '.2f', 100)} points. Chance level (mean 1/choices over the "
        f"scored documents) {100 * chance:.1f}."),
        (f"Runs complete: {done}/{len(runs)}. Compute of what ran (sum of cached stage times): "
        f"{compute_seconds(results) / 60:.1f} min wall, {compute_seconds(results, 'cpu_seconds') / 60:.1f} min CPU "
        f"(both threads); this invocation {wall / 60:.1f} min wall."),
        machine_line(results),
        "", table(groups), "", "Goals:", *goal_lines(groups, chance, limit),
    ]  # fmt: skip
    if any(r.get(k) for _, r in results for k in ft.FP4_SETTINGS):
        lines += ["", *fp4_lines(groups, chance, limit)]
    controls = control_lines(groups)
    if controls:
        lines += ["", "Control (LoRA trained unrotated, rotated R1+R4 after merge; means over the seeds present):", *controls]
    frontier = frontier_lines(results)
    if frontier:
        lines += ["", "Forgetting at equal task fit (training curves: FP ppl on the curve chunks, interpolated along the "
                  "same seed's LoRA curve; mean ± std over points and seeds):", *frontier]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("transformers", "lm_eval", "datasets", "httpx", "rolora_plugin"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    torch.set_num_threads(ft.threads())
    runs = planned(args)
    t0 = time.perf_counter()
    try:
        results = collect(runs, args.cached_only, evals(args), args.keep_models)
    except ft.RetrainMismatch as e:  # every stage measured so far is cached; say what to do, no traceback
        raise SystemExit(f"finetune_table: {e}") from None
    text = report(args, runs, results, time.perf_counter() - t0)
    png = plot_curves(results, args.report_dir / "finetune_curves.png")
    print(text)
    print(f"\ncurves: {png}\nmachine: {machine()}")
    if not args.no_append and not args.cached_only:
        append_results("Fine-tune table: LoRA / RoLoRA / +QAT W4A4 (benchmarks/finetune_table.py)", text + f"\n\nCurves: `{png}`")


if __name__ == "__main__":
    main()
