"""Aggregate and report steps on a hand-made study tree (evaluation.csv, complexity JSON, train logs).

No training: the tree is written here, with known values, in the layouts of docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EVAL_COLUMNS = ["study", "dataset", "model", "fold", "case", "region", "metric", "value", "gt_voxels", "pred_voxels",
                "gt_empty", "pred_empty", "spacing", "unit", "hd_impl"]
HD_IMPL = "deconver-maxdir-p95-v1"


# --------------------------------------------------------------------------- the hand-made study
def eval_rows(study, dataset, model, fold, case, region, dice, hd95, gt_empty=False, pred_empty=False, unit="mm",
              diagonal=300.0):
    """The two contract rows (dice, hd95) of one case-region, with raw values as the metrics step stores them."""
    if gt_empty and pred_empty:
        dice, hd95 = math.nan, math.nan      # raw: undefined; the rule decides
    elif gt_empty or pred_empty:
        dice, hd95 = 0.0, math.inf           # raw: one side empty
    base = dict(study=study, dataset=dataset, model=model, fold=fold, case=case, region=region,
                gt_voxels=0 if gt_empty else 100, pred_voxels=0 if pred_empty else 90, gt_empty=gt_empty,
                pred_empty=pred_empty, spacing="1.0x1.0x1.0", unit=unit, hd_impl=HD_IMPL, diagonal=diagonal)
    return [dict(base, metric="dice", value=dice), dict(base, metric="hd95", value=hd95)]


def write_eval(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


def complexity_json(params, flops_k, paper_k, latency_ms, mem_mb):
    return {"model": "x", "params": {"total": params, "trainable": params},
            "flops_per_voxel_k": flops_k, "paper_flops_per_voxel_k": paper_k,
            "latency_ms": {"forward": latency_ms, "train_step": 3 * latency_ms},
            "peak_memory_mb": {"forward": mem_mb, "train_step": 3 * mem_mb}, "device": "cpu (test)"}


def write_train_log(path: Path, seed: int, epochs=6, scale=1.0):
    rng = np.random.default_rng(seed)
    rows = []
    for e in range(epochs):
        val = (0.5 + 0.05 * e / scale) if e % 2 == 1 else math.nan
        rows.append(dict(epoch=e, step=10 * (e + 1), train_loss=scale / (e + 1) + rng.uniform(0, 0.05),
                         val_dice=val, val_dice_fg=val, lr=1e-4, seconds_per_step=0.5, peak_memory_mb=300.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


#: Hand-made per-case Dice (dice, hd95) of the "isles" dataset (preset isles22), 2 folds × 4 cases.
#: Case c7 of unet is a missed lesion (pred empty → penalised); c3 has no lesion and no prediction
#: for every model (both empty → Dice 1, HD95 0).
ISLES = {
    "deconver": {0: [(0.80, 2.0), (0.70, 4.0), (0.90, 1.0), None], 1: [(0.60, 6.0), (0.85, 2.0), (0.75, 3.0), (0.65, 5.0)]},
    "unet":     {0: [(0.70, 3.0), (0.60, 5.0), (0.80, 2.0), None], 1: [(0.50, 8.0), (0.80, 3.0), (0.70, 4.0), "miss"]},
    "segresnet": {0: [(0.82, 2.5), (0.72, 4.5), (0.88, 1.5), None], 1: [(0.61, 6.5), (0.86, 2.5), (0.74, 3.5), (0.66, 5.5)]},
}
ISLES_CASES = {0: ["c0", "c1", "c2", "c3"], 1: ["c4", "c5", "c6", "c7"]}
BRATS_REGIONS = ["ET", "TC", "WT"]
PARAMS = {"deconver": 10_476_545, "unet": 4_800_000, "segresnet": 4_700_000}
FLOPS = {"deconver": (712.0, 602.6), "unet": (300.0, 300.0), "segresnet": (500.0, 480.0)}


def make_study(tmp: Path, complexity: bool = True, tiny_cases: int = 2) -> Path:
    """Write a study config and its results tree: isles (2 folds × 4 cases, 3 models), brats (3 regions,
    2 folds × 3 cases), tiny (2 folds × `tiny_cases` cases: too few to test). Returns the config path."""
    study = "demo"
    results = tmp / "results" / study
    cfg = dict(study=study, seed=7, results_dir=str(tmp / "results"), reports_dir=str(tmp / "reports"),
               num_folds=2, folds=[0, 1],
               datasets={"isles": dict(preset="isles22", root=str(tmp / "data" / "isles"), synthetic=False, paper=True),
                         "brats": dict(preset="brats23", root=str(tmp / "data" / "brats"), synthetic=True, paper=True),
                         # other data reusing the GlaS preset: not the paper's, so no paper row for it
                         "tiny": dict(preset="glas", root=str(tmp / "data" / "tiny"), synthetic=True)},
               models=["deconver", "unet", "segresnet"], complexity=dict(activate=complexity))
    cfg_path = tmp / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    rng = np.random.default_rng(0)
    for model, folds in ISLES.items():
        for fold, vals in folds.items():
            rows = []
            for case, v in zip(ISLES_CASES[fold], vals):
                if v is None:
                    rows += eval_rows(study, "isles", model, fold, case, "lesion", 0, 0, gt_empty=True, pred_empty=True)
                elif v == "miss":
                    rows += eval_rows(study, "isles", model, fold, case, "lesion", 0, 0, pred_empty=True)
                else:
                    rows += eval_rows(study, "isles", model, fold, case, "lesion", *v)
            run = results / "runs" / "isles" / model / f"fold{fold}"
            write_eval(run / "evaluation.csv", rows)
            write_train_log(run / "train_log.csv", seed=fold, scale=1 + 0.3 * list(ISLES).index(model))
    offsets = {"deconver": 0.05, "unet": 0.0, "segresnet": 0.03}
    for model, off in offsets.items():
        for fold in (0, 1):
            rows = []
            for i in range(3):
                for j, region in enumerate(BRATS_REGIONS):
                    d = float(np.clip(0.7 + 0.08 * j + off + rng.normal(0, 0.03), 0, 1))
                    rows += eval_rows(study, "brats", model, fold, f"b{fold}{i}", region, d, 3.0 + rng.uniform(0, 2))
            run = results / "runs" / "brats" / model / f"fold{fold}"
            write_eval(run / "evaluation.csv", rows)
            write_train_log(run / "train_log.csv", seed=10 + fold, scale=1 + off)
        rows = []
        for i in range(tiny_cases):
            rows += eval_rows(study, "tiny", model, 0, f"t{i}", "gland", 0.8 + off + 0.01 * i, 10.0 - i, unit="px")
        # the tiny dataset has folds [0, 1] in the study: fold 1 holds the other cases
        write_eval(results / "runs" / "tiny" / model / "fold0" / "evaluation.csv", rows)
        rows = []
        for i in range(tiny_cases):
            rows += eval_rows(study, "tiny", model, 1, f"u{i}", "gland", 0.78 + off + 0.01 * i, 11.0 - i, unit="px")
        write_eval(results / "runs" / "tiny" / model / "fold1" / "evaluation.csv", rows)
        for fold in (0, 1):
            write_train_log(results / "runs" / "tiny" / model / f"fold{fold}" / "train_log.csv", seed=20 + fold)
    if complexity:
        for ds in ("isles", "brats", "tiny"):
            for model in ISLES:
                p = results / "complexity" / ds / f"{model}.json"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(json.dumps(complexity_json(PARAMS[model], *FLOPS[model], latency_ms=10.0 + len(model),
                                                        mem_mb=100.0 * len(model))))
    return cfg_path


# --------------------------------------------------------------------------- helpers
def deconver_cli(*args, cwd: Path, timeout=300):
    return subprocess.run([sys.executable, "-m", "deconver.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The hand-made study, aggregated and reported through the real CLI (`--config`)."""
    tmp = tmp_path_factory.mktemp("report_study")
    cfg = make_study(tmp)
    out = deconver_cli("aggregate", "--config", str(cfg), cwd=tmp)
    assert out.returncode == 0, out.stderr
    out = deconver_cli("report", "--config", str(cfg), "--resamples", "2000", cwd=tmp, timeout=900)  # ranking included
    assert out.returncode == 0, out.stderr
    assert "report.html" in out.stdout
    return dict(tmp=tmp, cfg=cfg, agg=tmp / "results" / "demo" / "aggregate", rep=tmp / "reports" / "demo")


