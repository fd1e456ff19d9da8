"""The results page of ``cifar10_headtohead.py``: the table, the accuracy-against-latency plot, the
targets, the papers' trends with their numbers, and where the accuracy went."""

from __future__ import annotations

from pathlib import Path

from cifar10_headtohead_latency import latency_note

import numpy as np
import torch


def speedups(runs, name: str, batch: int) -> list[float]:
    """``name``'s speed-up over the base at ``batch`` in every bench run that timed it."""
    out = []
    for r in runs:
        names = [m["name"] for m in r.models]
        if name in names and r.models[0]["name"] == "base":
            out.append(1 / r.ratio(names.index(name), "latency", "ort-cpu", batch))
    return out


def table(result, runs) -> tuple[list[str], list[list[str]], list[dict[str, float]]]:
    """The results table: one row per model; latencies from the last run, speed-ups as the median (and
    range) over every interleaved bench run."""
    header = ["model", "params", "FLOPs", "ONNX size", "ORT b1 ms", "ORT b64 ms", f"speed-up b1 ({len(runs)} runs)",
              f"speed-up b64 ({len(runs)} runs)", "accuracy", "change (points)"]
    rows, nums = [], []
    base = result.models[0]
    for m in result.models:
        lat = {b: m["latency"]["ort-cpu"][str(b)]["median_ms"] for b in (1, 64)}
        ups = {b: sorted(speedups(runs, m["name"], b)) for b in (1, 64)}
        up = {b: float(np.median(v)) for b, v in ups.items()}
        shown = {b: f"{up[b]:.2f}x" + (f" ({v[0]:.2f}-{v[-1]:.2f})" if len(v) > 1 else "") for b, v in ups.items()}
        delta = 100 * (m["accuracy"] - base["accuracy"])
        nums.append({"name": m["name"], "acc": m["accuracy"], "delta": delta, "up1": up[1], "up64": up[64],
                     "range1": (ups[1][0], ups[1][-1]), "b1": lat[1], "b64": lat[64], "flops": m["flops"],
                     "params": m["params"]})
        rows.append([m["name"], f"{m['params']:,}", f"{m['flops'] / 1e6:.2f} M", f"{m['file_size'] / 1024:.0f} KiB",
                     f"{lat[1]:.3f}", f"{lat[64]:.2f}", shown[1], shown[64], f"{m['accuracy']:.4f}",
                     "-" if m is base else f"{delta:+.2f}"])
    return header, rows, nums


def md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def trends(analysis, extra) -> list[str]:
    """The papers' four trends, each with its numbers and whether it holds here."""
    taps, tol = analysis.taps, analysis.plateau_tolerance
    acc = [100 * t.accuracy for t in taps]
    p = [t.name for t in taps].index(analysis.plateau)
    rising = all(b >= a - tol for a, b in zip(acc, acc[1:]))
    after = acc[-1] - acc[p]
    plateau = p < len(taps) - 1
    out = [f"**Accuracy rises with the taps and plateaus: {'holds' if rising and plateau else 'does not hold'}.** "
           f"Probe accuracy (%) per tap: " + ", ".join(f"{t.name} {a:.2f}" for t, a in zip(taps, acc))
           + f". Plateau (first tap within {tol:g} points of the best): {analysis.plateau}; "
           + (f"the {len(taps) - 1 - p} later tap(s) change it by {after:+.2f} points." if plateau else
              "it is the last tap: the accuracy is still rising there, no plateau inside the network.")
           + ("" if rising else " The rise is not monotonic.")]
    noise = [t.stats.noise for t in taps]
    falling = all(b <= a for a, b in zip(noise, noise[1:]))
    depth = sorted([*taps, *extra.taps], key=lambda t: int("".join(filter(str.isdigit, t.name))))
    out.append(f"**Noise per filter falls with depth: {'holds' if falling else 'does not hold (not monotonic)'}"
               f"{'' if falling or noise[-1] >= noise[0] else '; it does fall from the first tap to the last'}.** "
               "n per tap: " + ", ".join(f"{t.name} {t.stats.noise:.2f}" for t in taps)
               + ". Every conv (ReLU taps on a training subset, pooling taps): "
               + ", ".join(f"{t.name.split('.')[-1]} {t.stats.noise:.2f}" for t in depth) + ".")
    last = taps[-1].stats
    ok = 1.5 <= last.cluster_size <= 3.5 and 0.7 <= last.clusters_per_filter <= 1.5
    out.append(f"**Last-layer clusters of about 2-3 labels, one per filter: {'holds' if ok else 'does not hold'}.** "
               f"{taps[-1].name}: C_s = {last.cluster_size:.2f} labels per cluster, N_c = "
               f"{last.clusters_per_filter:.2f} clusters per filter, {last.filters_without_cluster} of "
               f"{taps[-1].n_filters} filters without a cluster; cluster sizes 1/2/3/4+: "
               + "/".join(f"{f:.2f}" for f in [*last.size_fractions[:3], sum(last.size_fractions[3:])]) + ".")
    for t in (taps[-1], taps[p]) if p != len(taps) - 1 else (taps[-1],):
        counts = torch.tensor(t.stats.label_counts, dtype=torch.float64)
        cv = float(counts.std(unbiased=False) / counts.mean())
        lo, hi = int(counts.argmin()), int(counts.argmax())
        out.append(f"**Label appearances balanced across labels ({t.name}): "
                   f"{'holds' if cv <= 0.25 else 'does not hold'}** (coefficient of variation {cv:.2f}; "
                   f"threshold 0.25). Clusters per label: " + ", ".join(
                       f"{n} {int(c)}" for n, c in zip(analysis.label_names, counts))
                   + f"; fewest {analysis.label_names[lo]} ({int(counts[lo])}), most {analysis.label_names[hi]} "
                     f"({int(counts[hi])}).")
    return out


