"""frem reproduce --quick: every variant, a table the runs produced, the figures."""

import pytest
import csv
import json

from frem.seg.cli import main

pytestmark = pytest.mark.slow  # minutes in all: left out of `-m "not slow"`


def test_quick_reproduction_writes_table_and_figures_from_the_runs(drosophila_root, tmp_path, capsys):
    out, results = tmp_path / "rep", tmp_path / "results"
    args = ["reproduce", "--quick", "--data", str(drosophila_root), "--out", str(out), "--results",
            str(results), "--epochs", "1", "--tiles-per-section", "2", "--batch-size", "2",
            "--tune-trials", "2", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "## The paper's Table 2 (Drosophila) beside ours" in printed  # on the terminal too
    assert "| Proposed method (FREM) | 92.93 | 78.71 | 78.02 | 58.14 | 76.95 |" in printed
    for name in ("README.md", "table.csv", "fig2_feature_magnitudes.png", "fig5_qualitative.png",
                 "fig7_bx_search.png", "fig9_enhanced_channels.png"):
        assert (results / name).is_file(), name
    text = (results / "README.md").read_text()
    assert "--quick" in text and "| frem-fixed |" in text and "FREM" in text
    rows = {row["variant"]: row for row in csv.DictReader(open(results / "table.csv"))}
    assert set(rows) == {"baseline", "shallow", "supervision", "dropout", "frem", "frem-fixed"}
    for variant, row in rows.items():  # the table is exactly what the runs measured
        metrics = json.loads((out / "runs" / f"{variant}-seed0" / "metrics.json").read_text())
        assert abs(float(row["miou_mean"]) - metrics["test"]["miou"]) < 1e-6
        assert abs(float(row["membrane_mean"]) - metrics["test"]["iou"]["membrane"]) < 1e-6
    frem_delta = float(rows["frem"]["delta_miou_mean"])
    baseline = json.loads((out / "runs" / "baseline-seed0" / "metrics.json").read_text())["test"]["miou"]
    assert abs(frem_delta - (float(rows["frem"]["miou_mean"]) - baseline)) < 1e-6

    # The paper's Table 2 as printed, cited, beside ours without any flag.
    assert "## The paper's Table 2 (Drosophila) beside ours" in text
    assert "| model (as printed) | menbrane | nuclear | background | Synapus | mIoU |" in text
    assert "| Proposed method (FREM) | 92.93 | 78.71 | 78.02 | 58.14 | 76.95 |" in text
    assert "its second column must be mitochondria" in text and "DOI 10.5220/0010326205200527" in text
    ours = json.loads((out / "runs" / "frem-seed0" / "metrics.json").read_text())["test"]["miou"]
    assert f"| frem | 76.95 | +2.97 | {100 * ours:.2f} | {100 * (ours - baseline):+.2f} |" in text
    assert "Table 1 (mouse liver)" not in text  # the mouse-liver tables belong to a mouse-liver copy
    assert "/" + str(drosophila_root).strip("/") not in text  # data named, not a machine's path

    stamp = (out / "runs" / "frem-seed0" / "metrics.json").stat().st_mtime
    assert main(args) == 0  # a second call reuses every finished run
    assert (out / "runs" / "frem-seed0" / "metrics.json").stat().st_mtime == stamp

    # Another protocol on the same --out must not reuse these runs as its own.
    for change in (["--lr", "0.01"], ["--epochs", "2"]):
        capsys.readouterr()
        assert main(args + change) == 2  # the last --epochs wins
        err = capsys.readouterr().err
        assert "baseline-seed0 holds a finished run of another protocol" in err, err
        assert change[0].lstrip("-") + "=" in err and err.count("\n") == 1
    assert (out / "runs" / "frem-seed0" / "metrics.json").stat().st_mtime == stamp


def test_a_mouse_liver_copy_gets_tables_1_and_3_and_others_none():
    from frem.seg import paper
    from frem.seg.reproduce import paper_markdown
    assert paper.tables_for("folder", ("membrane", "nucleus", "background")) == (1, 3)
    assert paper.tables_for("folder", ("cell", "nucleus", "background")) == ()
    rows = [{"variant": "baseline", "miou": (0.6, 0.01), "delta_miou": (0.0, 0.0)},
            {"variant": "frem-fixed", "miou": (0.61, 0.02), "delta_miou": (0.01, 0.005)}]
    text = "\n".join(paper_markdown(3, rows))
    assert "| model (as printed) | menbrane | nuclear | background | mIoU |" in text
    assert "| frem-fixed | 60.49 | +0.99 | 61.00 ± 2.00 | +1.00 ± 0.50 |" in text
