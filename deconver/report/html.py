"""The report as one self-contained HTML page: templates/report.html.j2 filled in (figures embedded)."""
from __future__ import annotations

import base64
import struct
from pathlib import Path

import jinja2

from deconver.report import learning
from deconver.report.captions import ds_title
from deconver.report.inputs import Aggregate
from deconver.report.tables import Table

TEMPLATES = Path(__file__).parent / "templates"


def _figure(fig) -> dict:
    """What the template shows of a written figure: the PNG as base64, a wide figure spanning the row."""
    raw = Path(fig.png).read_bytes()
    width, height = struct.unpack(">II", raw[16:24])  # PNG IHDR
    return dict(cls="plot wide" if width > 1.8 * height else "plot", stem=fig.stem, title=fig.title,
                caption=fig.caption, data=base64.b64encode(raw).decode("ascii"), svg=Path(fig.svg).name)


def _ranking(sec) -> dict:
    """One dataset's "Is the ranking real?" subsection (deconver.report.ranking_section.Section)."""
    return dict(summary=sec.summary, figures=[_figure(f) for f in sec.figures], tables=[t.to_html() for _, t in sec.tables])


def render_html(agg: Aggregate, ds_tables: dict[str, Table], repro: Table | None, ranks: Table | None,
                stats_tables: dict[str, list[tuple[str, Table]]], figs: dict[str, list], files: list[str],
                ranking: dict | None = None, conventions: Table | None = None,
                protocols: list[tuple[str, str]] = (), obj_tables: dict[str, Table] | None = None,
                warnings: dict[str, str] | None = None, cost: list = ()) -> str:
    """The whole report as one HTML page (PNG figures embedded as base64, so the file stands alone)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, keep_trailing_newline=True)
    meta = agg.meta
    prov = meta.get("provenance", {})
    datasets = [dict(name=d, title=ds_title(d, m), synthetic=bool(m.get("synthetic")), table=ds_tables[d].to_html(),
                     figures=[_figure(f) for f in figs.get(d, [])],
                     statistics=[t.to_html() for _, t in stats_tables.get(d, [])],
                     ranking=_ranking(ranking[d]) if ranking and d in ranking else None,
                     warning=(warnings or {}).get(d),
                     objects=obj_tables[d].to_html() if d in (obj_tables or {}) else None)
                for d, m in meta["datasets"].items()]
    return env.get_template("report.html.j2").render(
        study=meta.get("study", "study"), reference=agg.reference, datasets=datasets,
        version=str(prov.get("deconver_version", "?")), commit=str(prov.get("git_commit") or "unknown")[:12],
        torch=str(prov.get("torch_version", "?")),
        synthetic=[d for d, m in meta["datasets"].items() if m.get("synthetic")],
        learning_css=learning.CSS, failures=learning.failures(meta), did_not_learn=learning.DID_NOT_LEARN.capitalize(),
        check=learning.section_html(meta),
        warnings=list(warnings or {}), conventions=conventions.to_html() if conventions is not None else None, protocols=list(protocols),
        repro=repro.to_html() if repro is not None else None, ranks=ranks.to_html() if ranks is not None else None,
        cost=[t.to_html() for _, t in cost], files=files)
