"""Render a latency report (the report.json dict) as Markdown and PNG plots.

matplotlib is optional (``pip install 'ats-deploy[plot]'``) and imported only here, through its
object-oriented API (``matplotlib.figure.Figure``): no pyplot, no global backend switch, no display.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import DependencyError

__all__ = ["render_markdown", "render_plots", "PLOTS"]

PLOTS = ("latency_vs_batch.png", "tokens_per_block.png", "kept_histogram.png")


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise DependencyError("matplotlib is not installed (pip install 'ats-deploy[plot]')") from None
    return Figure(figsize=(width, height), dpi=110)


def render_plots(data: dict, path_for: Callable[[str], Path]) -> list[str]:
    """Write the PNGs; ``path_for(name)`` gives the (temporary) path to write each one to.

    Returns the file names written. Raises :class:`DependencyError` when matplotlib is missing.
    """
    written: list[str] = []
    rows = data["latency"]
    batches = [r["batch"] for r in rows]
    fig = _figure(9.0, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    for key, colour in (("dense", "tab:gray"), ("ats", "tab:blue")):
        p50 = [r[key]["p50_ms"] for r in rows]
        p90 = [r[key]["p90_ms"] for r in rows]
        p99 = [r[key]["p99_ms"] for r in rows]
        err = [[0.0] * len(rows), [b - a for a, b in zip(p50, p90)]]
        label = "dense" if key == "dense" else "ATS"
        ax1.errorbar(batches, p50, yerr=err, marker="o", capsize=3, color=colour, label=f"{label} p50 (bar: p90)")
        ax1.plot(batches, p99, linestyle=":", color=colour, label=f"{label} p99")
        ax2.plot(batches, [r[key]["throughput_ips"] for r in rows], marker="o", color=colour, label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch")
        ax.grid(True, alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("latency per batch (ms)")
    ax1.legend(fontsize=7)
    ax2.set_ylabel("throughput (images/s)")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{data['backend']['name']} ({data['backend'].get('precision', '')}): ATS vs dense", fontsize=10)
    fig.tight_layout()
    fig.savefig(path_for(PLOTS[0]), format="png")
    written.append(PLOTS[0])

    tokens = data.get("tokens")
    if tokens and tokens["blocks"]:
        blocks = tokens["blocks"]
        idx = [b["block"] for b in blocks]
        fig = _figure(6.0, 3.6)
        ax = fig.subplots()
        ax.fill_between(
            idx, [b["kept_p10"] for b in blocks], [b["kept_p90"] for b in blocks], alpha=0.3, label="p10-p90"
        )
        ax.plot(idx, [b["kept_mean"] for b in blocks], marker="o", label="mean K'")
        prefix = tokens["prefix_tokens"]
        ax.step(idx, [b["slots_out"] - prefix for b in blocks], where="mid", linestyle="--", label="static slots")
        n_patches = data["model"]["ats"]["n_ref"] - 1
        ax.axhline(n_patches, color="tab:gray", linestyle=":", label="dense")
        ax.set_xlabel("block")
        ax.set_ylabel("patch tokens kept (K')")
        ax.set_xticks(idx)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"tokens kept per ATS block ({tokens['images']} images)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path_for(PLOTS[1]), format="png")
        written.append(PLOTS[1])

        cols = min(4, len(blocks))
        rows_n = -(-len(blocks) // cols)
        fig = _figure(2.6 * cols, 2.0 * rows_n + 0.4)
        axes = fig.subplots(rows_n, cols, squeeze=False)
        for ax, b in zip(axes.flat, blocks):
            edges, counts = b["hist"]["edges"], b["hist"]["counts"]
            ax.stairs(counts, edges, fill=True, alpha=0.7)
            ax.axvline(b["kept_mean"], color="k", linewidth=0.8)
            ax.set_xlim(edges[0], edges[-1])
            ax.set_title(f"block {b['block']} (K={b['k']})", fontsize=8)
            ax.set_xlabel("K' (patch tokens kept)", fontsize=7)
            ax.set_ylabel("images", fontsize=7)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(blocks) :]:
            ax.set_visible(False)
        fig.suptitle("K' histogram per ATS block (line: mean)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path_for(PLOTS[2]), format="png")
        written.append(PLOTS[2])
    return written


def _f(v, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def render_markdown(data: dict) -> str:
    """One page: setup, latency table with the gate, tokens, GFLOPs, parity, environment, plots."""
    arch, ats, be = data["model"]["architecture"], data["model"]["ats"], data["backend"]
    st, gate = data["settings"], data["gate"]
    out = [
        "# ATS latency report",
        "",
        f"- export: `{data['export']['dir']}` ({data['export']['source'].get('kind', '?')})",
        f"- model: ViT {arch['img_size']}/{arch['patch_size']}, dim {arch['embed_dim']}, depth {arch['depth']}, "
        f"heads {arch['num_heads']}; ATS blocks {ats['blocks']} K {ats['k_schedule']} ({ats['shape_mode']}), "
        f"n_ref {ats['n_ref']}",
        f"- backend: {be['name']} on {be.get('device', '?')}, {be.get('precision', '?')}, "
        f"CUDA graphs {'on' if be.get('cuda_graphs') else 'off'}; timer: {be.get('timer', '?')}"
        + (f"; sampler: {be['sampler']}" if be.get("sampler") else ""),
        f"- {st['reps']} interleaved reps after {st['warmup']} warm-up per model and batch; "
        f"dense = same weights without ATS",
        "",
        "## Latency",
        "",
        "| batch | model | p50 ms | p90 ms | p99 ms | images/s | ATS/dense p50 | paired ratio [95% CI] "
        "| token work | ATS share |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["latency"]:
        for key in ("dense", "ats"):
            s = r[key]
            cells = ["", "", "", ""]
            if key == "ats":
                pr, share = r.get("ratio_paired"), r.get("ats_node_share")
                cells = [
                    f"**{r['ratio_p50']:.3f}**",
                    f"{pr['median']:.3f} [{pr['low']:.3f}, {pr['high']:.3f}]" if pr else "-",
                    _f(r.get("token_work_ratio")),
                    f"{share['overall']:.1%}" if share else "-",
                ]
            out.append(
                f"| {r['batch']} | {'ATS' if key == 'ats' else 'dense'} | {_f(s['p50_ms'])} | {_f(s['p90_ms'])} "
                f"| {_f(s['p99_ms'])} | {s['throughput_ips']:.1f} | " + " | ".join(cells) + " |"
            )
    out += [
        "",
        "Paired ratio: median over rounds of ATS/dense measured side by side, with a bootstrap interval. Token "
        "work: input slots summed over blocks, ATS over dense (dynamic shapes: what each batch really ran); "
        "the ratio cannot beat it by much. ATS share: score and sampler nodes' share of ONNX Runtime's node "
        "time (profiler, an upper estimate).",
    ]
    for r in data["latency"]:
        if r.get("slots_per_block") and ats["shape_mode"] == "dynamic":
            out.append(f"- batch {r['batch']}: slots processed per block {r['slots_per_block']}")
        share = r.get("ats_node_share")
        if share:
            per = ", ".join(f"{b}: {v:.0%}" for b, v in share["per_block"].items())
            out.append(f"- batch {r['batch']}: score+sampler share of each ATS block's node time: {per}")
    out.append("")
    if gate["max_slowdown"] is None:
        out.append("Gate: none (pass --max-slowdown to gate ATS p50 / dense p50).")
    else:
        out.append(
            f"Gate (ATS p50 / dense p50 <= {gate['max_slowdown']:g} at every batch): "
            f"**{'PASS' if gate['passed'] else 'FAIL'}**"
        )
        out += [f"- {f}" for f in gate["failures"]]
    tok = data.get("tokens")
    if tok:
        out += [
            "",
            f"## Tokens kept per ATS block ({tok['images']} images; K' = patch tokens, CLS excluded)",
            "",
            "| block | K | slots in | slots out | K' mean | p10 | p90 | min | max |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b in tok["blocks"]:
            out.append(
                f"| {b['block']} | {b['k']} | {b['slots_in']} | {b['slots_out']} | {b['kept_mean']:.1f} "
                f"| {b['kept_p10']:.1f} | {b['kept_p90']:.1f} | {b['kept_min']} | {b['kept_max']} |"
            )
    fl = data["flops"]
    out += [
        "",
        "## GFLOPs per image",
        "",
        f"Convention: {fl['convention']}.",
        "",
        "| model | GFLOPs | vs dense |",
        "|---|---:|---:|",
        f"| dense | {fl['dense_gflops']:.3f} | 1.000 |",
        f"| ATS, static slots (what the static graph computes) | {fl['ats_static_gflops']:.3f} "
        f"| {fl['ats_static_gflops'] / fl['dense_gflops']:.3f} |",
        f"| ATS, data-dependent from K' (paper's average) | {fl['ats_data_dependent_gflops']:.3f} "
        f"| {fl['ats_data_dependent_gflops'] / fl['dense_gflops']:.3f} |",
    ]
    par = data.get("parity") or {}
    out += ["", "## Parity", ""]
    if par.get("reference") is None:
        out.append(f"Skipped: {par.get('skipped', 'no reference')}.")
    else:
        out += [
            f"Against {par['reference']} ({par['images']} images, tolerances for {par['precision']}): "
            f"**{'PASS' if par['passed'] else 'FAIL'}**",
            "",
            f"- logits max abs {par['logits_max_abs']:.3g} (gate {par['tolerances']['logits_atol']:.3g})",
            f"- top-1 agreement {par['top1_agreement']:.2%}",
            f"- kept-set agreement {par['kept_agreement']:.2%} over {par['kept_pairs']} (image, block) pairs",
        ]
        out += [f"- FAILED: {f}" for f in par["failures"]]
    env = data["environment"]
    out += ["", "## Environment", ""]
    out.append("- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    out.append(f"- host: {env.get('cpu', '?')} ({env.get('cpu_count', '?')} CPUs), {env['platform']}")
    if "gpu" in env:
        out.append(f"- GPU: {env['gpu']} (CUDA {env.get('cuda')})")
    if "jetson" in env:
        j = env["jetson"]
        out.append(f"- Jetson: {j.get('model')}; {j.get('l4t')}")
        out.append(f"- power mode: {j.get('power_mode')}")
        clocks = j.get("clocks")
        if isinstance(clocks, dict):
            out.append("- clocks: " + ", ".join(f"{k} {v}" for k, v in clocks.items()))
        else:
            out.append(f"- clocks: {clocks}")
    else:
        out.append("- Jetson: no (power mode and clocks not applicable)")
    if data.get("plots"):
        out += ["", "## Plots", ""]
        out += [f"![{p}]({p})" for p in data["plots"]]
    if data.get("warnings"):
        out += ["", "## Warnings", ""]
        out += [f"- WARNING: {w}" for w in data["warnings"]]
    return "\n".join(out) + "\n"
