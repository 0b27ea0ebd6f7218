"""``frem reproduce``: every variant, several seeds, one protocol; table and figures.

Each run lives in ``OUT/runs/<variant>-seed<k>`` and is resumed or skipped if
it is already there, so a reproduction can be spread over several commands
(a GPU lease ends, a laptop sleeps) and nothing is trained twice. Nothing in
``OUT`` is hand-edited: the table and figures are what the runs produced.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from pathlib import Path

import optuna
import torch
from tqdm.auto import tqdm

from frem.seg import checkpoint, figures, paper
from frem.seg.config import TrainConfig
from frem.seg.data.images import normalize
from frem.seg.evaluate import model_from_checkpoint
from frem.seg.variants import VARIANT_DEFAULTS, VARIANTS
from frem.seg.train import train
from frem.seg.tune import open_storage, trials_table, tune

STUDY = "reproduce-frem"


class Progress:
    """One bar over every epoch the reproduction still has to train: which run of how many,
    its epoch, and the time left (a resumed run's earlier epochs do not count)."""

    def __init__(self, runs: int, epochs: int, enabled: bool):
        self.epochs = epochs
        self.bar = tqdm(total=runs * epochs, unit="epoch", disable=not enabled, file=sys.stderr,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} epochs "
                                   "[{elapsed}<{remaining}]")
        self.started: dict = {}

    def skip(self) -> None:
        """A finished run reused as it is: nothing to train."""
        self.bar.total -= self.epochs
        self.bar.refresh()

    def on_epoch(self, run: str):
        def advance(epoch: int) -> None:
            if run not in self.started:  # a resumed run's first epoch: the ones before are done already
                self.started[run] = epoch
                self.bar.total -= epoch
            self.bar.set_description_str(f"{run}: epoch {epoch + 1}/{self.epochs}", refresh=False)
            self.bar.update(1)
        return advance

    def close(self) -> None:
        self.bar.close()


def run_all(base: TrainConfig, seeds, out: Path, data, variants=VARIANTS, progress: bool = True) -> dict:
    results = {}
    runs = [(variant, seed) for variant in variants for seed in seeds]
    bar = Progress(len(runs), base.epochs, progress)
    try:
        for number, (variant, seed) in enumerate(runs, 1):
            name = f"{variant}-seed{seed}"
            run_dir = out / "runs" / name
            config = base.for_variant(variant, seed=seed, out=str(run_dir), progress=False,
                                      resume=(run_dir / checkpoint.LAST).exists())
            if (run_dir / checkpoint.METRICS).exists():
                metrics = json.loads((run_dir / checkpoint.METRICS).read_text())
                _check_same_protocol(config, metrics, run_dir)
                bar.skip()
            else:  # an unfinished run resumes (train checks its settings)
                metrics = train(config, data, on_epoch=bar.on_epoch(f"run {number}/{len(runs)} {name}"))
            results[(variant, seed)] = metrics
    finally:
        bar.close()
    return results


def _check_same_protocol(config: TrainConfig, metrics: dict, run_dir: Path) -> None:
    """A finished run is reused only if it is the run this reproduction would train."""
    finished = TrainConfig.from_dict(metrics["config"])
    mismatch = config.differences(finished)
    if finished.epochs != config.epochs:
        mismatch.insert(0, f"epochs={finished.epochs!r} (this run: {config.epochs!r})")
    if mismatch:
        raise ValueError(f"{run_dir} holds a finished run of another protocol ({', '.join(mismatch)}): "
                         "choose another --out, or the options it was made with")


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def summarize(results: dict, classes, seeds, variants) -> list[dict]:
    """Mean and std over seeds per class and mIoU; paired mIoU difference to baseline."""
    rows = []
    for variant in variants:
        runs = [results[(variant, s)] for s in seeds]
        row = {"variant": variant, "seeds": len(runs)}
        for name in classes:
            row[name] = _mean_std([r["test"]["iou"][name] for r in runs])
        row["miou"] = _mean_std([r["test"]["miou"] for r in runs])
        if "baseline" in variants:
            row["delta_miou"] = _mean_std([results[(variant, s)]["test"]["miou"]
                                           - results[("baseline", s)]["test"]["miou"] for s in seeds])
        rows.append(row)
    return rows


