"""Tables, paired intervals and the plot of bench/quality.py (reads the runs' files; no torch).

Views of every training run: the test set decoded by sampling as the paper (mean over the eval seeds)
or greedily, at the best-dev checkpoint (best/, the paper's choice) or at the last step.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, Optional

VIEWS = (("sampled", "best"), ("sampled", "last"), ("greedy", "best"), ("greedy", "last"))
HEADLINE = ("sampled", "best")
# two-sided 95% Student t quantiles by degrees of freedom (n - 1 paired seeds)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


# ----------------------------------------------------------------------------- reading

def _json(path: str) -> Any:
    with open(path) as fh:
        return json.load(fh)


def read_view(eval_dir: str, decoding: str) -> dict[str, Any]:
    """results.json of one decoding: {model: {set: stats}}."""
    path = os.path.join(eval_dir, "eval", "greedy" if decoding == "greedy" else "", "results.json")
    return {m: r["datasets"] for m, r in _json(path)["models"].items()}


def read_metrics(run_dir: str, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {k: [] for k in keys}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            row = json.loads(line)
            for k in keys:
                if k in row:
                    out[k].append((int(row["step"]), float(row[k])))
    return out


def run_scores(run_dir: str, eval_dir: str, names: dict[str, str]) -> dict[str, Any]:
    """Every view's test score (+ per category) of one run, its best-dev step and its curves.

    ``eval_dir``: the eval job's output dir; ``names``: the run's best/ and last export there ({"best": ..,
    "last": ..}).
    """
    out: dict[str, Any] = {}
    for decoding in ("sampled", "greedy"):
        models = read_view(eval_dir, decoding)
        for ckpt in ("best", "last"):
            out[f"{decoding}/{ckpt}"] = view_score(models[names[ckpt]])
    out["best_step"] = _json(os.path.join(run_dir, "best", "best.json"))["step"]
    out["curves"] = read_metrics(run_dir, ("dev/rougeL", "prompt/guidance_kl", "prompt/reg_kl"))
    return out


def test_sets(datasets: dict[str, Any]) -> list[str]:
    """The test sets of one model's results, in their order (the reference evaluation has dev too)."""
    return [k for k in datasets if k != "dev"]


def view_score(datasets: dict[str, Any]) -> dict[str, Any]:
    """One model's test score: the mean over its test sets of each set's ROUGE-L (the paper's table has a column
    per set; with one set it is that set), each set's, and per category (with one set only)."""
    names = test_sets(datasets)
    per_set = {k: datasets[k]["rougeL"] for k in names}
    return {"rougeL": statistics.fmean(per_set.values()), "sets": per_set,
            "by_category": datasets[names[0]].get("by_category", {}) if len(names) == 1 else {}}


def ref_score(datasets: dict[str, Any]) -> dict[str, Any]:
    """``view_score`` of a reference model with the std over eval seeds of its per-seed average over the sets."""
    out = view_score(datasets)
    names = test_sets(datasets)
    runs = [datasets[k].get("by_seed") or [{"rougeL": datasets[k]["rougeL"]}] for k in names]
    per_seed = [statistics.fmean(r[i]["rougeL"] for r in runs) for i in range(min(len(r) for r in runs))]
    out["rougeL_std"] = (statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0) if len(names) > 1 \
        else datasets[names[0]].get("rougeL_std", 0.0)
    out["sets_std"] = {k: datasets[k].get("rougeL_std", 0.0) for k in names}
    return out


# ----------------------------------------------------------------------------- statistics

def mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def paired(a: dict[int, float], b: dict[int, float]) -> Optional[dict[str, float]]:
    """Mean of a − b over the shared seeds with a 95% t interval (None with fewer than 2 pairs)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    half = T95.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d))
    m = statistics.fmean(d)
    return {"mean": m, "low": m - half, "high": m + half, "n": len(d), "per_seed": d}


def fmt(ms: Optional[dict[str, float]]) -> str:
    return "–" if not ms else f"{ms['mean']:.2f} ± {ms['std']:.2f}"


def fmt_pair(p: Optional[dict[str, float]]) -> str:
    return "–" if not p else f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}]"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join([_row(head), "|" + "---|" * len(head), *(_row(r) for r in rows)]) + "\n"


# ----------------------------------------------------------------------------- headline

def headline_report(plan: Any, bench: dict, meta: dict, results_dir: str) -> dict[str, Any]:
    ref = {d: read_view(plan.refs.out_dir, d) for d in ("sampled", "greedy")}
    scores: dict[str, dict[int, dict]] = {}
    for key, job in plan.runs.items():
        label, seed, _lr = key
        scores.setdefault(label, {})[seed] = run_scores(job.out_dir, plan.evals[key].out_dir, plan.eval_names[key])
    sets = test_sets(ref["sampled"]["teacher"])
    families = sorted(ref["sampled"]["teacher"][sets[0]].get("by_category", {})) if len(sets) == 1 else []
    table = {label: {f"{d}/{c}": mean_std([r[f"{d}/{c}"]["rougeL"] for r in by.values()]) for d, c in VIEWS}
             for label, by in scores.items()}
    per_set = {label: {f"{d}/{c}": {n: mean_std([r[f"{d}/{c}"]["sets"][n] for r in by.values()]) for n in sets}
                       for d, c in VIEWS} for label, by in scores.items()}
    per_family = {label: {view: {f: mean_std([r[view]["by_category"][f] for r in by.values()
                                              if f in r[view]["by_category"]]) for f in families}
                          for view in ("sampled/best", "greedy/best")} for label, by in scores.items()}
    pairs = paired_differences(scores)
    exposure = exposure_rows(plan, scores) if plan.exposure else {}
    refs = {d: {m: ref_score(ref[d][m]) for m in ("teacher", "student")} for d in ref}
    gap = {d: refs[d]["teacher"]["rougeL"] - refs[d]["student"]["rougeL"] for d in ref}
    eval_seeds = _json(os.path.join(plan.refs.out_dir, "eval", "results.json"))["decoding"]["seeds"]
    out = {**meta, "eval_seeds": eval_seeds, "sets": sets, "reference": ref_summary(ref), "reference_test": refs,
           "teacher_student_gap": gap, "test_rougeL": table, "per_set": per_set,
           "per_family": per_family, "paired": pairs, "exposure": exposure,
           "best_step": {l: [r["best_step"] for r in by.values()] for l, by in scores.items()},
           "per_seed": {l: {s: {v: r[v]["rougeL"] for v in r if "/" in v} for s, r in by.items()}
                        for l, by in scores.items()},
           "curves": {l: {s: r["curves"] for s, r in by.items()} for l, by in scores.items()},
           "meets_60_min": meta["wall_seconds"] <= 3600}
    os.makedirs(results_dir, exist_ok=True)
    md = markdown(out, families)
    with open(os.path.join(results_dir, "quality.md"), "w") as fh:
        fh.write(md)
    plot(out, os.path.join(results_dir, "quality.png"), bench["steps"])
    return out


def ref_summary(ref: dict) -> dict[str, Any]:
    return {d: {m: {s: {"rougeL": st["rougeL"], "rougeL_std": st.get("rougeL_std", 0.0),
                        "by_category": st.get("by_category", {})} for s, st in sets.items()}
                for m, sets in models.items()} for d, models in ref.items()}


def paired_differences(scores: dict[str, dict[int, dict]]) -> dict[str, Any]:
    """PromptKD − RKL and PromptKD − the best other method (by the headline view), paired by seed."""
    if "promptkd" not in scores:
        return {}
    others = {l: statistics.fmean(r["sampled/best"]["rougeL"] for r in by.values())
              for l, by in scores.items() if l not in ("promptkd", "promptkd-stale")}
    rivals = [r for r in ("rkl",) if r in others]
    if others:
        best = max(others, key=others.get)
        if best not in rivals:
            rivals.append(best)
    out = {}
    for rival in rivals:
        out[rival] = {f"{d}/{c}": paired({s: r[f"{d}/{c}"]["rougeL"] for s, r in scores["promptkd"].items()},
                                         {s: r[f"{d}/{c}"]["rougeL"] for s, r in scores[rival].items()})
                      for d, c in VIEWS}
    return out


def exposure_rows(plan: Any, scores: dict) -> dict[str, Any]:
    """ExAccErr at the last position: the SFT init, and mean ± std over seeds per method (best/)."""
    res = _json(os.path.join(plan.exposure.out_dir, "exposure", "results.json"))
    by_path = {row["student"]: row for row in res["students"]}
    init = plan.init

    def last(row: dict) -> Optional[float]:
        vals = [v for v in row["exacc_err"] if v is not None]
        return vals[-1] if vals else None

    out: dict[str, Any] = {"positions": res["positions"], "n_prompts": by_path[init]["n_prompts"],
                           "student (SFT init)": {"mean": last(by_path[init]), "std": 0.0, "n": 1}}
    for (label, _seed, _lr), job in plan.runs.items():
        row = by_path.get(os.path.join(job.out_dir, "best"))
        if row is not None and last(row) is not None:
            out.setdefault("_vals", {}).setdefault(label, []).append(last(row))
    for label, vals in out.pop("_vals", {}).items():
        out[label] = mean_std(vals)
    return out


def _columns(out: dict, families: list[str]) -> tuple[list[str], list[str]]:
    """(header after "method", the matching keys): one column per test set and the average (several sets, as the
    paper's table), or "all" and one per category (one set)."""
    if len(out["sets"]) > 1:
        return [*out["sets"], "average"], [*out["sets"], ""]
    return ["all", *families], ["", *families]


def _method_rows(out: dict, order: list[str], view: str, keys: list[str]) -> list[list[str]]:
    def cell(label: str, key: str) -> str:
        if not key:
            return fmt(out["test_rougeL"][label][view])
        if len(out["sets"]) > 1:
            return fmt(out["per_set"][label][view][key])
        return fmt(out["per_family"][label][view].get(key))
    return [[label] + [cell(label, k) for k in keys] for label in order]


def _ref_rows(out: dict, decoding: str, keys: list[str]) -> list[list[str]]:
    rows = []
    for name, m in (("teacher (SFT)", "teacher"), ("student (SFT init)", "student")):
        r = out["reference_test"][decoding][m]
        std = decoding == "sampled"

        def cell(key: str) -> str:
            if not key:
                return f"{r['rougeL']:.2f}" + (f" ± {r['rougeL_std']:.2f}" if std else "")
            if len(out["sets"]) > 1:
                return f"{r['sets'][key]:.2f}" + (f" ± {r['sets_std'][key]:.2f}" if std else "")
            return f"{r['by_category'].get(key, float('nan')):.2f}"
        rows.append([f"*{name}*"] + [cell(k) for k in keys])
    return rows


def markdown(out: dict, families: list[str]) -> str:
    b, gap = out["bench"], out["teacher_student_gap"]
    lines = [f"# Quality benchmark ({out['when']})\n", intro(out), ""]
    order = sorted(out["test_rougeL"], key=lambda l: -out["test_rougeL"][l]["sampled/best"]["mean"])
    head, keys = _columns(out, families)
    what = "one column per test set and their average" if len(out["sets"]) > 1 else "all, then per category"
    lines += ["## Headline: test ROUGE-L, sampled, best-dev checkpoint\n",
              f"Mean ± std over training seeds (each seed's score is the mean over the eval seeds); {what}; "
              "reference rows: mean ± std over the eval seeds.\n",
              _table(["method", *head], _ref_rows(out, "sampled", keys) + _method_rows(out, order, "sampled/best", keys))]
    view_head = ["method", "sampled, best dev", "sampled, last step", "greedy, best dev", "greedy, last step",
                 "best-dev step", "lr"]
    vrows = [[l] + [fmt(out["test_rougeL"][l][f"{d}/{c}"]) for d, c in VIEWS]
             + [", ".join(str(s) for s in out["best_step"][l]), f"{b['lr'][l.split('-')[0]]:g}"] for l in order]
    rt = out["reference_test"]
    vrows = [[f"*{n}*", fmt({"mean": rt["sampled"][k]["rougeL"], "std": rt["sampled"][k]["rougeL_std"]}),
              "", f"{rt['greedy'][k]['rougeL']:.2f}", "", "", ""]
             for n, k in (("teacher (SFT)", "teacher"), ("student (SFT init)", "student"))] + vrows
    avg = " (average over the test sets)" if len(out["sets"]) > 1 else ""
    lines += [f"## Every view{avg}\n", _table(view_head, vrows)]
    if out["paired"]:
        prow = [[f"promptkd − {rival}"] + [fmt_pair(p[f"{d}/{c}"]) for d, c in VIEWS]
                for rival, p in out["paired"].items()]
        lines += [f"## PromptKD against RKL and the best other method, paired by training seed{avg}\n",
                  "Mean difference of test ROUGE-L with its 95% t interval over the seeds.\n",
                  _table(["difference", *view_head[1:5]], prow)]
    lines += ["## Greedy (second view): test ROUGE-L, best-dev checkpoint\n",
              _table(["method", *head], _ref_rows(out, "greedy", keys) + _method_rows(out, order, "greedy/best", keys))]
    if out["exposure"]:
        e = out["exposure"]
        erows = [[k, fmt(v) if v.get("n", 1) > 1 else f"{v['mean']:.1f}"] for k, v in e.items()
                 if isinstance(v, dict)]
        lines += [f"## Exposure bias: ExAccErr({e['positions']}) in %, {e['n_prompts']} dev prompts, best/ of each "
                  "seed\n", _table(["student", f"ExAccErr({e['positions']})"], erows)]
    lines.append(f"Gap teacher − SFT student on test{avg}: {gap['sampled']:.2f} sampled, {gap['greedy']:.2f} greedy. "
                 + (f"Wall time {out['wall_seconds'] / 60:.1f} min from the submission to the report (SLURM chain)."
                    if out.get("launcher") == "slurm" else
                    f"Wall time {out['wall_seconds'] / 60:.1f} min on {out['machine']} ({out['workers']} runs at a time, "
                    f"launcher: {out.get('launcher', 'python')})."))
    return "\n".join(lines) + "\n"


def intro(out: dict) -> str:
    b = out["bench"]
    student = (f"{_arch(b['student'])}, its best-dev checkpoint after early stopping" if b.get("student_sft", True)
               else f"{_arch(b['student'])}, given as SFT'd")
    sets = f", test sets {', '.join(out['sets'])}" if len(out.get("sets", [])) > 1 else ""
    return (f"What was measured: test ROUGE-L of {len(out['methods'])} methods ({', '.join(out['methods'])}) on "
            f"{out['data']}{sets}, each trained for {_budget(b['steps'])} from the same SFT student "
            f"({student}) with the same SFT teacher "
            f"({_teacher(b)}), over training seeds {out['seeds']}. "
            "How: every run goes through the real launcher; each method's learning rate (prompt = student) was "
            f"picked on dev ROUGE-L with seed 1 from {b['lr_grid']} (`--search`); dev ROUGE-L (greedy) every "
            f"{b['dev_interval']}{' steps' if isinstance(b['dev_interval'], int) else ''} selects the best-dev checkpoint, as the official code does; the headline "
            "decodes the test prompts by sampling as the paper (top_p 1, top_k 0, temperature 1, eval seeds "
            f"{'/'.join(map(str, out['eval_seeds']))}, mean), with greedy and the last step as second views"
            + ("; no_repeat_ngram_size is 0 because the suite's `repeat` family legitimately repeats words"
               if out["data"] == "bundled synthetic suite" else "") + ". What it does not show: these are "
            "tiny models on a small, synthetic (or user-given) suite with one teacher and one student size, so a "
            "ranking here is evidence about the methods at this scale, not a reproduction of the paper's GPT-2 / "
            "OPT / LLaMA numbers; differences inside the paired intervals are not resolved by 3 seeds.")


def _arch(m: Any) -> str:
    """A tiny spec as "llama 4×256"; an HF dir or hub id as itself."""
    return m if isinstance(m, str) else f"{m['arch']} {m['layers']}×{m['hidden']}"


def _budget(value: Any) -> str:
    return f"{value} student updates" if isinstance(value, int) else f"{value} of student updates"


def _teacher(b: dict) -> str:
    if not b.get("teacher_sft", True):
        return f"{_arch(b['teacher'])}, given as SFT'd"
    return f"{_arch(b['teacher'])}, {b['teacher_sft_steps']} SFT steps"


def plot(out: dict, path: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    start = out["reference"]["greedy"]["student"]["dev"]["rougeL"]
    for label, by_seed in sorted(out["curves"].items()):
        xs, ys = _mean_curve([c["dev/rougeL"] for c in by_seed.values()])
        ax.plot([0] + xs, [start] + ys, marker=".", label=label,
                linestyle="--" if label in ("sft", "kd", "seqkd") else "-")
    ax.axhline(out["reference"]["greedy"]["teacher"]["dev"]["rougeL"], color="black", linestyle=":",
               label="teacher (SFT)")
    ax.set_xlabel("student update step")
    ax.set_ylabel("dev ROUGE-L (greedy, mean over training seeds)")
    if isinstance(steps, int):  # a budget in epochs: the curves' own extent
        ax.set_xlim(0, steps)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    for label in ("promptkd", "promptkd-stale"):
        if label not in out["curves"]:
            continue
        for key, style in (("prompt/guidance_kl", "-"), ("prompt/reg_kl", "--")):
            xs, ys = _mean_curve([c[key] for c in out["curves"][label].values()])
            ax2.plot(xs, ys, linestyle=style, label=f"{label}: {key.split('/')[1]}")
    ax2.set_xlabel("step")
    ax2.set_ylabel("per-token KL (mean over seeds)")
    ax2.set_title("prompt step: guidance KL(p_T^θ‖p_S) and regularizer KL(p_T^θ‖p_T)", fontsize=9)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_curve(curves: list[list]) -> tuple[list[int], list[float]]:
    points: dict[int, list[float]] = {}
    for curve in curves:
        for step, val in curve:
            points.setdefault(step, []).append(val)
    xs = sorted(points)
    return xs, [statistics.fmean(points[x]) for x in xs]


# ----------------------------------------------------------------------------- lr search

def search_report(plan: Any, bench: dict, meta: dict, results_dir: str) -> dict[str, Any]:
    """Per method and lr: the best dev ROUGE-L (greedy) of seed 1; the chosen lr maximises it."""
    grid: dict[str, dict[str, float]] = {}
    for (label, _seed, lr), job in plan.runs.items():
        grid.setdefault(label, {})[f"{lr:g}"] = _json(os.path.join(job.out_dir, "best", "best.json"))["score"]
    chosen = {label: float(max(by, key=lambda k: (by[k], -float(k)))) for label, by in grid.items()}
    lrs = [f"{x:g}" for x in bench["lr_grid"]]
    rows = [[label] + [f"{by.get(x, float('nan')):.2f}" + (" ←" if float(x) == chosen[label] else "") for x in lrs]
            for label, by in sorted(grid.items())]
    md = (f"# Learning-rate search ({meta['when']})\n\nBest dev ROUGE-L (greedy, {meta['data']}) of training "
          f"seed 1 after {bench['steps']} steps, dev every {bench['dev_interval']}; ← the chosen lr (prompt lr = "
          f"student lr). Test data was not read. Wall time {meta['wall_seconds'] / 60:.1f} min.\n\n"
          + _table(["method", *lrs], rows))
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "quality_lr_search.md"), "w") as fh:
        fh.write(md)
    return {**meta, "dev_best": grid, "chosen_lr": chosen}


