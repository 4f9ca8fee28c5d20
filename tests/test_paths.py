"""StudyPaths: every path of the layout parses back to what built it; a path outside it is an error."""
from __future__ import annotations

import pytest

from deconver.config import load_study
from deconver.paths import PathKey, RunFolder, StudyPaths


def test_every_path_parses_back_to_its_keys(tmp_path):
    study = load_study({"study": "s", "results_dir": str(tmp_path / "res"), "reports_dir": str(tmp_path / "rep"),
                        "models": ["unet"], "datasets": {"glas": {"preset": "glas", "root": "/nowhere"}}})
    p = StudyPaths.of(study)
    assert p.results == tmp_path / "res" / "s" and p.report_html() == tmp_path / "rep" / "s" / "report.html"
    cases = {
        p.study_file: PathKey("study"),
        p.inventory("glas"): PathKey("inventory", "glas"),
        p.manifest("glas"): PathKey("prepared", "glas"),
        p.preset("glas"): PathKey("preset", "glas"),
        p.protocol("glas", "unet", 2): PathKey("run", "glas", "unet", 2),
        p.split("glas"): PathKey("split", "glas"),
        p.final_checkpoint("glas", "unet", 3): PathKey("run", "glas", "unet", 3),
        p.run_folder("glas", "unet", 0).best: PathKey("run", "glas", "unet", 0),
        p.predictions("glas", "smp_unet", 12) / "c1.png": PathKey("run", "glas", "smp_unet", 12),
        p.complexity("glas", "unet"): PathKey("complexity", "glas", "unet"),
        p.aggregate() / "summary.csv": PathKey("aggregate"),
        p.logs / "train" / "glas.log": PathKey("logs"),
    }
    for path, key in cases.items():
        assert p.parse(path) == key, path
    assert StudyPaths.at(p.results).parse(str(p.evaluation("glas", "unet", 1))) == PathKey("run", "glas", "unet", 1)
    with pytest.raises(ValueError, match="not under the results folder"):
        p.parse(tmp_path / "elsewhere.csv")
    with pytest.raises(ValueError, match="not a path of the results layout"):
        p.parse(p.runs() / "glas" / "unet" / "foldX" / "evaluation.csv")
    with pytest.raises(ValueError, match="no reports folder"):
        StudyPaths.at(p.results).report_html()


def test_evaluations_finds_every_run(tmp_path):
    p = StudyPaths.at(tmp_path / "s")
    for d, m, k in (("b", "unet", 1), ("a", "deconver", 0), ("a", "unet", 0)):
        RunFolder(p.run(d, m, k)).dir.mkdir(parents=True)
        p.evaluation(d, m, k).write_text("x\n")
    assert [key for key, _ in p.evaluations()] == [PathKey("run", "a", "deconver", 0), PathKey("run", "a", "unet", 0),
                                                   PathKey("run", "b", "unet", 1)]
    bad = p.runs() / "a" / "unet" / "foldX"
    bad.mkdir()
    (bad / "evaluation.csv").write_text("x\n")
    with pytest.raises(ValueError, match="foldX"):
        p.evaluations()
