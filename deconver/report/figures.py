"""Study figures (seaborn on matplotlib's Agg backend), each saved as PNG and SVG.

- per-case Dice distributions per model (one figure per dataset),
- Dice against FLOPs per voxel with marker size = parameters (the accuracy/cost picture),
- per-region Dice bars for multi-region datasets (BraTS ET/TC/WT),
- training curves per model (loss and validation Dice against epoch, mean ± sd over folds),
- the ranking analysis (deconver.report.ranking): bootstrap blob plot, ranks under several rankings
  as lines (methods, conventions), pairwise significance map.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display, ever: figures are files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from deconver.io import atomic_path  # noqa: E402

plt.rcParams["svg.hashsalt"] = "deconver"  # stable SVG ids: same data, same file
DPI = 110
MAX_POINTS = 300  # per box of a distribution plot


@dataclass(frozen=True)
class Figure:
    """A written figure: its stem, caption and the PNG and SVG paths."""

    stem: str
    title: str
    caption: str
    png: Path
    svg: Path


def save(fig, directory: Path, stem: str, title: str, caption: str) -> Figure:
    """Write `fig` as `<stem>.png` and `<stem>.svg` atomically and close it."""
    directory = Path(directory)
    png, svg = directory / f"{stem}.png", directory / f"{stem}.svg"
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    with atomic_path(svg) as tmp:
        fig.savefig(tmp, format="svg", metadata={"Date": None})
    plt.close(fig)
    return Figure(stem, title, caption, png, svg)


def _order(models, reference: str | None) -> list[str]:
    models = sorted(set(models))
    if reference in models:
        models.remove(reference)
        models.insert(0, reference)
    return models


def dice_distribution(per_case: pd.DataFrame, dataset: str, directory: Path, caption: str,
                      reference: str | None = None, title: str | None = None) -> Figure | None:
    """Per-case Dice (%) per model as box + points; multi-region datasets coloured by region."""
    d = per_case[(per_case["dataset"] == dataset) & (per_case["metric"] == "dice")].copy()
    d = d[np.isfinite(d["value"].to_numpy(dtype=float))]
    if d.empty:
        return None
    d["Dice (%)"] = d["value"] * 100
    order = _order(d["model"], reference)
    regions = list(dict.fromkeys(d["region"]))
    multi = len(regions) > 1
    width = max(4.5, 0.9 * len(order) * (1.6 if multi else 1) + 1.5)
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=(min(width, 16), 4.2))
        kw = dict(hue="region", hue_order=regions) if multi else dict(color="#8fb3d9")
        with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11 a deprecated `vert`
            warnings.simplefilter("ignore", category=matplotlib.MatplotlibDeprecationWarning)
            sns.boxplot(data=d, x="model", y="Dice (%)", order=order, showfliers=False, ax=ax, **kw)
        # the boxes summarise every case; the points are at most MAX_POINTS per box (a fixed-seed sample)
        pts = d.groupby(["model", "region"], group_keys=False)[d.columns.tolist()].apply(
            lambda g: g.sample(MAX_POINTS, random_state=0) if len(g) > MAX_POINTS else g)
        many = len(pts) > 100 * len(order)
        sns.stripplot(data=pts, x="model", y="Dice (%)", order=order, dodge=multi, size=2 if many else 3,
                      alpha=0.35 if many else 0.6,
                      ax=ax, legend=False, **(dict(hue="region", hue_order=regions, palette="dark:black")
                                               if multi else dict(color="black")))
        ax.set_xlabel("")
        ax.set_ylim(-2, 102)
        ax.set_title(title or f"{dataset}: per-case Dice")
        ax.tick_params(axis="x", rotation=30)
        if multi:
            ax.legend(title="region", loc="lower left", fontsize=8)
    return save(fig, directory, f"dice_{dataset}", f"{dataset}: per-case Dice", caption)


def dice_vs_flops(summary: pd.DataFrame, complexity: pd.DataFrame, dataset: str, region: str, directory: Path,
                  caption: str, reference: str | None = None, rule: str | None = None,
                  title: str | None = None, dims: int | None = None) -> Figure | None:
    """Mean Dice (%) against FLOPs per voxel (K, our count), marker area ∝ parameters (M).

    The reference model is also drawn hollow at its paper-convention FLOPs, joined to its full count,
    so the convention's gap is visible.
    """
    s = summary[(summary["dataset"] == dataset) & (summary["metric"] == "dice") & (summary["region"] == region)]
    if rule is not None and "rule" in s.columns:
        s = s[s["rule"] == rule]
    c = complexity[complexity["dataset"] == dataset]
    d = s.merge(c, on=["dataset", "model"], how="inner")
    d = d[np.isfinite(d["flops_per_voxel_k"].to_numpy(dtype=float)) & np.isfinite(d["mean"].to_numpy(dtype=float))]
    if d.empty:
        return None
    d = d.assign(dice_pct=d["mean"] * 100).rename(columns={"params_m": "params (M)"})
    unit = "pixel" if dims == 2 else "voxel"
    order = _order(d["model"], reference)
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        sns.scatterplot(data=d, x="flops_per_voxel_k", y="dice_pct", hue="model", hue_order=order,
                        size="params (M)", sizes=(40, 600), size_norm=(0, max(1e-9, float(d["params (M)"].max()))),
                        alpha=0.8, edgecolor="black", ax=ax, legend="brief")
        for _, r in d.iterrows():
            ax.annotate(r["model"], (r["flops_per_voxel_k"], r["dice_pct"]), textcoords="offset points",
                        xytext=(6, 6), fontsize=8)
        ref = d[d["model"] == reference]
        if len(ref) and np.isfinite(float(ref["paper_flops_per_voxel_k"].iloc[0])):
            x0, x1, y = float(ref["paper_flops_per_voxel_k"].iloc[0]), float(ref["flops_per_voxel_k"].iloc[0]), float(ref["dice_pct"].iloc[0])
            ax.plot([x0, x1], [y, y], ls=":", color="grey", lw=1)
            ax.scatter([x0], [y], s=80, facecolors="none", edgecolors="black", zorder=3)
            ax.annotate(f"{reference} (paper convention)", (x0, y), textcoords="offset points", xytext=(6, -12),
                        fontsize=7, color="dimgrey")
        xs = pd.concat([d["flops_per_voxel_k"], d["paper_flops_per_voxel_k"]]).to_numpy(dtype=float)
        xs = xs[np.isfinite(xs) & (xs > 0)]
        if xs.size and xs.max() / xs.min() > 30:
            ax.set_xscale("log")
        ax.set_xlabel(f"FLOPs per {unit} (K, every multiply-add incl. NDC, 2 per MAC)")
        ax.set_ylabel(f"mean Dice (%), {region}")
        ax.set_title(title or f"{dataset}: accuracy vs cost")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save(fig, directory, f"dice_vs_flops_{dataset}", f"{dataset}: Dice vs FLOPs", caption)


def region_bars(per_case: pd.DataFrame, dataset: str, directory: Path, caption: str,
                reference: str | None = None, seed: int = 0, title: str | None = None) -> Figure | None:
    """Mean Dice (%) per region and model, with 95% bootstrap intervals (seaborn, fixed seed)."""
    d = per_case[(per_case["dataset"] == dataset) & (per_case["metric"] == "dice")].copy()
    d = d[np.isfinite(d["value"].to_numpy(dtype=float))]
    regions = list(dict.fromkeys(d["region"]))
    if len(regions) < 2:
        return None
    d["Dice (%)"] = d["value"] * 100
    order = _order(d["model"], reference)
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(regions) * max(1, len(order) / 2.5)), 4.2))
        sns.barplot(data=d, x="region", y="Dice (%)", hue="model", hue_order=order, order=regions,
                    errorbar=("ci", 95), n_boot=1000, seed=seed, capsize=0.1, err_kws={"linewidth": 1}, ax=ax)
        ax.set_ylim(0, 105)
        ax.set_xlabel("")
        ax.set_title(title or f"{dataset}: Dice per region")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, title="model")
    return save(fig, directory, f"regions_{dataset}", f"{dataset}: Dice per region", caption)


def training_curves(training: pd.DataFrame, dataset: str, directory: Path, caption: str,
                    reference: str | None = None, title: str | None = None) -> Figure | None:
    """Loss and validation Dice against epoch per model (mean over folds, band = sd over folds)."""
    d = training[training["dataset"] == dataset]
    if d.empty or "epoch" not in d.columns:
        return None
    numeric = [c for c in d.columns if c not in ("dataset", "model", "fold", "epoch", "step")
               and pd.api.types.is_numeric_dtype(d[c])]
    loss_cols = [c for c in numeric if "loss" in c.lower()]
    dice_cols = [c for c in numeric if "dice" in c.lower()]
    loss = next((c for c in loss_cols if "train" in c.lower()), loss_cols[0] if loss_cols else None)
    dice = next((c for c in dice_cols if "val" in c.lower()), dice_cols[0] if dice_cols else None)
    panels = [(c, lab) for c, lab in ((loss, "training loss"), (dice, "validation Dice")) if c is not None]
    if not panels:
        return None
    order = _order(d["model"], reference)
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
        for ax, (col, label) in zip(axes[0], panels):
            sub = d[["model", "fold", "epoch", col]].dropna(subset=[col])
            if sub.empty:
                ax.set_visible(False)
                continue
            sns.lineplot(data=sub, x="epoch", y=col, hue="model", hue_order=order, errorbar="sd",
                         marker="o" if sub["epoch"].nunique() <= 30 else None, markersize=4, ax=ax)
            ax.set_ylabel(f"{label} ({col})")
            ax.legend(fontsize=7)
        fig.suptitle(title or f"{dataset}: training curves")
    return save(fig, directory, f"training_{dataset}", f"{dataset}: training curves", caption)


# --------------------------------------------------------------------------- ranking (deconver.report.ranking)
def _panels(n: int, width: float, height: float):
    fig, axes = plt.subplots(1, n, figsize=(min(16, width * n), height), squeeze=False)
    return fig, list(axes[0])


def _rank_axis(ax, n_models: int) -> None:
    ax.set_ylim(n_models + 0.6, 0.4)  # rank 1 on top
    ax.set_yticks(range(1, n_models + 1))
    ax.set_ylabel("rank (1 = best)")


def blob_plot(panels: list[tuple[str, pd.DataFrame, pd.DataFrame, str]], directory: Path, stem: str, title: str,
              caption: str) -> Figure | None:
    """Bootstrap rank distributions (challengeR's blob plot), one panel per (label, frequencies, summary,
    subtitle): a disc per model and rank with area ∝ the share of resamples, the median rank (×) and
    the 2.5–97.5 percentile interval (line); models ordered by their full-data rank (red dot)."""
    panels = [p for p in panels if len(p[2])]
    if not panels:
        return None
    n_models = max(len(s) for _, _, s, _ in panels)
    with sns.axes_style("whitegrid"):
        fig, axes = _panels(len(panels), max(4.2, 0.9 * n_models + 1.8), 4.4)
        for ax, (label, freq, summ, sub) in zip(axes, panels):
            order = summ.sort_values(["rank_full", "rank_median"], kind="stable").index.tolist()
            colours = dict(zip(order, sns.color_palette("colorblind", len(order))))
            x = {m: i for i, m in enumerate(order)}
            f = freq[freq["model"].isin(order)]
            ax.scatter([x[m] for m in f["model"]], f["rank"], s=f["share"] * 700, c=[colours[m] for m in f["model"]],
                       alpha=0.75, edgecolors="none", zorder=2)
            for m in order:
                r = summ.loc[m]
                ax.plot([x[m], x[m]], [r["rank_lo"], r["rank_hi"]], color="black", lw=1.2, zorder=3)
                ax.scatter([x[m]], [r["rank_median"]], marker="x", color="black", s=40, zorder=4)
                ax.scatter([x[m] + 0.28], [r["rank_full"]], marker="o", color="#c0392b", s=14, zorder=4)
            ax.set_xticks(range(len(order)))
            ax.set_xticklabels(order, rotation=30, ha="right")
            ax.set_xlim(-0.6, len(order) - 0.4)
            _rank_axis(ax, n_models)
            ax.set_title(f"{label}\n{sub}", fontsize=9)
        fig.suptitle(title, fontsize=10)
    return save(fig, directory, stem, title, caption)


def rank_lines(panels: list[tuple[str, pd.DataFrame, pd.Series | None]], directory: Path, stem: str, title: str,
               caption: str, xlabel: str = "") -> Figure | None:
    """Each model's rank under several rankings (methods, or conventions) as lines, one panel per
    (label, ranks: model × ranking, changed: model → bool or None); models whose rank changes are
    drawn solid and starred in the legend, the others dashed and faded."""
    panels = [p for p in panels if p[1].shape[0] and p[1].shape[1]]
    if not panels:
        return None
    n_cols = max(p[1].shape[1] for p in panels)
    n_models = max(p[1].shape[0] for p in panels)
    with sns.axes_style("whitegrid"):
        fig, axes = _panels(len(panels), max(4.2, 1.5 * n_cols + 2.2), 4.4)
        for ax, (label, ranks, changed) in zip(axes, panels):
            cols = list(ranks.columns)
            colours = dict(zip(ranks.index, sns.color_palette("colorblind", len(ranks))))
            for k, (model, row) in enumerate(ranks.iterrows()):
                moved = bool(changed[model]) if changed is not None else row.nunique() > 1
                jitter = (k - (len(ranks) - 1) / 2) * 0.04  # ties stay visible
                ax.plot(range(len(cols)), row.to_numpy(dtype=float) + jitter, marker="o", color=colours[model],
                        ls="-" if moved else "--", lw=2 if moved else 1, alpha=1 if moved else 0.55,
                        label=f"{model}{' *' if moved and changed is not None else ''}")
            ax.set_xticks(range(len(cols)))
            ax.set_xticklabels([c.replace(", ", ",\n").replace(" (", "\n(") for c in cols], fontsize=7)
            ax.set_xlim(-0.3, len(cols) - 0.7)
            ax.set_xlabel(xlabel)
            _rank_axis(ax, n_models)
            ax.set_title(label, fontsize=9)
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.suptitle(title, fontsize=10)
    return save(fig, directory, stem, title, caption)


def significance_map(panels: list[tuple[str, pd.DataFrame, list[str]]], directory: Path, stem: str, title: str,
                     caption: str, alpha: float = 0.05) -> Figure | None:
    """Pairwise one-sided tests as heat maps, one panel per (label, tests, model order): cell (row A,
    column B) is filled when A is significantly better than B (Holm-adjusted p < alpha), annotated with
    that p; rows and columns in ranking order."""
    from matplotlib.colors import ListedColormap

    panels = [p for p in panels if len(p[1])]
    if not panels:
        return None
    n = max(len(order) for _, _, order in panels)
    with sns.axes_style("white"):
        fig, axes = _panels(len(panels), max(4.2, 0.75 * n + 2.0), max(3.6, 0.6 * n + 1.6))
        for ax, (label, tests, order) in zip(axes, panels):
            p = tests.pivot(index="model", columns="other", values="p_holm").reindex(index=order, columns=order)
            sig = p.lt(alpha).astype(float).where(~pd.DataFrame(np.eye(len(order), dtype=bool), index=order,
                                                                   columns=order))
            text = p.map(lambda v: "" if not np.isfinite(v) else ("<.001" if v < 0.001 else f"{v:.3f}"))
            sns.heatmap(sig, ax=ax, cmap=ListedColormap(["#eef1f4", "#e3a21a"]), vmin=0, vmax=1, cbar=False,
                        annot=text.to_numpy(), fmt="", annot_kws={"fontsize": 7}, linewidths=0.5, linecolor="white",
                        square=True)
            ax.set_xlabel("… than this model")
            ax.set_ylabel("is this model better …")
            ax.tick_params(axis="x", rotation=30)
            ax.tick_params(axis="y", rotation=0)
            ax.set_title(label, fontsize=9)
        fig.suptitle(title, fontsize=10)
    return save(fig, directory, stem, title, caption)