def summary_row(agg: Path, dataset, model, region, metric, rule="penalize"):
    s = pd.read_csv(agg / "summary.csv")
    row = s[(s.dataset == dataset) & (s.model == model) & (s.region == region) & (s.metric == metric) & (s.rule == rule)]
    assert len(row) == 1, (dataset, model, region, metric, rule)
    return row.iloc[0]


# --------------------------------------------------------------------------- aggregation
def test_aggregate_gives_hand_computed_means_stds_and_counts(study):
    agg = study["agg"]
    # deconver on isles: c3 has both masks empty -> Dice 1 (penalize rule), everything else as written
    dice = [0.80, 0.70, 0.90, 1.0, 0.60, 0.85, 0.75, 0.65]
    r = summary_row(agg, "isles", "deconver", "lesion", "dice")
    assert r["n"] == 8 and r["mean"] == pytest.approx(6.25 / 8)
    assert r["std"] == pytest.approx(math.sqrt(sum((d - 6.25 / 8) ** 2 for d in dice) / 7))
    assert r["fold_mean"] == pytest.approx((3.4 / 4 + 2.85 / 4) / 2)
    assert r["fold_std"] == pytest.approx(abs(3.4 / 4 - 2.85 / 4) / math.sqrt(2))
    assert (r["n_penalized"], r["n_excluded"], r["n_both_empty"]) == (0, 0, 1)
    # unet missed c7: Dice 0 and HD95 = the image diagonal (300 mm) under 'penalize'
    r = summary_row(agg, "isles", "unet", "lesion", "hd95")
    assert r["mean"] == pytest.approx((3 + 5 + 2 + 0 + 8 + 3 + 4 + 300) / 8) and r["n_penalized"] == 1
    r = summary_row(agg, "isles", "unet", "lesion", "dice")
    assert r["mean"] == pytest.approx((0.7 + 0.6 + 0.8 + 1 + 0.5 + 0.8 + 0.7 + 0) / 8)
    # the authors' 'exclude' rule drops every HD95 with an empty mask (c3 and c7): the miss now *helps*
    r = summary_row(agg, "isles", "unet", "lesion", "hd95", rule="exclude")
    assert r["mean"] == pytest.approx((3 + 5 + 2 + 8 + 3 + 4) / 6) and r["n_excluded"] == 2 and r["n"] == 6