# ----------------------------------------------------------------------------- student sizes

def size_report(eval_dir: str, students: dict, sizes: list[dict], bench: dict, wall: float,
                results_dir: str) -> dict[str, Any]:
    """Dev ROUGE-L of the teacher and of each converged SFT student, sampled and greedy, per family."""
    views = {d: read_view(eval_dir, d) for d in ("sampled", "greedy")}
    families = sorted(views["sampled"]["teacher"]["dev"].get("by_category", {}))
    rows, out = [], {"teacher_steps": bench.get("teacher_sft_steps"), "sizes": {}, "wall_seconds": round(wall, 1)}
    teacher = views["sampled"]["teacher"]["dev"]["rougeL"]
    for name in ["teacher", *students]:
        s, g = views["sampled"][name]["dev"], views["greedy"][name]["dev"]
        best = (_json(os.path.join(students[name].out_dir, "best", "best.json")) if name in students else {})
        out["sizes"][name] = {"sampled": s["rougeL"], "sampled_std": s.get("rougeL_std", 0.0), "greedy": g["rougeL"],
                              "by_category": s.get("by_category", {}), "best_step": best.get("step"),
                              "gap_sampled": teacher - s["rougeL"]}
        rows.append([name, f"{s['rougeL']:.2f} ± {s.get('rougeL_std', 0.0):.2f}", f"{g['rougeL']:.2f}",
                     "" if name == "teacher" else f"{teacher - s['rougeL']:.2f}", str(best.get("step", "")),
                     *(f"{s.get('by_category', {}).get(f, float('nan')):.1f}" for f in families)])
    md = ("# Student sizes (dev only)\n\nEach student is SFT'd with early stopping on dev ROUGE-L (greedy), as the "
          f"benchmark's init; the teacher is the benchmark's ({_teacher(bench)}). Dev ROUGE-L sampled (the paper's decoding, mean ± std over the eval "
          "seeds) and greedy; per-family columns are sampled.\n\n"
          + _table(["model", "sampled", "greedy", "gap to teacher (sampled)", "best-dev step", *families], rows))
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "quality_sizes.md"), "w") as fh:
        fh.write(md)
    return out