def table_markdown(rows, classes) -> str:
    head = ["variant", *classes, "mIoU", "Δ mIoU vs baseline (paired)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["variant"], *(_fmt(*row[c]) for c in classes), _fmt(*row["miou"]),
                 _fmt(*row.get("delta_miou", (math.nan, math.nan)))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(mean: float, std: float, signed: bool = False) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{100 * mean:+.2f}" if signed else f"{100 * mean:.2f}"
    return text if math.isnan(std) else f"{text} ± {100 * std:.2f}"


def paper_markdown(number: int, rows) -> list[str]:
    """The paper's table as printed, then its mIoU and gain over the baseline beside ours."""
    printed = paper.load_table(number)
    header = paper.HEADERS[number]
    lines = [f"## The paper's {paper.TITLES[number]} beside ours", "",
             f"IoU in percent, as printed in {paper.CITATION} The paper reports one run per "
             "model; ours are the mean ± std over the seeds above. These are the paper's "
             "numbers, not our measurements.", "",
             "| model (as printed) | " + " | ".join(header) + " | mIoU |",
             "|" + "---|" * (len(header) + 2)]
    lines += [f"| {r.model} | " + " | ".join(f"{v:.2f}" for v in r.iou) + f" | {r.miou:.2f} |"
              for r in printed]
    if number in paper.HEADER_NOTE:
        lines += ["", paper.HEADER_NOTE[number]]
    ours = {r["variant"]: r for r in rows}
    base = next((r.miou for r in printed if r.variant == "baseline"), math.nan)
    lines += ["", "| variant | paper mIoU | paper Δ vs baseline | our mIoU | our Δ vs baseline (paired) |",
              "|---|---|---|---|---|"]
    for r in printed:
        mine = ours.get(r.variant, {})
        lines.append(f"| {r.variant} | {r.miou:.2f} | {r.miou - base:+.2f} | "
                     f"{_percent(*mine.get('miou', (math.nan, math.nan)))} | "
                     f"{_percent(*mine.get('delta_miou', (math.nan, math.nan)), signed=True)} |")
    return lines + [""]


def table_csv(rows, classes) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    columns = [*classes, "miou", "delta_miou"]
    writer.writerow(["variant", "seeds"] + [f"{c}_{s}" for c in columns for s in ("mean", "std")])
    for row in rows:
        writer.writerow([row["variant"], row["seeds"]] + [
            f"{v:.6f}" for c in columns for v in row.get(c, (math.nan, math.nan))])
    return out.getvalue()


def verdict(rows) -> str:
    """Did FREM beat the baseline, by how much, and is that more than the seed spread?"""
    by = {r["variant"]: r for r in rows}
    if "frem" not in by or "baseline" not in by:
        return ""
    (delta, delta_std), (_, base_std) = by["frem"]["delta_miou"], by["baseline"]["miou"]
    seeds = by["frem"]["seeds"]
    spread = max(s for s in (delta_std, base_std) if not math.isnan(s)) if not (
        math.isnan(delta_std) and math.isnan(base_std)) else math.nan
    outcome = "beat" if delta > 0 else "did not beat"
    text = (f"On these runs FREM {outcome} the baseline: mIoU difference {delta:+.4f} "
            f"(paired over {seeds} seed{'s' if seeds > 1 else ''}).")
    if math.isnan(spread):
        return text + " With one seed there is no seed-to-seed spread to compare it with."
    larger = "larger" if abs(delta) > spread else "not larger"
    return (text + f" That difference is {larger} than the seed-to-seed spread (std of the paired "
            f"difference {delta_std:.4f}; std of the baseline's mIoU {base_std:.4f}).")


@torch.no_grad()
def qualitative_figure(out: Path, data, variants, seed: int, path: Path, tag: str = "", tiles: int = 3) -> Path | None:
    """Fig. 5/6 from each variant's best checkpoint; runs whose checkpoint is not here
    (reused from their metrics.json alone) are left out, and with none there is no figure."""
    index = torch.linspace(0, len(data.test) - 1, tiles).round().long()
    images, truth = data.test.images[index], data.test.masks[index]
    predictions = {}
    for variant in variants:
        best = out / "runs" / f"{variant}-seed{seed}" / checkpoint.BEST
        if not best.is_file():
            continue
        state = checkpoint.load(best)
        model = model_from_checkpoint(state)
        stats = data.test.stats[index]
        predictions[variant] = model(normalize(images, state["normalization"], stats)).argmax(1).numpy()
    if not predictions:
        return None
    return figures.qualitative(images[:, 0].numpy(), truth.numpy(), predictions, data.classes, path,
                               f"test tiles ({', '.join(data.test.names[i] for i in index)})\n{tag}")


def protocol_tag(base: TrainConfig) -> str:
    """What made a figure, in its title: a quick figure lifted out of its folder must say so."""
    kind = "--quick CPU protocol, not the paper's" if base.quick else "protocol"
    return f"{kind}: {base.encoder}, {base.crop} px tiles, {base.epochs} epochs"


def reproduce(base: TrainConfig, *, seeds, out, results_dir, tune_trials: int, paper_tables="auto",
              variants=VARIANTS, progress: bool = True) -> dict:
    out, results_dir = Path(out), Path(results_dir)
    data = base.load_data()
    data.announce()
    base = base.with_(data=data.root or base.data)
    results = run_all(base, seeds, out, data, variants, progress)
    rows = summarize(results, data.classes, seeds, variants)

    tuning = None
    if tune_trials:
        tuning = tune(base.for_variant("frem"), trials=tune_trials, study_name=STUDY, storage=None,
                      out=out / "tune", data=data, progress=progress)
    made, tag = [], protocol_tag(base)
    if tuning:
        study = optuna.load_study(study_name=STUDY, storage=open_storage(None, out / "tune"))
        made.append(figures.bx_scatter(
            trials_table(study), results_dir / "fig7_bx_search.png",
            f"TPE over B and X: {tuning['trials']} trials ({tuning['complete']} trained in full, "
            f"{tuning['pruned']} pruned early)\n{tag}"))
    first = seeds[0]
    histories = {v: results[(v, first)]["history"] for v in ("baseline", "frem") if v in variants}
    made.append(figures.feature_magnitudes(histories, results_dir / "fig2_feature_magnitudes.png",
                                           f"bottleneck vs skip feature (seed {first})\n{tag}"))
    if "frem" in variants:
        made.append(figures.enhanced_channels(results[("frem", first)]["history"],
                                              results_dir / "fig9_enhanced_channels.png",
                                              f"FREM: enhanced vs other bottleneck channels (seed {first})\n{tag}"))
    made.append(qualitative_figure(out, data, variants, first, results_dir / "fig5_qualitative.png", tag))
    made = [p for p in made if p is not None]

    protocol = protocol_lines(base, seeds, data, results)
    text = ["# Reproduction: FREM on the Drosophila ssTEM data", "", *protocol, "",
            "## Test IoU (mean ± std over seeds)", "", table_markdown(rows, data.classes), "",
            verdict(rows), ""]
    numbers = (paper.tables_for(base.dataset, data.classes) if paper_tables == "auto"
               else paper.TABLES_FOR[paper_tables])
    beside_paper = [line for number in numbers for line in paper_markdown(number, rows)]
    text += beside_paper
    if tuning:
        text += ["## TPE search (FREM, B and X)", "",
                 f"{tuning['trials']} trials ({tuning['complete']} complete, {tuning['pruned']} pruned); "
                 f"best validation mIoU {tuning.get('best_value', math.nan):.4f} at "
                 f"{tuning.get('best_params')}; {tuning['epochs_spent']} epochs trained of "
                 f"{tuning['epochs_if_every_trial_ran_in_full']} for full trials "
                 f"({100 * tuning['compute_fraction']:.0f}%).", ""]
    text += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in made]
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "README.md").write_text("\n".join(text) + "\n")
    (results_dir / "table.csv").write_text(table_csv(rows, data.classes))
    summary = {"rows": rows, "verdict": verdict(rows), "figures": [str(p) for p in made], "tuning": tuning,
               "beside_paper": "\n".join(beside_paper)}
    # save_json writes NaN (an absent class) as null; default=str keeps any non-JSON value readable.
    checkpoint.save_json(json.loads(json.dumps(summary, default=str)), results_dir / "summary.json")
    return summary