def test_region_mean_is_the_per_case_mean_over_regions(study):
    agg = study["agg"]
    ev = pd.concat([pd.read_csv(p) for p in sorted((study["tmp"] / "results" / "demo" / "runs" / "brats" / "unet")
                                                    .glob("fold*/evaluation.csv"))])
    dice = ev[ev.metric == "dice"]
    per_case = dice.groupby(["fold", "case"])["value"].mean()
    r = summary_row(agg, "brats", "unet", "mean", "dice")
    assert r["n"] == 6 and r["mean"] == pytest.approx(per_case.mean()) and r["std"] == pytest.approx(per_case.std())
    fold_means = per_case.groupby(level="fold").mean()
    assert r["fold_mean"] == pytest.approx(fold_means.mean()) and r["fold_std"] == pytest.approx(fold_means.std())
    et = summary_row(agg, "brats", "unet", "ET", "dice")
    assert et["mean"] == pytest.approx(dice[dice.region == "ET"]["value"].mean())


def test_aggregate_json_names_rules_units_and_synthetic(study):
    meta = json.loads((study["agg"] / "aggregate.json").read_text())
    assert meta["datasets"]["isles"]["synthetic"] is False and meta["datasets"]["brats"]["synthetic"] is True
    assert meta["datasets"]["brats"]["penalty"] == 374.0 and meta["datasets"]["isles"]["penalty"] == "diagonal"
    assert meta["datasets"]["tiny"]["hd95_unit"] == "px" and meta["datasets"]["isles"]["hd_impl"] == HD_IMPL
    assert meta["datasets"]["brats"]["regions"] == BRATS_REGIONS
    assert meta["provenance"]["deconver_version"]


# --------------------------------------------------------------------------- tables
def test_tables_in_three_formats_agree(study):
    from test_report_stats import check_latex
    from deconver.report.tables import parse_markdown_table

    tables = study["rep"] / "tables"
    for stem, n_rows in (("isles", 3), ("brats", 3), ("tiny", 3), ("ranks", 3), ("reproduction", 2)):
        md, csv, tex = (tables / f"{stem}.{ext}" for ext in ("md", "csv", "tex"))
        header, body = parse_markdown_table(md.read_text())
        frame = pd.read_csv(csv)
        assert len(body) == len(frame) == n_rows
        labels = [row[0] for row in body]
        assert labels == frame.iloc[:, 0].tolist()
        check_latex(tex.read_text(), labels)
        # every numeric Markdown cell is the CSV's number rounded as shown
        value_cols = [c for c in frame.columns[1:] if not c.endswith("_std")]
        assert len(value_cols) == len(header) - 1
        for row, (_, rec) in zip(body, frame.iterrows()):
            for cell, col in zip(row[1:], value_cols):
                if cell == "–":
                    assert pd.isna(rec[col])
                    continue
                if not re.fullmatch(r"-?\d+(\.\d+)?( ± \d+(\.\d+)?)?", cell):
                    assert cell == str(rec[col])  # a text column
                    continue
                mean, *sd = cell.split(" ± ")
                decimals = len(mean.split(".")[1]) if "." in mean else 0
                assert float(mean) == pytest.approx(round(float(rec[col]), decimals), abs=10 ** -decimals / 2 + 1e-9)
                if sd:
                    assert float(sd[0]) == pytest.approx(round(float(rec[f"{col}_std"]), decimals), abs=10 ** -decimals / 2 + 1e-9)