# ----------------------------------------------------------------------------- PromptKD ablation

def ablation_report(plan: Any, bench: dict, meta: dict, results_dir: str) -> dict[str, Any]:
    """Best dev ROUGE-L (greedy, seed 1) of PromptKD's variants beside promptkd and rkl."""
    rows, out = [], {}
    for (label, _seed, lr), job in plan.runs.items():
        best = _json(os.path.join(job.out_dir, "best", "best.json"))
        curves = read_metrics(job.out_dir, ("dev/rougeL", "prompt/guidance_kl", "prompt/reg_kl"))
        last = {k: (v[-1][1] if v else None) for k, v in curves.items()}
        out[label] = {"best_dev": best["score"], "best_step": best["step"], "lr": lr, "last": last}
    for label, r in sorted(out.items(), key=lambda kv: -kv[1]["best_dev"]):
        g, reg = r["last"]["prompt/guidance_kl"], r["last"]["prompt/reg_kl"]
        rows.append([label, f"{r['best_dev']:.2f}", str(r["best_step"]), f"{r['last']['dev/rougeL']:.2f}",
                     "–" if g is None else f"{g:.4f}", "–" if reg is None else f"{reg:.4f}"])
    md = (f"# PromptKD ablation on dev ({meta['when']})\n\nTraining seed 1, {bench['steps']} steps, the chosen "
          "PromptKD lr for the student; dev ROUGE-L greedy. Test data was not read. P = prompt length; plr = prompt "
          "lr relative to the student's; reg = regularizer schedule (default linear 1 − t/T).\n\n"
          + _table(["variant", "best dev", "best step", "dev at the end", "guidance KL (end)", "reg KL (end)"], rows))
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "quality_ablation.md"), "w") as fh:
        fh.write(md)
    return {**meta, "variants": out}
