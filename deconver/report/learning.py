"""The study's self-check: did each model learn? Its final validation Dice against the trivial baselines.

A broken step — a loss with its sign flipped, a label decoded wrongly, an augmentation that destroys
the target — leaves a model no better than a constant prediction. For every (dataset, model) the
aggregation compares the model's mean Dice over its validation cases (after the dataset's empty-mask
rule; the per-case mean over regions for multi-region datasets) with two trivial predictors on the
same cases and regions:

- **all background** (predict nothing): Dice 1 on a case whose region is empty, else 0;
- **all foreground** (every voxel of the native image): Dice ``2 G / (G + N)`` with ``G`` the region's
  ground-truth voxels and ``N`` the image's voxels (from the prepared manifest's native shape).

A model whose Dice is not at least `LEARN_MARGIN` above the better of the two "did not learn": the
aggregate JSON lists it (``did_not_learn``, and per dataset ``learning``) and the report flags it in red.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: How far (absolute Dice, 0–1) a model must be above the better trivial baseline to count as learned.
LEARN_MARGIN = 0.1
DID_NOT_LEARN = "did not learn"


def native_voxels(manifest: Path) -> dict[str, int]:
    """case id -> voxels of its native image (product of ``geometry.native_shape``); {} without a manifest."""
    if not manifest.is_file():
        return {}
    cases = json.loads(manifest.read_text()).get("cases", [])
    if isinstance(cases, dict):
        cases = list(cases.values())
    out = {}
    for entry in cases:
        shape = (entry.get("geometry") or {}).get("native_shape")
        if shape:
            out[str(entry["id"])] = int(np.prod(shape))
    return out


def trivial_dice(gt_voxels: float, total_voxels: float | None) -> tuple[float, float]:
    """(all background, all foreground) Dice of one region of one case; all foreground is NaN when the
    image size is unknown."""
    gt = float(gt_voxels)
    background = 1.0 if gt == 0 else 0.0
    if total_voxels is None or not total_voxels:
        return background, math.nan
    return background, 2 * gt / (gt + float(total_voxels))


def baselines(raw: pd.DataFrame, voxels: dict[str, int]) -> pd.DataFrame:
    """Per (model, fold, case): the trivial baselines' Dice, averaged over the case's regions.

    `raw` is the dataset's evaluation rows (one convention); its ``dice`` rows carry ``gt_voxels``."""
    dice = raw[raw["metric"] == "dice"]
    if dice.empty:
        return pd.DataFrame(columns=["model", "fold", "case", "all_background", "all_foreground"])
    pairs = [trivial_dice(g, voxels.get(str(c))) for g, c in zip(dice["gt_voxels"].astype(float), dice["case"])]
    frame = dice[["model", "fold", "case", "region"]].copy()
    frame["all_background"], frame["all_foreground"] = [p[0] for p in pairs], [p[1] for p in pairs]
    return frame.groupby(["model", "fold", "case"], as_index=False)[["all_background", "all_foreground"]].mean()


def learning_check(per_case: pd.DataFrame, raw: pd.DataFrame, voxels: dict[str, int],
                   margin: float = LEARN_MARGIN) -> dict[str, dict[str, Any]]:
    """model -> its Dice, the two baselines, the margin and whether it learned (see the module docstring).

    `per_case` is the dataset's per-case table after its empty-mask rule (with a ``mean`` region when
    it has several); `raw` its evaluation rows before the rule."""
    dice = per_case[per_case["metric"] == "dice"]
    regions = set(dice["region"])
    region = "mean" if "mean" in regions else (sorted(regions)[0] if regions else None)
    base = baselines(raw, voxels)
    out: dict[str, dict[str, Any]] = {}
    for model, rows in dice[dice["region"] == region].groupby("model", sort=True):
        value = float(pd.to_numeric(rows["value"], errors="coerce").mean())
        mine = base[base["model"] == model]
        bg = float(mine["all_background"].mean()) if len(mine) else math.nan
        fg = float(mine["all_foreground"].mean()) if len(mine) and mine["all_foreground"].notna().all() else math.nan
        best = max([b for b in (bg, fg) if not math.isnan(b)], default=0.0)
        learned = bool(not math.isnan(value) and value >= best + margin)
        out[str(model)] = dict(dice=_num(value), all_background=_num(bg), all_foreground=_num(fg), margin=margin,
                               cases=int(rows[["fold", "case"]].drop_duplicates().shape[0]), region=region,
                               learned=learned, verdict="learned" if learned else DID_NOT_LEARN)
    return out


def _num(v: float) -> float | None:
    return None if v is None or math.isnan(v) else round(float(v), 6)


# --------------------------------------------------------------------------- the report's view
#: CSS of the self-check (the report's stylesheet adds it): a failed model is red.
CSS = (".alarm{background:#fde8e8;border:1px solid #c62828;color:#8e0000;padding:.6em 1em}"
       "tr.failed td,tr.failed th{background:#fde8e8;color:#8e0000;font-weight:600}")


def failures(meta: dict[str, Any]) -> list[str]:
    """``dataset/model`` of every model that did not learn (from aggregate.json)."""
    return [f"{d}/{m}" for d, ds in meta.get("datasets", {}).items()
            for m, c in (ds.get("learning") or {}).items() if not c.get("learned")]


def section_html(meta: dict[str, Any]) -> str:
    """The report's self-check section: every (dataset, model) with its Dice, the trivial baselines and
    the verdict, failed rows in red, preceded by a red banner naming them when there are any."""
    import html

    rows, failed = [], failures(meta)
    for d, ds in meta.get("datasets", {}).items():
        for m, c in (ds.get("learning") or {}).items():
            cells = [c.get("dice"), c.get("all_background"), c.get("all_foreground")]
            text = ["—" if v is None else f"{100 * v:.1f}" for v in cells]
            cls = "" if c.get("learned") else " class='failed'"
            rows.append(f"<tr{cls}><th scope='row'>{html.escape(d)}</th><td>{html.escape(m)}</td>"
                        + "".join(f"<td>{t}</td>" for t in text) + f"<td>{html.escape(c.get('verdict', ''))}</td></tr>")
    if not rows:
        return ""
    parts = ["<section id='self-check'><h2>Self-check: did every model learn?</h2>"]
    if failed:
        parts.append(f"<p class='alarm'><b>{len(failed)} model run(s) did not learn:</b> {html.escape(', '.join(failed))}. "
                     f"Their validation Dice is not {100 * LEARN_MARGIN:.0f} points above the better trivial baseline "
                     "(predicting all background or all foreground): look for a broken step (loss, labels, "
                     "augmentation, a too small training budget) before reading their numbers.</p>")
    else:
        parts.append(f"<p>Every model's validation Dice is at least {100 * LEARN_MARGIN:.0f} points above the better "
                     "trivial baseline (predicting all background or all foreground).</p>")
    parts += ["<table><thead><tr><th>dataset</th><th>model</th><th>Dice (%)</th><th>all background (%)</th>"
              "<th>all foreground (%)</th><th>verdict</th></tr></thead><tbody>", *rows, "</tbody></table>",
              "<p class='note'>Mean Dice over the validation cases (the per-case mean over regions where there are "
              "several), after the dataset's empty-mask rule; the baselines on the same cases: all background scores "
              "1 on a case whose region is empty, all foreground 2G/(G+N) with G target and N image voxels "
              "(native grid).</p></section>"]
    return "\n".join(parts)