def test_latex_tables_compile_with_pdflatex(study, tmp_path):
    """Where pdflatex is installed (Debian: texlive-latex-base + texlive-latex-recommended), every
    table the report wrote compiles in a plain booktabs document."""
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        pytest.skip("pdflatex is not installed")
    tex = sorted((study["rep"] / "tables").glob("*.tex")) + sorted((study["rep"] / "statistics").glob("*.tex"))
    doc = tmp_path / "all.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage[a3paper,landscape,margin=1cm]{geometry}\n"
                   "\\begin{document}\n" + "".join(f"\\input{{{p}}}\n\\clearpage\n" for p in tex) + "\\end{document}\n")
    out = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:]
    assert (tmp_path / "all.pdf").stat().st_size > 1000 and len(tex) == 5 + 6


def test_dataset_table_content(study):
    md = (study["rep"] / "tables" / "isles.md").read_text()
    header, body = __import__("deconver.report.tables", fromlist=["x"]).parse_markdown_table(md)
    assert header[:5] == ["Model", "Dice %", "Dice % (fold means)", "HD95 (mm)", "Pen."]
    assert {"Params (M)", "FLOPs/vox (K), ours", "FLOPs/vox (K), paper conv.", "Latency (ms)", "Peak mem. (MB)"} <= set(header)
    rows = {r[0]: r for r in body}
    assert rows["deconver"][1] == "78.12 ± 13.35" and rows["unet"][4] == "1"
    # best per column is bold: segresnet's Dice, deconver's HD95, unet's FLOPs
    assert "| segresnet | **78.62 ± 12.79** |" in md and "**2.88 ± 2.03**" in md and "**300.0**" in md
    # the caption names the rule, the HD95 implementation and unit, the convention and the penalised count
    for text in ("penalize", HD_IMPL, "directed 95th percentiles", "HD95 in mm", "image diagonal", "paper conv.",
                 "unet 1", "DeepSpeed"):
        assert text in md, text
    brats = (study["rep"] / "tables" / "brats.md").read_text()
    header, _ = __import__("deconver.report.tables", fromlist=["x"]).parse_markdown_table(brats)
    assert [h for h in header if h.startswith("Dice % ")][:4] == ["Dice % ET", "Dice % TC", "Dice % WT", "Dice % mean"]
    assert "SYNTHETIC" in brats and "374 mm" in brats


def test_reproduction_table(study):
    md = (study["rep"] / "tables" / "reproduction.md").read_text()
    for text in ("78.16", "4.99", "607.0", "90.66", "167.5", "DeepSpeed", "NDC layer's own convolutions",
                 "synthetic stand-ins"):
        assert text in md, text
    frame = pd.read_csv(study["rep"] / "tables" / "reproduction.csv").set_index("dataset")
    assert frame.loc["isles", "dice_ours"] == pytest.approx(78.125)
    assert frame.loc["isles", "flops_paper_conv"] == pytest.approx(602.6)
    assert frame.loc["isles", "data"] == "real" and frame.loc["brats", "data"] == "synthetic"
    assert "tiny" not in frame.index and "92.12" not in md  # the GlaS preset reused for other data: no paper row


# --------------------------------------------------------------------------- statistics
def test_statistics_files(study):
    st = study["rep"] / "statistics"
    w = pd.read_csv(st / "wilcoxon.csv")
    isles = w[(w.dataset == "isles") & (w.metric == "dice") & (w.region == "lesion")].set_index("model")
    # unet loses on 7 of 8 cases (one tie): every non-zero difference is negative, W = 0
    assert isles.loc["unet", "statistic"] == 0 and isles.loc["unet", "n"] == 8
    assert isles.loc["unet", "p_holm"] < 0.05 and isles.loc["unet", "verdict"].startswith("worse than deconver")
    assert isles.loc["segresnet", "verdict"] == "no significant difference"
    tiny = w[w.dataset == "tiny"]
    assert len(tiny) and tiny["p_value"].isna().all() and tiny["verdict"].str.contains("too few cases to conclude").all()
    b = pd.read_csv(st / "bootstrap.csv")
    row = b[(b.dataset == "isles") & (b.model == "deconver") & (b.metric == "dice")].iloc[0]
    assert row["mean"] == pytest.approx(0.78125) and row["seed"] == 7
    assert row["ci_low"] < row["mean"] < row["ci_high"]
    text = (st / "tiny_dice.md").read_text()
    assert "Too few cases to conclude" in text and "Synthetic stand-in data" in text
    ranks = pd.read_csv(st / "ranks.csv").set_index("model")
    assert (ranks.loc["segresnet", "isles"], ranks.loc["deconver", "isles"], ranks.loc["unet", "isles"]) == (1, 2, 3)
    assert ranks.loc["unet", "mean_rank"] == 3


