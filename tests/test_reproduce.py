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


def _runs(mious: dict) -> dict:
    """Finished runs' metrics as run_all returns them: (variant, seed) -> metrics, one class IoU = mIoU."""
    return {(variant, seed): {"test": {"miou": value, "iou": {"cell": value}}}
            for variant, values in mious.items() for seed, value in enumerate(values)}


def test_the_multi_seed_summary_pairs_each_seed_with_its_own_baseline():
    from frem.seg.reproduce import summarize
    import statistics
    baseline, frem = [0.50, 0.60, 0.70], [0.52, 0.63, 0.69]
    rows = {r["variant"]: r for r in summarize(_runs({"baseline": baseline, "frem": frem}), ("cell",), [0, 1, 2],
                                               ("baseline", "frem"))}
    paired = [f - b for f, b in zip(frem, baseline)]  # +0.02, +0.03, -0.01: seed by seed
    assert rows["frem"]["delta_miou"] == pytest.approx((statistics.fmean(paired), statistics.stdev(paired)))
    assert rows["frem"]["delta_miou"][1] == pytest.approx(0.020817, abs=1e-6)  # unpaired it would be ~0.1
    assert rows["frem"]["miou"] == pytest.approx((statistics.fmean(frem), statistics.stdev(frem)))
    assert rows["baseline"]["delta_miou"] == (0.0, 0.0) and rows["frem"]["seeds"] == 3
    assert rows["frem"]["cell"] == rows["frem"]["miou"]


@pytest.mark.parametrize("baseline, frem, outcome, larger", [
    ([0.50, 0.60, 0.70], [0.52, 0.63, 0.69], "beat", "not larger"),    # +0.013 against the baseline's 0.1 spread
    ([0.50, 0.51, 0.52], [0.55, 0.565, 0.575], "beat", "larger"),     # +0.053 against at most 0.01
    ([0.50, 0.51, 0.52], [0.45, 0.455, 0.47], "did not beat", "larger"),
    ([0.50, 0.60, 0.70], [0.49, 0.58, 0.71], "did not beat", "not larger"),
])
def test_the_verdict_says_whether_frem_beat_the_baseline_by_more_than_the_seed_spread(baseline, frem, outcome, larger):
    from frem.seg.reproduce import summarize, verdict
    rows = summarize(_runs({"baseline": baseline, "frem": frem}), ("cell",), [0, 1, 2], ("baseline", "frem"))
    delta = sum(f - b for f, b in zip(frem, baseline)) / 3
    text = verdict(rows)
    assert text.startswith(f"On these runs FREM {outcome} the baseline: mIoU difference {delta:+.4f} "
                           "(paired over 3 seeds).")
    assert f"That difference is {larger} than the seed-to-seed spread" in text
    one = verdict(summarize(_runs({"baseline": baseline[:1], "frem": frem[:1]}), ("cell",), [0], ("baseline", "frem")))
    assert one.endswith("(paired over 1 seed). With one seed there is no seed-to-seed spread to compare it with.")
