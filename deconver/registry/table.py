"""`deconver models`: the table of registered models × datasets (parameters, constraints, problems)."""
from __future__ import annotations

import functools
import json
import sys
from typing import Sequence

from deconver.registry import Constraints, ModelBuildError, ModelError, Registry, default_registry


def configure(parser) -> None:
    """Arguments of `deconver models`."""
    parser.add_argument("pattern", nargs="?", default=None, help="only models matching this shell wildcard, e.g. '*unet*'")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--config", help="a study config: adds its model_dirs; columns are its datasets "
                        "(with overrides) and parameters use its model keyword arguments")
    parser.add_argument("--dataset", action="append", default=None, help="only this dataset/preset (repeatable)")
    parser.add_argument("--model-dir", action="append", default=[], help="an extra folder of model files (repeatable)")
    parser.add_argument("--no-params", action="store_true", help="skip building models to count parameters")


def describe_models(pattern: str | None = None, *, config: str | None = None, datasets: Sequence[str] | None = None,
                    model_dirs: Sequence[str] = (), params: bool = True, registry: Registry | None = None) -> dict:
    """What `deconver models` prints, as data: per model its metadata and parameters per dataset preset."""
    from tqdm import tqdm

    from deconver.config import available_presets, load_preset, load_study
    from deconver.plan import fit_problem

    if config is not None:  # the study's datasets and kwargs: the same check as its plan (deconver.plan)
        study = load_study(config)
        columns = {d: (study.preset(d), functools.partial(study.model_kwargs, d)) for d in study.datasets}
        model_dirs = [*study.model_dirs, *model_dirs]
    else:
        columns = {p: (load_preset(p), lambda m: {}) for p in available_presets()}
    if datasets:
        unknown = [d for d in datasets if d not in columns]
        if unknown:
            raise ModelError(f"unknown dataset(s) {unknown}; available: {sorted(columns)}")
        columns = {d: columns[d] for d in datasets}
    registry = registry or default_registry()
    registry.discover(model_dirs)
    rows = []
    for name in tqdm(registry.names(pattern), desc="models", unit="model", leave=False, disable=None):
        info = registry.info(name)
        row = info.to_dict()
        row["params"], row["problems"], row["build_errors"] = {}, {}, {}
        for column, (preset, kwargs_of) in columns.items():
            dims, roi = preset.spatial_dims, preset.protocol.roi_size
            kwargs = kwargs_of(name)
            try:
                if dims not in info.dims:
                    raise ModelError(f"{dims}D not supported")
                problem = fit_problem(name, preset, kwargs, registry=registry)
                if problem is not None:
                    raise ModelError(problem)
                row["params"][column] = registry.count_parameters(
                    name, in_channels=preset.in_channels, out_channels=preset.out_channels, spatial_dims=dims,
                    roi_size=roi, dataset=preset.name, **kwargs) if params else None
            except ModelBuildError as err:
                row["params"][column] = None
                row["build_errors"][column] = row["problems"][column] = str(err)
            except ModelError as err:
                row["params"][column] = None
                row["problems"][column] = str(err)
        rows.append(row)
    return {
        "datasets": {c: {"preset": p.name, "spatial_dims": p.spatial_dims, "roi_size": p.protocol.roi_size,
                         "in_channels": p.in_channels, "out_channels": p.out_channels} for c, (p, _) in columns.items()},
        "models": rows,
        "errors": registry.errors,
    }


def _fmt_params(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def format_table(report: dict) -> str:
    """The `deconver models` table (Markdown), with footnotes for combinations a model cannot run."""
    columns = list(report["datasets"])
    header = ["model", "dims", "constraints", *[f"{c} ({'x'.join(map(str, report['datasets'][c]['roi_size']))})"
                                                for c in columns], "source"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    notes, foot = [], []
    for row in report["models"]:
        per_dims = {d: _describe_row(row, d) for d in row["dims"]}
        cons = next(iter(per_dims.values())) if len(set(per_dims.values())) == 1 else "; ".join(
            f"{d}D {text}" for d, text in per_dims.items())
        cells = [row["name"], "/".join(f"{d}D" for d in row["dims"]), cons]
        for c in columns:
            problem = row["problems"].get(c)
            if problem is None:
                cells.append(_fmt_params(row["params"][c]) if row["params"][c] is not None else "✓")
            elif problem.endswith("not supported"):
                cells.append("—")
            else:
                foot.append(f"[{len(foot) + 1}] {row['name']} × {c}: {problem}")
                cells.append(f"{'ERROR' if c in row['build_errors'] else '✗'} [{len(foot)}]")
        cells.append(f"{row['source']} · {row['file']}")
        lines.append("| " + " | ".join(cells) + " |")
        if row["notes"] or row["paper"]:
            notes.append(f"- {row['name']}: {row['notes']}" + (f" Paper: {row['paper']}." if row["paper"] else ""))
    out = "\n".join(lines)
    out += ("\n\nParameters at each dataset's roi and channels (— = dims not supported; ✗ = the model cannot "
            "take that dataset's roi; ERROR = the builder failed):\n")
    out += "\n".join(foot) if foot else "(every model fits every dataset of its dims)"
    if notes:
        out += "\n\nNotes:\n" + "\n".join(notes)
    return out


def _describe_row(row: dict, dims: int) -> str:
    div = row["divisor"][str(dims)]
    if isinstance(div, str):
        return "depends on the dataset"
    cons = Constraints(tuple(div), row["fixed_size"], row["min_bottleneck"], row["min_batch"])
    return cons.describe()


def run(args) -> int:
    """`deconver models`: print the table (or JSON); exit 1 if a model file is broken."""
    report = describe_models(args.pattern, config=args.config, datasets=args.dataset,
                             model_dirs=args.model_dir, params=not args.no_params)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    broken = list(report["errors"])
    for row in report["models"]:
        broken += list(dict.fromkeys(row["build_errors"].values()))
    if broken:
        print("\nmodel files with errors:\n  " + "\n  ".join(broken), file=sys.stderr)
        return 1
    return 0
