"""The ``frem`` command line: train, tune, reproduce, evaluate, predict, data download.

Imports nothing beyond the standard library and frem's own fact modules at
the top, so that without the ``seg`` extra the command can still say, in one
line, what to install.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from importlib import metadata

from frem.seg.search_space import SEARCH_SPACE, TUNABLE
from frem.seg.variants import VARIANTS

EXTRA = "seg"


def missing_requirements(extra: str = EXTRA) -> list[str]:
    """Distributions of frem's ``extra`` that are not installed (pyproject is the one list)."""
    try:
        requirements = metadata.requires("frem") or []
    except metadata.PackageNotFoundError:  # run from a source tree: nothing to check against
        return []
    missing = []
    for requirement in requirements:
        name, _, marker = requirement.partition(";")
        if re.search(rf"""extra\s*==\s*["']{extra}["']""", marker):
            name = re.match(r"[A-Za-z0-9._-]+", name.strip()).group(0)
            try:
                metadata.version(name)
            except metadata.PackageNotFoundError:
                missing.append(name)
    return missing


class Parser(argparse.ArgumentParser):
    """Argument errors end with one line and status 2, never a traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(text: str) -> int | float:
    """B: an int count ("8") or a fraction of the channels ("0.25")."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Options shared by train, tune and reproduce (None: the protocol's default)."""
    from frem.seg.config import QUICK, TrainConfig as D

    def default(name):
        return f"default {getattr(D, name)}" + (f"; --quick: {QUICK[name]}" if name in QUICK else "")

    p.add_argument("--dataset", choices=("drosophila", "folder"), default=None,
                   help="the Drosophila stack (default) or your own folder (see README)")
    p.add_argument("--data", help="data folder (default: $FREM_DATA, else the download cache, "
                   "filled on first use)")
    p.add_argument("--encoder", help=f"smp/timm encoder name ({default('encoder')})")
    p.add_argument("--epochs", type=int, help=f"{default('epochs')} (the paper's)")
    p.add_argument("--batch-size", type=int, help=f"global batch size ({default('batch_size')})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate ({default('lr')})")
    p.add_argument("--seed", type=int, help=default("seed"))
    p.add_argument("--crop", type=int, help=f"tile size, a multiple of 32 ({default('crop')})")
    p.add_argument("--tiles-per-section", type=int, help="keep this many tiles per image, spread evenly")
    p.add_argument("--val-every", type=int, help="validate every k epochs (default 1)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--quick", action="store_true",
                   help="a tiny protocol that runs on a CPU in about a minute; explicit options win")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def train_kwargs(args) -> dict:
    names = ("variant", "dataset", "data", "out", "encoder", "B", "X", "lambda_", "epochs",
             "batch_size", "lr", "seed", "crop", "tiles_per_section", "val_every", "device",
             "resume", "progress")
    return {name: getattr(args, name, None) for name in names}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="frem", description="FREM (Ando & Hotta, VISAPP 2021) for cell segmentation")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="train one model variant and score it on the test split")
    train.add_argument("--variant", choices=VARIANTS, default="frem")
    train.add_argument("--B", type=_number, help="channels to enhance/drop: a count or a fraction "
                       "(frem: 8, frem-fixed: 10, dropout: 8)")
    train.add_argument("--X", type=float, help="enhancement factor (frem: 250, frem-fixed: 10000)")
    train.add_argument("--lambda", dest="lambda_", type=float, help="supervision loss weight (default 0.5)")
    train.add_argument("--out", default=None, help="run folder (default runs/<variant>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_train_options(train)

    tune = commands.add_parser(
        "tune", help="TPE search (Optuna) over B and X, or lambda",
        description="Optuna TPE search maximising validation mIoU; hopeless trials are pruned.",
        epilog="search space: " + SEARCH_SPACE + ". Storage: a SQLite file OUT/study.db by default "
               "(a killed search resumes); journal:PATH for several processes on one machine; "
               "postgresql://... for several machines.")
    tune.add_argument("--variant", choices=TUNABLE, default="frem")
    tune.add_argument("--trials", type=int, default=50, help="finished trials the study should hold (default 50)")
    tune.add_argument("--study", default="frem", help="study name (default frem)")
    tune.add_argument("--storage", help="Optuna storage URL or journal:PATH (default sqlite:///OUT/study.db)")
    tune.add_argument("--pruner", choices=("hyperband", "median", "none"), default="hyperband")
    tune.add_argument("--out", default="runs/tune", help="folder for the study and the trial runs")
    add_train_options(tune)

    reproduce = commands.add_parser(
        "reproduce", help="every variant x seeds under one protocol: table and figures in OUT/results")
    reproduce.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3; --quick: 1)")
    reproduce.add_argument("--tune-trials", type=int, default=None,
                           help="TPE trials for the B-X figure (default 20; --quick: 6; 0 skips)")
    reproduce.add_argument("--paper", choices=("auto", "drosophila", "mouse-liver", "none"), default="auto",
                           help="the paper's tables to print beside ours (auto: Table 2 for the "
                           "Drosophila data, Tables 1 and 3 for a folder with the mouse-liver classes)")
    reproduce.add_argument("--out", default="reproduction", help="folder for the runs and the study")
    reproduce.add_argument("--results", help="folder for the table and figures "
                           "(default results/full, or results/quick with --quick)")
    add_train_options(reproduce)

    evaluate = commands.add_parser("evaluate", help="recompute a run's test metrics from best.pt")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--data", help="data folder, if it moved since training")
    evaluate.add_argument("--device", default="cpu")

    predict = commands.add_parser("predict", help="segment images: label PNGs and colour overlays")
    predict.add_argument("--checkpoint", required=True, help="a run's best.pt")
    predict.add_argument("images", nargs="+")
    predict.add_argument("--out", required=True)
    predict.add_argument("--device", default="cpu")

    data = commands.add_parser("data", help="data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    download = data_commands.add_parser("download", help="download a data set, verified")
    download.add_argument("name", choices=("drosophila",))
    download.add_argument("--dest", help="target folder (default ~/.cache/frem/drosophila-vnc)")
    download.add_argument("--url", help="base URL of a mirror ($FREM_DROSOPHILA_URL)")
    return parser


def run_train(args) -> int:
    from frem.seg.config import TrainConfig
    from frem.seg.train import train
    kwargs = train_kwargs(args)
    kwargs["out"] = kwargs["out"] or f"runs/{args.variant}"
    config = TrainConfig.build(quick=args.quick, **kwargs)
    metrics = train(config)
    print(json.dumps({"run": config.out, "test": metrics["test"], "best_epoch": metrics["best_epoch"],
                      "best_val_miou": metrics["best_val_miou"], "device": metrics["device"],
                      "wall_time_s": round(metrics["wall_time_s"], 1)}, indent=2))
    return 0


def run_tune(args) -> int:
    from frem.seg.config import TrainConfig
    from frem.seg.tune import tune
    kwargs = {k: v for k, v in train_kwargs(args).items() if k not in ("out", "resume")}
    if args.trials < 1:
        raise ValueError(f"--trials must be at least 1, got {args.trials}")
    base = TrainConfig.build(quick=args.quick, **kwargs)
    summary = tune(base, trials=args.trials, study_name=args.study, storage=args.storage, out=args.out,
                   pruner=args.pruner)
    print(json.dumps({k: v for k, v in summary.items() if k != "train_command"}, indent=2))
    if "train_command" in summary:
        print("\nTrain the best setting in full with:\n  " + summary["train_command"])
    return 0


def run_reproduce(args) -> int:
    from frem.seg.config import TrainConfig
    from frem.seg.reproduce import reproduce
    kwargs = {k: v for k, v in train_kwargs(args).items() if k not in ("out", "resume", "variant")}
    base = TrainConfig.build(quick=args.quick, **kwargs)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    trials = args.tune_trials if args.tune_trials is not None else (6 if args.quick else 20)
    results = args.results or ("results/quick" if args.quick else "results/full")
    summary = reproduce(base, seeds=list(range(seeds)), out=args.out, results_dir=results,
                        tune_trials=trials, paper_tables=args.paper)
    print(f"{results}/README.md\n{summary['verdict']}")
    if summary["beside_paper"]:
        print("\n" + summary["beside_paper"])
    return 0


def run_evaluate(args) -> int:
    from frem.seg.evaluate import evaluate_run
    data = None
    if args.data:
        from frem.seg import checkpoint
        from frem.seg.data import load_dataset
        config = checkpoint.load(f"{args.run_dir}/{checkpoint.BEST}",
                                 hint=f"train the run again (frem train --out {args.run_dir})")["config"]
        data = load_dataset(config["dataset"], args.data, crop=config["crop"],
                            tiles_per_section=config["tiles_per_section"], sections=config["sections"])
    print(json.dumps(evaluate_run(args.run_dir, data=data, device=args.device), indent=2))
    return 0


def run_predict(args) -> int:
    from frem.seg.predict import predict
    for path in predict(args.checkpoint, args.images, args.out, device=args.device):
        print(path)
    return 0


def run_download(args) -> int:
    from frem.seg.data.drosophila import download
    print(f"downloaded and verified: {download(args.dest, args.url)}")
    return 0


COMMANDS = {"train": run_train, "tune": run_tune, "reproduce": run_reproduce, "evaluate": run_evaluate,
            "predict": run_predict}


def main(argv=None) -> int:
    missing = missing_requirements()
    if missing:
        print(f"frem: the command line needs the '{EXTRA}' extra (missing: {', '.join(missing)}): "
              f"pip install \"frem[{EXTRA}]\"", file=sys.stderr)
        return 2
    # timm's import on torch >= 2.14 warns about its own use of torch.jit.interface:
    # nothing a user can act on, and it would bury our one-line messages.
    warnings.filterwarnings("ignore", message=".*torch.jit.interface.* is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    handler = run_download if args.command == "data" else COMMANDS[args.command]
    try:
        return handler(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"frem {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"frem {args.command}: interrupted; `--resume` continues a training run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
