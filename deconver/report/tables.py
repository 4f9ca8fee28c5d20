"""Study tables in three formats from one in-memory description: Markdown, LaTeX (booktabs) and CSV.

A `Table` holds numbers, not strings: the CSV keeps them at full precision (a column per value and
per standard deviation), Markdown, LaTeX and HTML show them rounded, as "mean ± std" where a column
has a spread, with the best value of each column in bold (ties at the shown precision all marked).
"""
from __future__ import annotations

import html
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from deconver.io import write_text_atomic

PM = "±"


@dataclass(frozen=True)
class Column:
    """One shown column: `key` names it in the CSV (`key` and `key_std`), `header` in Markdown/HTML,
    `latex` in LaTeX; `better` is "max", "min" or None (no best marked); `decimals` the shown precision."""

    key: str
    header: str
    latex: str | None = None
    better: str | None = None
    decimals: int = 2
    std: bool = False
    text: bool = False  # a text column (shown as is, never marked)


@dataclass
class Table:
    """A table: a first column of row labels (`label` header) and numeric or text columns.

    `rows`: list of (row label, {column key: value}); a value is a number, a (mean, std) pair for a
    column with `std`, a string for a text column, or None/NaN (shown as "–").
    """

    name: str
    caption: str
    label: str
    columns: list[Column]
    rows: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    label_header: str = "Model"
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ values
    def _mean(self, row: dict, col: Column) -> float:
        v = row.get(col.key)
        if col.std and isinstance(v, (tuple, list)):
            v = v[0]
        try:
            return float(v) if v is not None else math.nan
        except (TypeError, ValueError):
            return math.nan

    def _std(self, row: dict, col: Column) -> float:
        v = row.get(col.key)
        if col.std and isinstance(v, (tuple, list)) and len(v) > 1 and v[1] is not None:
            return float(v[1])
        return math.nan

    def best(self, col: Column) -> set[int]:
        """Indices of the rows holding the best value of `col` at the shown precision."""
        if col.better not in ("max", "min") or col.text:
            return set()
        shown = [round(self._mean(r, col), col.decimals) for _, r in self.rows]
        finite = [v for v in shown if math.isfinite(v)]
        if len(finite) < 2:
            return set()
        target = max(finite) if col.better == "max" else min(finite)
        return {i for i, v in enumerate(shown) if math.isfinite(v) and v == target}

    def cell(self, i: int, col: Column) -> str:
        """The shown text of row i, column col (without the best mark)."""
        row = self.rows[i][1]
        if col.text:
            v = row.get(col.key)
            return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
        m = self._mean(row, col)
        if not math.isfinite(m):
            return "–" if math.isnan(m) else ("∞" if m > 0 else "-∞")
        s = f"{m:.{col.decimals}f}"
        sd = self._std(row, col)
        if col.std and math.isfinite(sd):
            s += f" {PM} {sd:.{col.decimals}f}"
        return s

    # ------------------------------------------------------------------ formats
    def to_frame(self) -> pd.DataFrame:
        """The CSV content: full-precision numbers, one column per value and per std."""
        records = []
        for label, row in self.rows:
            rec: dict[str, Any] = {self.label_header.lower(): label}
            for col in self.columns:
                if col.text:
                    rec[col.key] = row.get(col.key)
                    continue
                rec[col.key] = self._mean(row, col)
                if col.std:
                    rec[f"{col.key}_std"] = self._std(row, col)
            records.append(rec)
        return pd.DataFrame.from_records(records)

    def to_csv(self) -> str:
        return self.to_frame().to_csv(index=False, float_format="%.10g", lineterminator="\n")

    def to_markdown(self) -> str:
        best = {c.key: self.best(c) for c in self.columns}
        head = [self.label_header] + [c.header for c in self.columns]
        lines = [f"**{self.name}.** {self.caption}", ""]
        lines.append("| " + " | ".join(_md_escape(h) for h in head) + " |")
        lines.append("|" + "|".join([":---"] + ["---:" if not c.text else ":---" for c in self.columns]) + "|")
        for i, (label, _) in enumerate(self.rows):
            cells = [_md_escape(label)]
            for c in self.columns:
                t = _md_escape(self.cell(i, c))
                cells.append(f"**{t}**" if i in best[c.key] else t)
            lines.append("| " + " | ".join(cells) + " |")
        for note in self.notes:
            lines += ["", note]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        best = {c.key: self.best(c) for c in self.columns}
        spec = "l" + "".join("l" if c.text else "r" for c in self.columns)
        head = [latex_escape(self.label_header)] + [c.latex or latex_escape(c.header) for c in self.columns]
        out = [
            "\\begin{table}[htbp]",
            "\\centering",
            "\\small",
            "\\setlength{\\tabcolsep}{4pt}",
            f"\\caption{{{latex_escape(self.caption)}}}",
            f"\\label{{{self.label}}}",
            f"\\begin{{tabular}}{{{spec}}}",
            "\\toprule",
            " & ".join(head) + " \\\\",
            "\\midrule",
        ]
        for i, (label, _) in enumerate(self.rows):
            cells = [latex_escape(label)]
            for c in self.columns:
                t = self.cell(i, c)
                t = latex_escape(t)
                cells.append(f"\\textbf{{{t}}}" if i in best[c.key] else t)
            out.append(" & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}"]
        for note in self.notes:
            out.append(f"\\par\\smallskip\\footnotesize {latex_escape(note)}")
        out.append("\\end{table}")
        return "\n".join(out) + "\n"

    def to_html(self) -> str:
        best = {c.key: self.best(c) for c in self.columns}
        h = ["<figure class='table'>", f"<figcaption><b>{html.escape(self.name)}.</b> {html.escape(self.caption)}</figcaption>",
             "<table>", "<thead><tr>" + f"<th>{html.escape(self.label_header)}</th>"
             + "".join(f"<th>{html.escape(c.header)}</th>" for c in self.columns) + "</tr></thead>", "<tbody>"]
        for i, (label, _) in enumerate(self.rows):
            cells = [f"<th scope='row'>{html.escape(label)}</th>"]
            for c in self.columns:
                t = html.escape(self.cell(i, c))
                cells.append(f"<td class='best'><b>{t}</b></td>" if i in best[c.key] else f"<td>{t}</td>")
            h.append("<tr>" + "".join(cells) + "</tr>")
        h += ["</tbody>", "</table>"]
        for note in self.notes:
            h.append(f"<p class='note'>{html.escape(note)}</p>")
        h.append("</figure>")
        return "\n".join(h)

    def write(self, directory: Path, stem: str) -> dict[str, Path]:
        """Write `<stem>.md`, `<stem>.tex`, `<stem>.csv` atomically; returns the paths by format."""
        directory = Path(directory)
        paths = {"md": directory / f"{stem}.md", "tex": directory / f"{stem}.tex", "csv": directory / f"{stem}.csv"}
        write_text_atomic(paths["md"], self.to_markdown())
        write_text_atomic(paths["tex"], self.to_latex())
        write_text_atomic(paths["csv"], self.to_csv())
        return paths


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  # the few non-ASCII signs captions use, as math so pdflatex needs no extra package
                  PM: r"$\pm$", "→": r"$\rightarrow$", "∝": r"$\propto$", "≥": r"$\geq$", "≤": r"$\leq$",
                  "Δ": r"$\Delta$", "∞": r"$\infty$", "−": "-", "–": "--", "…": r"\ldots{}", "×": r"$\times$",
                  "§": r"\S{}", "µ": r"$\mu$", "²": r"$^2$", "³": r"$^3$"}
_LATEX_RE = re.compile("|".join(re.escape(k) for k in _LATEX_SPECIAL))


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text (model names like swin_unetr, '%'); the output
    is ASCII (other accents are decomposed, unknown signs dropped) so plain pdflatex compiles it."""
    out = _LATEX_RE.sub(lambda m: _LATEX_SPECIAL[m.group()], str(text))
    if not out.isascii():
        out = unicodedata.normalize("NFKD", out).encode("ascii", "ignore").decode("ascii")
    return out


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def parse_markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of the first pipe table in `text` (bold marks removed) — for checks."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        raise ValueError("no Markdown table found")

    def split(ln: str) -> list[str]:
        cells = re.split(r"(?<!\\)\|", ln.strip()[1:-1])
        return [c.strip().replace("\\|", "|").removeprefix("**").removesuffix("**") for c in cells]

    return split(lines[0]), [split(ln) for ln in lines[2:]]