def test_ranking_section_files_and_values(study):
    rk = study["rep"] / "ranking"
    for d in ("isles", "brats", "tiny"):
        for metric in ("dice", "hd95"):
            for kind in ("bootstrap", "methods", "significance", "conventions"):
                for ext in ("md", "tex", "csv"):
                    assert (rk / f"{d}_{metric}_{kind}.{ext}").is_file()
        for kind in ("blob", "methods", "significance", "conventions"):
            for ext in ("png", "svg"):
                assert (study["rep"] / "figures" / f"ranking_{kind}_{d}.{ext}").is_file()
    # isles Dice means (by hand): segresnet 0.78625, deconver 0.78125, unet 0.6375
    boot = pd.read_csv(rk / "isles_dice_bootstrap.csv").set_index("model")
    assert boot["rank_full"].to_dict() == {"segresnet": 1, "deconver": 2, "unet": 3}
    assert boot.loc["segresnet", "mean"] == pytest.approx(78.625)
    # unet loses to both others on every case with a lesion: it is last in (nearly) every resample
    assert boot.loc["unet", "rank_median"] == 3 and boot.loc["unet", "p_first"] < 5
    methods = pd.read_csv(rk / "isles_dice_methods.csv").set_index("model")
    # segresnet vs deconver: 5 cases up, 2 down, one tie; neither wins a one-sided test after Holm
    sig = pd.read_csv(rk / "isles_dice_significance.csv").set_index("model")
    assert not sig.loc["segresnet", "vs_deconver"] < 0.05 and not sig.loc["deconver", "vs_segresnet"] < 0.05
    assert methods.loc["unet", "wins"] == 0 and methods.loc["unet", "rank_test"] == 3
    # HD95: the missed lesion of unet is penalised (300 = the diagonal) or excluded; unet is last either way
    conv = pd.read_csv(rk / "isles_hd95_conventions.csv").set_index("model")
    assert list(conv.columns) == ["v0", "v1", "changed"] and (conv["v0"] == conv["v1"]).all()
    assert conv.loc["unet", "v0"] == 3 and conv["changed"].eq("no").all()
    text = (rk / "isles_hd95_conventions.md").read_text()
    assert "suite, penalize" in text and "suite, exclude" in text and "No rank changes" in text
    stability = pd.read_csv(rk / "stability.csv")
    assert set(stability["dataset"]) == {"isles", "brats", "tiny"} and (stability["n_boot"] == 1000).all()
    assert set(stability.loc[stability["dataset"] == "brats", "region"]) == {"ET", "TC", "WT", "mean"}


# --------------------------------------------------------------------------- figures and the page
def test_figures_png_and_svg(study):
    from PIL import Image
    import xml.etree.ElementTree as ET

    figs = study["rep"] / "figures"
    stems = ["dice_isles", "dice_brats", "dice_tiny", "dice_vs_flops_isles", "dice_vs_flops_brats", "regions_brats",
             "training_isles", "training_brats", "training_tiny"]
    for stem in stems:
        with Image.open(figs / f"{stem}.png") as im:
            arr = np.asarray(im.convert("L"), dtype=float)
        assert arr.shape[0] > 200 and arr.std() > 10, stem
        root = ET.parse(figs / f"{stem}.svg").getroot()
        assert root.tag.endswith("svg")
    assert not (figs / "regions_isles.png").exists()  # one region: no per-region bars