def protocol_lines(base: TrainConfig, seeds, data, results) -> list[str]:
    runs = list(results.values())
    wall = sum(r["wall_time_s"] for r in runs)
    device = sorted({r["device"] for r in runs})
    label = " (`--quick`: a CPU smoke protocol, not the paper's)" if base.quick else ""
    return [f"**Protocol{label}**", "",
            f"- data: {data.source}; tiles train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)} "
            f"of {data.train.images.shape[-1]} px; sections {base.sections or 'the standard 12/3/5 split'}",
            f"- model: smp.Unet, encoder {base.encoder} (random init); epochs {base.epochs}, batch "
            f"{base.batch_size}, Adam lr {base.lr:g}, validation every {base.val_every} epoch(s), "
            "best validation mIoU checkpoint scored on test",
            "- variant settings: " + "; ".join(
                f"{v} " + ", ".join(f"{k.rstrip('_')}={x:g}" for k, x in VARIANT_DEFAULTS[v].items())
                for v in VARIANT_DEFAULTS if VARIANT_DEFAULTS[v]) + " (dropout rate B/C)",
            f"- seeds {list(seeds)}; device {', '.join(device)}; wall time of all runs {wall / 60:.1f} min",
            f"- IoU pooled over the test split per class (smp.metrics); mIoU over the {len(data.classes)} classes"]
