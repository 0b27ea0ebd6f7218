"""frem reproduce --quick: every variant, a table the runs produced, the figures."""

import csv
import json

from frem.cli import main


def test_quick_reproduction_writes_table_and_figures_from_the_runs(drosophila_root, tmp_path, capsys):
    out, results = tmp_path / "rep", tmp_path / "results"
    args = ["reproduce", "--quick", "--data", str(drosophila_root), "--out", str(out), "--results",
            str(results), "--epochs", "1", "--tiles-per-section", "2", "--batch-size", "2",
            "--tune-trials", "2", "--no-progress"]
    assert main(args) == 0
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

    stamp = (out / "runs" / "frem-seed0" / "metrics.json").stat().st_mtime
    assert main(args) == 0  # a second call reuses every finished run
    assert (out / "runs" / "frem-seed0" / "metrics.json").stat().st_mtime == stamp