def test_report_html_renders_in_chromium(study, tmp_path):
    from PIL import Image
    import base64
    import io

    page = study["rep"] / "report.html"
    text = page.read_text()
    imgs = re.findall(r"<img [^>]*src='([^']+)'", text)
    assert len(imgs) >= 9
    for src in imgs:  # every image decodes (embedded PNGs)
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    for text_piece in ("too few cases to conclude", "Synthetic data", "Reproduction of the paper", "Ranks across datasets",
                       "Is the ranking real?", "τ median", "ranking_blob_isles.svg"):
        assert text_piece in text
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    # a copy beside the page with a probe that counts the images the browser actually decoded
    probe = page.parent / "_probe.html"
    probe.write_text(text.replace("</body>", "<script>window.addEventListener('load',()=>{const im=[...document.images];"
                                  "document.title='IMAGES '+im.filter(i=>i.complete&&i.naturalWidth>0).length+'/'"
                                  "+im.length+' TABLES '+document.querySelectorAll('table').length;});</script></body>"))
    try:
        dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                              "--virtual-time-budget=15000", "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=120)
        shot = tmp_path / "shot.png"
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1280,2000",
                        f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink(missing_ok=True)
    title = re.search(r"<title>([^<]*)</title>", dom.stdout)
    assert title, dom.stderr[-2000:]
    m = re.fullmatch(r"IMAGES (\d+)/(\d+) TABLES (\d+)", title.group(1))
    assert m, title.group(1)
    assert m.group(1) == m.group(2) == str(len(imgs)), "an image failed to load in the browser"
    # dataset tables, reproduction + ranks, Dice + HD95 statistics, 4 ranking tables × (Dice, HD95) per dataset,
    # the learning self-check and the metric conventions
    assert "id='self-check'" in text and "id='conventions'" in text
    assert int(m.group(3)) == 3 + 2 + 3 * 2 + 3 * 8 + 1 + 1
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("RGB"), dtype=float)
    assert arr.shape[:2] == (2000, 1280)
    assert arr.std() > 20 and (arr.mean(axis=2) < 200).mean() > 0.02, "the screenshot is blank"


# --------------------------------------------------------------------------- behaviour of the steps
def test_reruns_are_no_ops_until_an_input_changes(tmp_path):
    from deconver.report.aggregate import aggregate, plan_from_study

    cfg = make_study(tmp_path, complexity=False)
    plan = plan_from_study(cfg)
    out = plan.results / "aggregate"
    first = aggregate(plan, out)
    assert not first.get("_up_to_date")
    stamp = (out / "per_case.csv").stat().st_mtime_ns
    again = aggregate(plan_from_study(cfg), out)
    assert again.get("_up_to_date") and (out / "per_case.csv").stat().st_mtime_ns == stamp
    # one changed value: recomputed
    ev = plan.results / "runs" / "isles" / "deconver" / "fold0" / "evaluation.csv"
    df = pd.read_csv(ev)
    df.loc[(df.case == "c0") & (df.metric == "dice"), "value"] = 0.0
    df.to_csv(ev, index=False)
    third = aggregate(plan_from_study(cfg), out)
    assert not third.get("_up_to_date")
    assert summary_row(out, "isles", "deconver", "lesion", "dice")["mean"] == pytest.approx(5.45 / 8)