def _label(ax, points: list[tuple[str, float, float]]) -> None:
    """Name every point, each label at the first of a few offsets where it overlaps no label placed
    before it (greedy, in display pixels; the closest offset when every one overlaps)."""
    offsets = [(4, 3), (4, -10), (-4, 3), (-4, -10), (4, 12), (-4, 12), (4, -19), (-4, -19)]
    placed: list[tuple[float, float, float, float]] = []
    for name, x, y in sorted(points, key=lambda p: (-p[2], p[1])):
        px, py = ax.transData.transform((x, y))
        w, h = 6.0 * len(name) + 2, 11  # 7-point text at the figure's 110 dpi (1.53 pixels a point)
        best = None
        for dx, dy in offsets:
            x0 = px + dx * 1.53 - (w if dx < 0 else 0)
            box = (x0, py + dy * 1.53, x0 + w, py + dy * 1.53 + h)
            hits = sum(not (box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3]) for b in placed)
            if best is None or hits < best[0]:
                best = (hits, dx, dy, box)
            if hits == 0:
                break
        _, dx, dy, box = best
        placed.append(box)
        ax.annotate(name, (x, y), fontsize=7, xytext=(dx, dy), textcoords="offset points",
                    ha="right" if dx < 0 else "left")


def plot(nums: list[dict], mechanism: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 10), dpi=110, gridspec_kw={"height_ratios": [1, 1.3]})
    top = max(100 * n["acc"] for n in nums)
    for col, (key, title) in enumerate((("b1", "batch 1"), ("b64", "batch 64"))):
        for row, ax in enumerate(axes[:, col]):
            shown = nums if row == 0 else [n for n in nums if 100 * n["acc"] >= top - 5]  # row 2: the top 5 points
            for n in shown:
                name = n["name"].removesuffix(" int8")
                fam = ("base", "k") if name == "base" else ("mechanism", "tab:blue") if name in mechanism \
                    else ("Torch-Pruning @ FLOPs", "tab:orange") if name.endswith("@flops") else \
                    ("Torch-Pruning @ latency", "tab:red") if name.endswith("@latency") else \
                    ("Torch-Pruning @ params", "tab:green")
                int8 = n["name"].endswith(" int8")
                ax.scatter(n[key], 100 * n["acc"], s=40, label=fam[0] + (" (INT8)" if int8 else ""),
                           **({"facecolors": "none", "edgecolors": fam[1]} if int8 else {"color": fam[1]}))
            ax.set(xlabel=f"onnxruntime CPU latency, {title} (ms, median)", ylabel="test accuracy (%)",
                   title=title if row == 0 else f"{title}: models within 5 points of the best")
            ax.grid(alpha=0.3)
            base = next(n for n in nums if n["name"] == "base")
            if key == "b1":  # the first target's corner: at least 2x faster, within 1 point
                ax.axvline(base[key] / 2, color="grey", ls=":", lw=1)
                ax.axhline(100 * base["acc"] - 1, color="grey", ls=":", lw=1, label="target: >= 2x, <= 1 point lost")
            fig.canvas.draw()
            _label(ax, [(n["name"], n[key], 100 * n["acc"]) for n in shown])
            handles = dict(zip(*ax.get_legend_handles_labels()[::-1]))
            ax.legend(handles.values(), handles.keys(), fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prune_note(info: dict) -> str:
    if "ratio" not in info:
        return f" ({info['skipped']})" if "skipped" in info else ""
    miss = "" if abs(info["relative_error"]) <= 0.021 else ", outside the tolerance"
    return f" (ratio {info['ratio']:.3f}, {info['metric']} {100 * info['relative_error']:+.1f} %{miss})"


def seed_note(infos: dict, name: str, base_acc: float) -> str:
    """The candidate's accuracy with every fine-tuning seed it was built with (PyTorch, full test set)."""
    accs = infos.get(name, {}).get("seed_accuracy", {})
    if len(accs) < 2:
        return ""
    deltas = [100 * (a - base_acc) for a in accs.values()]
    return (f" Over fine-tuning seeds {', '.join(map(str, accs))}: accuracy "
            + " / ".join(f"{a:.4f}" for a in accs.values()) + f" ({min(deltas):+.2f} to {max(deltas):+.2f} points; "
            + ("every seed within 1 point" if min(deltas) >= -1.0 else "NOT every seed within 1 point") + ").")


def equal_latency(args, result, by: dict, criteria: list[str], mechanism: list[str]) -> list[str]:
    """The comparison at equal batch-1 latency (FP32, then INT8) and the INT8 speed of the mechanism models."""
    ref = getattr(args, "latency_reference", None)
    names = [f"{c}@latency" for c in criteria if f"{c}@latency" in by]
    out = []
    if ref in by and names:
        gaps = {}
        for suffix, label in (("", "FP32"), (" int8", "INT8")):
            r, tps = by.get(ref + suffix), [by[n + suffix] for n in names if n + suffix in by]
            if r is None or not tps:
                continue
            best = max(tps, key=lambda n: n["acc"])
            gaps[label] = 100 * (r["acc"] - best["acc"])
            def at(n: dict) -> str:
                return f"{n['acc']:.4f} at {n['b1']:.3f} ms ({n['b1'] / r['b1']:.2f}x the mechanism's latency)"

            slower = best["b1"] >= r["b1"]
            out.append(f"{label}: {r['name']} {r['acc']:.4f} at {r['b1']:.3f} ms (batch 1); the best Torch-Pruning "
                       f"criterion pruned to its latency, {best['name']}, {at(best)}: {gaps[label]:+.2f} points for the "
                       f"mechanism, against a baseline {'no faster' if slower else 'faster'} than it "
                       f"({'the gap at truly equal latency would be larger' if slower else 'part of the gap may be its speed'}); "
                       "the others: " + ", ".join(f"{n['name']} {at(n)}" for n in tps if n is not best) + ".")
        if "INT8" in gaps:
            ok = gaps["INT8"] >= 3.0
            miss = "" if ok else f"; missed by {3.0 - gaps['INT8']:.2f}"
            out.insert(0, f"**{'PASS' if ok else 'FAIL'}: at equal batch-1 latency, INT8, the mechanism model is at "
                          f"least 3 points more accurate than the best Torch-Pruning criterion** ({gaps['INT8']:+.2f} "
                          f"points{miss}"
                          f"). The baselines were pruned to {ref}'s batch-1 latency by one bisection on the FLOPs "
                          f"fraction (widths rounded to multiples of {getattr(args, 'latency_round_to', None) or 1}, "
                          f"FP32 latency timed interleaved with {ref}'s, the median of several blocks' ratios), shared "
                          "by every criterion because uniform pruning reaches the same widths whatever it ranks by, then "
                          "fine-tuned with the same budget; the final bench (one process, all models interleaved) says "
                          "how close each came.")
    int8 = [by[v + " int8"] for v in mechanism if v + " int8" in by]
    within = [n for n in int8 if n["delta"] >= -1.0]
    if int8:
        best = max(within, key=lambda n: n["up1"]) if within else max(int8, key=lambda n: n["acc"])
        ok = bool(within) and best["up1"] >= 4.0 and best["up64"] >= 3.0
        fast = result.settings.get("int8", {})
        which = "Fastest within 1 point" if within else "None within 1 point; the most accurate"
        out.append(f"**{'PASS' if ok else 'FAIL'}: an INT8 mechanism model at least 4x faster at batch 1 and 3x at "
                   f"batch 64 within 1 point.** {which}: {best['name']}, {best['up1']:.2f}x at batch 1, {best['up64']:.2f}x at batch 64, "
                   f"{best['acc']:.4f} ({best['delta']:+.2f} points)."
                   + ("" if fast.get("fast_path", True) else f" {fast.get('note', '')}"))
    return out


def write_results(args, result, runs, analysis, extra, fine, infos, targets, base_labels, sensitivity, commands,
                  mechanism, criteria) -> str:
    """Write ``<results>/<tag>.md`` and ``.png``; returns the Markdown."""
    header, rows, nums = table(result, runs)
    by = {n["name"]: n for n in nums}
    png = args.results / f"{args.tag}.png"
    plot(nums, mechanism, png)
    mech = [by[v] for v in mechanism if v in by]
    ok = [n for n in mech if n["delta"] >= -1.0]
    best = max(ok, key=lambda n: n["up1"]) if ok else max(mech, key=lambda n: n["acc"])
    t1 = bool(ok) and best["up1"] >= 2.0
    fast = max(mech, key=lambda n: n["up1"])
    tp_flops = [by[f"{c}@flops"] for c in criteria if f"{c}@flops" in by]
    best_tp = max(tp_flops, key=lambda n: n["acc"])
    mm, cov = by["mechanism-multi"], by.get("coverage@flops")
    seeded = {n: infos[n]["seed_accuracy"] for n in ["mechanism-multi", *(t["name"] for t in tp_flops)]
              if len(infos.get(n, {}).get("seed_accuracy", {})) > 1}
    means = {n: float(np.mean(list(a.values()))) for n, a in seeded.items()}
    t2 = mm["acc"] >= best_tp["acc"]
    if "mechanism-multi" in means and len(means) > 1:  # with several seeds it must hold on the means too
        t2 = t2 and means["mechanism-multi"] >= max(v for n, v in means.items() if n != "mechanism-multi")
    seed_line = "" if len(means) < 2 else (
        " Mean over fine-tuning seeds (" + "; ".join(
            f"{n}: {means[n]:.4f} over seeds {', '.join(map(str, seeded[n]))}, range "
            f"{min(seeded[n].values()):.4f}-{max(seeded[n].values()):.4f}"
            for n in sorted(means, key=means.get, reverse=True)) + ").")
    if "mechanism-multi" in means and len(means) > 1:
        rival = max((n for n in means if n != "mechanism-multi"), key=means.get)
        gap = 100 * (means["mechanism-multi"] - means[rival])
        overlap = min(seeded["mechanism-multi"].values()) <= max(seeded[rival].values())
        seed_line += (f" On the means mechanism-multi is {gap:+.2f} points against {rival}"
                      + ("; the seed ranges overlap, so at equal FLOPs the two are tied within the seed-to-seed "
                         "spread rather than one clearly ahead." if overlap else
                         "; the seed ranges do not overlap.") )
    env = result.environment
    split = "validation" if getattr(args, "val_fraction", 0) else "test"
    distill = getattr(args, "distill", None)

    def ratio(name: str) -> str:
        return next((f"{r['info']['ratio']:.3f}" for r in infos[name]["steps"] if "ratio" in r["info"]), "-")

    lines = [f"# {args.tag}: the mechanism's recipes against Torch-Pruning's criteria on CIFAR-10", "",
             f"Base: VGG-16-BN width 0.25 ({args.base}), test accuracy {by['base']['acc']:.4f} on "
             f"{result.settings['test_samples']:,} test images. Fine-tuning budget, the same for every model: "
             f"{args.finetune_epochs} epochs, SGD Nesterov lr {args.finetune_lr} cosine, momentum 0.9, wd 5e-4, "
             f"batch 100, seed 0, on {args.n_tune:,} training images "
             f"({'a fixed random subset, the same for every model' if args.n_tune < 45000 else 'all of them'})"
             + (f", distilled from the base (temperature {distill[0]:g}, alpha {distill[1]:g})" if distill else "")
             + ". " + (f"Every choice (plateau, clusters, masks, pruning and latency targets) is made on a validation "
                       f"split of {args.n_val:,} training images held out of everything that trains (the base "
                       "included); the test split only reports, once per model (the accuracy column). "
                       if split == "validation" else "Choices were made on the test split (no validation split). ")
             + f"Probes: {args.probe_epochs} epochs on {args.n_analysis:,} training images "
             f"(per-conv ReLU taps: {args.conv_stats_train:,}). mechanism-multi: trim at {analysis.plateau}, "
             f"then every conv pruned by cluster coverage to {args.flops_target:g} of the base FLOPs; baselines "
             f"pruned per layer (Torch-Pruning BasePruner, same ratio in every layer, widths "
             f"{f'multiples of {args.round_to}' if args.round_to else 'unrounded'}, classifier kept) to its FLOPs "
             f"({targets['flops']:,}) or parameters ({targets['params']:,}) within {100 * args.tol:g} % "
             "(bn-scale: BNScaleImportance where a batch-norm follows, L1 for the hidden FC layers). "
             "mechanism-multi-r8: the same with every pruned width a multiple of 8 (onnxruntime's CPU kernels are "
             "faster on such widths; the coarser widths cannot match a FLOPs target within the tolerance). "
             f"trim-conv: depth trimming at conv granularity, at the plateau ({fine.plateau}) of the pooling taps "
             f"plus a ReLU tap for every conv from the stage before {analysis.plateau} on (probes on the same "
             f"{args.n_analysis:,} images; the tolerance is the same {analysis.plateau_tolerance:g} points); "
             "trim-conv+dilute+afcc: then half of that conv's filters removed by cluster coverage and AFCC on the "
             "new head, every layer fine-tuned.", "",
             md_table(header, rows), "", f"![accuracy against latency]({png.name})", "",
             "Latency: onnxruntime CPU, median of "
             f"{result.settings['repeats']} timed calls per model in one process ({result.settings.get('timing', '')}), "
             f"{result.settings['threads']} thread(s), last bench run; speed-ups: ratio to the base within each run (all models interleaved in one process), "
             f"median and range over the {len(runs)} bench runs kept in bench-history/.", "", "## Targets", "",
             f"- **{'PASS' if t1 else 'FAIL'}: best mechanism-guided model >= 2x faster at batch 1, within 1 point.** "
             f"{best['name']}: {best['up1']:.2f}x at batch 1 (median of {len(runs)} bench runs, range "
             f"{best['range1'][0]:.2f}-{best['range1'][1]:.2f}; {best['up64']:.2f}x at batch 64), accuracy "
             f"{best['acc']:.4f} ({best['delta']:+.2f} points)." + seed_note(infos, best['name'], by['base']['acc'])
             + ("" if ok else " No mechanism model is within 1 point.")
             + (f" The fastest mechanism model, {fast['name']}, is {fast['up1']:.2f}x at {fast['delta']:+.2f} points."
                if fast is not best else ""),
             f"- **{'PASS' if t2 else 'FAIL'}: at equal FLOPs the mechanism-guided model is at least as accurate as "
             f"the best Torch-Pruning criterion.** mechanism-multi {mm['acc']:.4f} ({mm['flops'] / 1e6:.2f} M FLOPs) "
             f"against {best_tp['name']} {best_tp['acc']:.4f} ({best_tp['flops'] / 1e6:.2f} M FLOPs); others: "
             + ", ".join(f"{n['name']} {n['acc']:.4f}" for n in tp_flops if n is not best_tp)
             + (f". The coverage criterion alone on the baselines' architecture (coverage@flops): {cov['acc']:.4f}, "
                f"rank {1 + sum(n['acc'] > cov['acc'] for n in tp_flops)} of {1 + len(tp_flops)} criteria"
                if cov else "") + ". mechanism-multi differs from them by its trimming as well (everything after "
             f"{analysis.plateau} is gone, hidden FC layers included, so its convs keep more filters: per-layer ratio {ratio('mechanism-multi')} "
             f"against {ratio(best_tp['name'])})." + (seed_line or " One seed per model: differences of a few "
             "tenths of a point are within the usual seed-to-seed spread of such fine-tunings.")]
    lines += [f"- {s}" for s in equal_latency(args, result, by, criteria, mechanism)]
    lines += ["",
             "## The papers' trends in this model", ""]
    lines += [f"- {s}" for s in trends(analysis, extra)]
    lines += ["- **The plateau at conv granularity** (what trim-conv cuts at): probe accuracy (%) "
              + ", ".join(f"{t.name} {100 * t.accuracy:.2f}" for t in fine.taps) + f"; plateau {fine.plateau}."]
    lines += ["", "Full analysis report (table and figures): "
              f"[{args.tag}_analysis/report.md]({args.tag}_analysis/report.md).", "",
              "## Where the accuracy went", "", "Test accuracy per label (base, then change in points):", ""]
    shown = ["mechanism-multi", "coverage@flops", best_tp["name"], "trim", "trim+dilute+afcc", best["name"]]
    shown = [s for s in dict.fromkeys(shown) if s in infos]
    lines.append(md_table(["label", "base"] + shown, [[name, f"{100 * base_labels[k]:.1f}"] + [
        f"{100 * (infos[s]['per_label_accuracy'][k] - base_labels[k]):+.1f}" for s in shown]
        for k, name in enumerate(analysis.label_names)]))
    covs = infos["mechanism-multi"].get("coverage", {})
    lines += ["", "mechanism-multi: filters kept per conv and clusters per label among them "
              "(labels at 0 lost every cluster of that layer):", "",
              md_table(["conv", "kept", "noise n", "no-cluster filters", "min", "labels at 0"],
                       [[c, f"{v['kept']}/{v['of']}", f"{v['noise']:.2f}", str(v["no_cluster"]), str(min(v["per_label"])),
                         ", ".join(analysis.label_names[k] for k, x in enumerate(v["per_label"]) if x == 0) or "-"]
                        for c, v in covs.items()])]
    lines += ["", "Each conv alone pruned in the base to mechanism-multi's width, the kept filters chosen by cluster "
              f"coverage or by group L1, no fine-tuning (accuracy % on the first 2,000 {split} images):", "",
              md_table(["conv", "kept", "noise n", "coverage", "L1", "coverage - L1"], sensitivity)]
    worse = [r for r in sensitivity[1:] if float(r[5]) < 0]
    lost = {c for c, v in covs.items() if min(v["per_label"]) == 0}
    drops = sorted(zip(infos["mechanism-multi"]["per_label_accuracy"], base_labels, analysis.label_names),
                   key=lambda t: t[0] - t[1])[:3]
    lines += ["", f"Coverage keeps worse filters than L1 in {len(worse)} of {len(sensitivity) - 1} convs (largest gaps: "
              + ", ".join(f"{r[0]} {r[5]}" for r in sorted(worse, key=lambda r: float(r[5]))[:3]) + " points). "
              + ("No label lost every cluster in any pruned conv of mechanism-multi" if not lost else
                 f"Labels lost every cluster in {', '.join(sorted(lost))}")
              + "; its largest per-label losses: " + ", ".join(f"{n} {100 * (a - b):+.1f}" for a, b, n in drops)
              + " points."]
    lines += ["", f"## Variants ({split} accuracy after each step; pruning ratio per layer and distance to the target)",
              ""] + [
        f"- {v}: " + "; ".join(f"{r['step']}{prune_note(r['info'])}{latency_note(r['info'])} -> "
                               f"{r['after']['accuracy']:.4f} "
                               f"({r['seconds']:.0f} s)" for r in infos[v]["steps"])
        + ("; other fine-tuning seeds: " + ", ".join(f"seed {s} {a:.4f}" for s, a in infos[v]["seed_accuracy"].items()
                                                      if s) if len(infos[v].get("seed_accuracy", {})) > 1 else "")
        for v in infos]
    lines += ["", "## Commands", "", "```"] + commands + ["```", "", "## Machine", "",
              f"{env['cpu']}, {env['cpu_count']} cores ({env['cpu_affinity']} usable), load average after timing "
              f"{env['load_average']}; torch {env['torch']} ({env['torch_threads']} threads), onnxruntime "
              f"{env['onnxruntime']}, onnx {env['onnx']}, Python {env['python']}, {env['platform']}. Each bench "
              "run times all models in one process on one thread; the commands above say what else ran at the time."]
    text = "\n".join(lines) + "\n"
    (args.results / f"{args.tag}.md").write_text(text)
    return text