def test_missing_inputs_are_errors_naming_the_file(tmp_path):
    cfg = make_study(tmp_path)
    results = tmp_path / "results" / "demo"
    gone = results / "runs" / "brats" / "segresnet" / "fold1" / "evaluation.csv"
    gone.unlink()
    out = deconver_cli("aggregate", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 1 and str(gone) in out.stderr
    write_eval(gone, eval_rows("demo", "brats", "segresnet", 1, "b10", "ET", 0.5, 1.0))
    cx = results / "complexity" / "isles" / "unet.json"
    cx.unlink()
    from deconver.report.aggregate import AggregateError, aggregate, plan_from_study

    with pytest.raises(AggregateError, match=re.escape(str(cx))):
        aggregate(plan_from_study(cfg), results / "aggregate")
    # and the report step names the aggregate file it lacks
    out = deconver_cli("report", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 1 and "aggregate.json" in out.stderr


def test_complexity_deactivated_omits_its_columns(tmp_path):
    from deconver.report.aggregate import aggregate, plan_from_study
    from deconver.report.render import report
    from deconver.report.tables import parse_markdown_table

    cfg = make_study(tmp_path, complexity=False)  # no complexity/ folder at all
    plan = plan_from_study(cfg)
    meta = aggregate(plan, plan.results / "aggregate")
    assert meta["complexity"] is False and not (plan.results / "aggregate" / "complexity.csv").exists()
    rep = tmp_path / "reports" / "demo"
    manifest = report(plan.results / "aggregate", rep, n_resamples=500)
    header, body = parse_markdown_table((rep / "tables" / "isles.md").read_text())
    assert len(body) == 3 and not any("FLOPs" in h or "Params" in h or "Latency" in h for h in header)
    assert not any(f.startswith("figures/dice_vs_flops") for f in manifest["files"])
    assert (rep / "report.html").is_file()
    # a rerun of the report is a no-op
    stamp = (rep / "tables" / "isles.md").stat().st_mtime_ns
    assert report(plan.results / "aggregate", rep, n_resamples=500).get("_up_to_date")
    assert (rep / "tables" / "isles.md").stat().st_mtime_ns == stamp


def test_hand_use_without_a_config_matches(study, tmp_path):
    results = tmp_path / "demo"
    shutil.copytree(study["tmp"] / "results" / "demo" / "runs", results / "runs")
    # the prepared manifest marks 'tiny' synthetic; the command line marks 'brats'
    (results / "prepared" / "tiny").mkdir(parents=True)
    (results / "prepared" / "tiny" / "manifest.json").write_text(json.dumps({"synthetic": True, "cases": {}}))
    out = deconver_cli("aggregate", "--results", str(results), "--out", str(tmp_path / "agg"),
                       "--synthetic", "brats", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cols = ["dataset", "model", "region", "metric", "rule", "n", "mean", "std", "fold_mean", "n_penalized"]
    a = pd.read_csv(tmp_path / "agg" / "summary.csv")[cols]
    b = pd.read_csv(study["agg"] / "summary.csv")[cols]
    pd.testing.assert_frame_equal(a.sort_values(cols[:5]).reset_index(drop=True),
                                  b.sort_values(cols[:5]).reset_index(drop=True))
    meta = json.loads((tmp_path / "agg" / "aggregate.json").read_text())
    assert meta["datasets"]["brats"]["synthetic"] and meta["datasets"]["tiny"]["synthetic"]
    assert not meta["datasets"]["isles"]["synthetic"] and meta["complexity"] is False
    out = deconver_cli("report", "--aggregate", str(tmp_path / "agg"), cwd=tmp_path)
    assert out.returncode == 2 and "--out" in out.stderr  # hand use needs an output folder


def test_models_that_do_not_fit_a_dataset_are_left_out(tmp_path):
    """The runs are the study plan's (deconver.plan, as in the workflow): a 2D-only model is left out
    of the 3D datasets with the reason, and a model that fits none of them stops aggregate as it stops
    the workflow."""
    from deconver.plan import PlanError
    from deconver.report.aggregate import plan_from_study

    cfg_path = make_study(tmp_path)
    results = tmp_path / "results" / "demo"
    shutil.copytree(results / "runs" / "tiny" / "unet", results / "runs" / "tiny" / "smp_unet")
    shutil.copy(results / "complexity" / "tiny" / "unet.json", results / "complexity" / "tiny" / "smp_unet.json")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["models"] = ["deconver", "unet", "segresnet", "smp_unet"]  # smp_unet is 2D-only: runs on tiny only
    cfg_path.write_text(yaml.safe_dump(cfg))
    plan = plan_from_study(cfg_path)
    for ds in plan.datasets:
        if ds.name == "tiny":
            assert ds.models == ["deconver", "unet", "segresnet", "smp_unet"] and not ds.skipped_models
        else:
            assert ds.models == ["deconver", "unet", "segresnet"] and "2D" in ds.skipped_models["smp_unet"]
    cfg["datasets"].pop("tiny")  # 3D datasets only: smp_unet fits none
    cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(PlanError, match=r"models: \['smp_unet'\] fit none of the datasets"):
        plan_from_study(cfg_path)


def test_real_evaluate_output_aggregates_and_reports(tmp_path):
    """The metrics and complexity steps' own outputs (real NIfTI label maps through `evaluate_folder`,
    records of `deconver.complexity.record.measure` on two small conv nets) go through aggregate and
    report: BraTS regions, the 374 mm penalty of a missed ET, challenge metrics carried, FLOPs read from
    the right field (analytic: 2 × MACs per voxel)."""
    nib = pytest.importorskip("nibabel")
    import torch
    from deconver.complexity.record import measure
    from deconver.metrics.evaluate import evaluate_folder
    from deconver.report.aggregate import aggregate, plan_from_tree
    from deconver.report.render import report

    def save(arr, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr.astype(np.uint8), np.diag([1.0, 1.0, 1.0, 1.0])), str(path))

    gt_dir = tmp_path / "gt"
    rng = np.random.default_rng(0)
    truths = {}
    for i in range(3):
        lab = np.zeros((24, 24, 24), np.uint8)
        lab[4:18, 4:18, 4:18] = 2          # edema (WT)
        lab[7:15, 7:15, 7:15] = 1          # necrosis (TC)
        lab[9:13, 9:13, 9:13 + i] = 3      # enhancing (ET)
        truths[f"BraTS-GLI-0000{i}-000"] = lab
        save(lab, gt_dir / f"BraTS-GLI-0000{i}-000.nii.gz")
    results = tmp_path / "results" / "real"
    for model, shift in (("deconver", 0), ("unet", 1)):
        pred_dir = tmp_path / "pred" / model
        for case, lab in truths.items():
            pred = np.roll(lab, shift + int(rng.integers(0, 2)), axis=0)
            if model == "unet" and case.endswith("2-000"):
                pred[pred == 3] = 1        # unet misses the enhancing tumour of one case
            save(pred, pred_dir / f"{case}.nii.gz")
        evaluate_folder(pred_dir, gt_dir, "brats23", results / "runs" / "brats23" / model / "fold0" / "evaluation.csv",
                        study="real", dataset="brats23", model=model, fold=0)
    macs = {"deconver": 4 * 8 * 27 + 8 * 3, "unet": 4 * 4 * 27 + 4 * 3}  # per voxel: k³·Cin·Cout of each conv
    for model, width in (("deconver", 8), ("unet", 4)):
        net = torch.nn.Sequential(torch.nn.Conv3d(4, width, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(width, 3, 1))
        record = measure(net, in_channels=4, roi=[16, 16, 16], device="cpu", runtime=True, repeats=2, warmup=1)
        path = results / "complexity" / "brats23" / f"{model}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": model, "dataset": "brats23", **record}, default=str))
    meta = aggregate(plan_from_tree(results, paper=[p.name for p in (results / "runs").iterdir()]),
                     results / "aggregate")  # by hand, the paper's datasets are named with --paper
    assert meta["complexity"] is True
    cx = pd.read_csv(results / "aggregate" / "complexity.csv").set_index("model")
    for model, n in macs.items():
        assert cx.loc[model, "flops_per_voxel_k"] == pytest.approx(2 * n / 1e3)
        assert cx.loc[model, "latency_ms"] > 0 and cx.loc[model, "runtime_roi"] == "16x16x16"
    assert cx.loc["deconver", "params_m"] == pytest.approx((4 * 8 * 27 + 8 + 8 * 3 + 3) / 1e6)
    ds = meta["datasets"]["brats23"]
    assert ds["regions"] == ["ET", "TC", "WT"] and ds["penalty"] == 374.0 and ds["hd95_unit"] == "mm"
    assert ds["hd_impl"]  # named by the metrics step
    pc = pd.read_csv(results / "aggregate" / "per_case.csv", dtype={"case": str})
    miss = pc[(pc.model == "unet") & (pc.case == "BraTS-GLI-00002-000") & (pc.region == "ET")].set_index("metric")
    assert miss.loc["dice", "value"] == 0 and miss.loc["hd95", "value"] == 374.0
    assert miss.loc["hd95", "status"] == "penalized"
    assert summary_row(results / "aggregate", "brats23", "unet", "ET", "dice")["n_penalized"] == 1
    assert len(set(pc["metric"]) - {"dice", "hd95", "nsd"}) > 0  # the challenge's lesion-wise metrics came through
    manifest = report(results / "aggregate", tmp_path / "report", n_resamples=500)
    text = (tmp_path / "report" / "tables" / "brats23.md").read_text()
    assert "| unet |" in text and "0/0/0" in text and "1/0/0" in text and "374 mm" in text
    assert "FLOPs/vox (K), ours" in text and "| 1.8 |" in text.replace("**", "")
    assert "report.html" in manifest["files"]
    # the metric conventions, from the same label maps: suite and challenge here (no prepared-grid masks by hand)
    conv = pd.read_csv(tmp_path / "report" / "tables" / "conventions.csv").set_index("dataset / model")
    summ = pd.read_csv(results / "aggregate" / "conventions_summary.csv")
    assert set(summ["convention"]) == {"suite", "challenge"}
    for conv_name in ("suite", "challenge"):
        row = summ[(summ.convention == conv_name) & (summ.model == "unet") & (summ.region == "mean")
                   & (summ.metric == "hd95")]
        assert conv.loc["brats23 / unet", f"hd95_{conv_name}"] == pytest.approx(row["mean"].item())
    md = (tmp_path / "report" / "tables" / "conventions.md").read_text()
    assert "dice % (suite)" in md and "hd95 (challenge)" in md and "brats23 lw hd95 (challenge)" in md
    repro = pd.read_csv(tmp_path / "report" / "tables" / "reproduction.csv")
    assert {"dice_authors", "hd95_authors", "dice_suite", "hd95_suite"} <= set(repro.columns)
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Metric conventions" in html
