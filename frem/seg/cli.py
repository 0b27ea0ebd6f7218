"""The ``frem`` command line: train, tune, reproduce, evaluate, predict, data download.

Imports nothing beyond the standard library and frem's own fact modules at
the top (no torch: ``import frem`` is lazy), so that without the ``seg``
extra the command can still say, in one line, what to install, and
``--help``, ``--version`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import warnings
from importlib import metadata

from frem import __version__
from frem.extras import install_command
from frem.seg.search_space import SEARCH_SPACE, TUNABLE
from frem.seg.variants import VARIANTS

EXTRA = "seg"
# frem reproduce: seeds per variant and TPE trials for the B-X figure, and under --quick
REPRODUCE = {"seeds": 3, "tune_trials": 20}
REPRODUCE_QUICK = {"seeds": 1, "tune_trials": 6}


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
    """Argument errors end with one line and status 2, never a traceback, and suggest a close option."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        # A typo after the command ("frem train --quik") is the command's to report, with its name.
        known, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._command_parser(known)
            close = [match for word in extras if word.startswith("-")
                     for match in difflib.get_close_matches(word.split("=")[0], command._option_strings(), n=1)]
            command.error(f"unrecognized arguments: {' '.join(extras)}"
                          + (f" (did you mean {', '.join(dict.fromkeys(close))}?)" if close else ""))
        return known

    def _command_parser(self, known) -> "Parser":
        parser = self
        for action in self._subparsers._group_actions if self._subparsers else ():
            chosen = getattr(known, action.dest, None)
            if chosen in action.choices:
                parser = action.choices[chosen]._command_parser(known)
        return parser

    def _option_strings(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings]


def _number(text: str) -> int | float:
    """B: an int count ("8") or a fraction of the channels ("0.25")."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def add_train_options(p: argparse.ArgumentParser) -> None:
    """The training protocol's options, shared by train, tune and reproduce (None: TrainConfig's default)."""
    from frem.seg.config import KEEP, QUICK, TrainConfig as D
    from frem.seg.data import DATASETS
    from frem.seg.data.images import NORMALIZATIONS

    def default(name):
        return f"default {getattr(D, name)}" + (f"; --quick: {QUICK[name]}" if name in QUICK else "")

    protocol = p.add_argument_group("training protocol")
    protocol.add_argument("--dataset", choices=DATASETS,
                          help="drosophila: the Drosophila stack; folder: your own images (the layout: "
                               "docs/segmentation.md) "
                               "(default drosophila, or folder where --data holds classes.txt and train/)")
    protocol.add_argument("--data",
                          help="data folder (default: $FREM_DATA, else the download cache, "
                          "filled on first use)")
    protocol.add_argument("--encoder",
                          help=f"smp/timm encoder name ({default('encoder')})")
    protocol.add_argument("--epochs", type=int,
                          help=f"default {D.epochs}, the paper's; --quick: {QUICK['epochs']}")
    protocol.add_argument("--batch-size", type=int,
                          help=f"global batch size ({default('batch_size')})")
    protocol.add_argument("--lr", type=float,
                          help=f"Adam learning rate ({default('lr')})")
    protocol.add_argument("--seed", type=int,
                          help=default("seed"))
    protocol.add_argument("--crop", type=int,
                          help=f"tile size, a multiple of 32 ({default('crop')})")
    protocol.add_argument("--tiles-per-section", type=int,
                          help="keep this many tiles per image, spread evenly "
                          f"(default: all; --quick: {QUICK['tiles_per_section']})")
    protocol.add_argument("--val-every", type=int,
                          help="validate every k epochs (default 1)")
    protocol.add_argument("--val-fraction", type=float,
                          help="a folder without val/: the share of training images held out for validation, "
                               "by image (default 0.2)")
    protocol.add_argument("--split-seed", type=int,
                          help="seeds which training images --val-fraction holds out (default 0)")
    protocol.add_argument("--normalize", choices=NORMALIZATIONS,
                          help="image (default): each image standardised with its own mean and std, whatever its bit "
                               "depth; dataset: the training split's mean and std, for calibrated intensities")
    protocol.add_argument("--keep", choices=KEEP,
                          help="all (default): keep last.pt (weights and optimiser state, to continue the run) beside "
                               "best.pt; best: delete last.pt when the run finishes")
    protocol.add_argument("--device",
                          help="auto (default: cuda if there is one), cpu, cuda, cuda:1 ...")
    protocol.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                          help="no progress bars (for logs)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny protocol for a CPU, on the Drosophila data or any folder (3 training images, "
                        "1 validation, 1 test; measured: 30 s on an idle 2-core CPU, longer on a busy one); "
                        "explicit options win")
    # What the commands hand to TrainConfig.build as the protocol: these options and no others.
    # (_group_actions: argparse has no public list of a group's options; unchanged since Python 2.7.)
    p.set_defaults(protocol_options=tuple(action.dest for action in protocol._group_actions))


def protocol_config(args, **settings):
    """A TrainConfig of the training protocol as given on the command line (None where an option was not
    given: the protocol's default, or --quick's) and the command's own ``settings``."""
    from frem.seg.config import TrainConfig
    given = {name: getattr(args, name) for name in args.protocol_options}
    return TrainConfig.build(quick=args.quick, **settings, **given)


def train_config(args):
    """The TrainConfig of ``frem train``: the protocol, the variant's settings and the run folder."""
    return protocol_config(args, variant=args.variant, B=args.B, X=args.X, lambda_=args.lambda_,
                           out=args.out or f"runs/{args.variant}", resume=args.resume)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="frem",
                    description="FREM (Ando & Hotta, VISAPP 2021) for cell segmentation")
    parser.add_argument("--version", action="version", version=f"frem {__version__}",
                        help="print frem's version and exit")
    commands = parser.add_subparsers(dest="command", required=True)  # of the parser's class: Parser

    train = commands.add_parser("train",
                                help="train one model variant and score it on the test split")
    train.add_argument("--variant", choices=VARIANTS, default="frem",
                       help="the model to train (default frem)")
    train.add_argument("--B", type=_number,
                       help="channels to enhance/drop: a count or a fraction "
                       "(frem: 8, frem-fixed: 10, dropout: 8)")
    train.add_argument("--X", type=float,
                       help="enhancement factor (frem: 250, frem-fixed: 10000)")
    train.add_argument("--lambda", dest="lambda_", type=float, metavar="LAMBDA",
                       help="supervision loss weight (default 0.5)")
    train.add_argument("--out",
                       help="run folder (default runs/<variant>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out")
    add_train_options(train)

    tune = commands.add_parser(
        "tune",
        help="TPE search (Optuna) over B and X, or lambda",
        description="Optuna TPE search maximising validation mIoU; hopeless trials are pruned.",
        epilog="search space: " + SEARCH_SPACE + ". Storage: a SQLite file OUT/study.db by default "
               "(a killed search resumes); journal:PATH for several processes on one machine; "
               "postgresql://... for several machines.")
    tune.add_argument("--variant", choices=TUNABLE, default="frem",
                      help="the variant to tune (default frem)")
    tune.add_argument("--trials", type=int, default=50,
                      help="finished trials the study should hold (default 50)")
    tune.add_argument("--study", default="frem",
                      help="study name (default frem)")
    tune.add_argument("--storage",
                      help="Optuna storage URL or journal:PATH (default sqlite:///OUT/study.db)")
    tune.add_argument("--pruner", choices=("hyperband", "median", "none"), default="hyperband",
                      help="stops hopeless trials early (default hyperband)")
    tune.add_argument("--out", default="runs/tune",
                      help="folder for the study and the trial runs (default runs/tune)")
    add_train_options(tune)

    reproduce = commands.add_parser(
        "reproduce",
        help="every variant x seeds under one protocol: table and figures in OUT/results")
    reproduce.add_argument("--seeds", type=int,
                           help=f"seeds per variant (default {REPRODUCE['seeds']}; "
                           f"--quick: {REPRODUCE_QUICK['seeds']})")
    reproduce.add_argument("--tune-trials", type=int,
                           help=f"TPE trials for the B-X figure (default {REPRODUCE['tune_trials']}; "
                           f"--quick: {REPRODUCE_QUICK['tune_trials']}; 0 skips)")
    reproduce.add_argument("--paper", choices=("auto", "drosophila", "mouse-liver", "none"), default="auto",
                           help="the paper's tables to print beside ours (default auto: Table 2 for the "
                           "Drosophila data, Tables 1 and 3 for a folder with the mouse-liver classes)")
    reproduce.add_argument("--out", default="reproduction",
                           help="folder for the runs and the study (default reproduction)")
    reproduce.add_argument("--results",
                           help="folder for the table and figures (default OUT/results)")
    add_train_options(reproduce)

    evaluate = commands.add_parser("evaluate",
                                   help="recompute a run's test metrics from best.pt")
    evaluate.add_argument("run_dir",
                          help="a run folder of frem train (holding best.pt)")
    evaluate.add_argument("--data",
                          help="data folder (default: the one the run was trained on, remembered "
                          "in best.pt; its checksum must match)")
    evaluate.add_argument("--split", choices=("test", "val"), default="test",
                          help="the split to score (default test)")
    evaluate.add_argument("--device", default="auto",
                          help="auto (default: cuda if there is one), cpu, cuda, cuda:1 ...")

    predict = commands.add_parser("predict",
                                  help="segment images: label PNGs and colour overlays")
    predict.add_argument("--checkpoint", required=True,
                         help="a run's best.pt")
    predict.add_argument("images", nargs="+",
                         help="images to segment (PNG, TIFF, a TIFF stack ...)")
    predict.add_argument("--out", required=True,
                         help="folder for <name>_labels.png and <name>_overlay.png")
    predict.add_argument("--device", default="auto",
                         help="auto (default: cuda if there is one), cpu, cuda, cuda:1 ...")

    data = commands.add_parser("data",
                               help="data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    download = data_commands.add_parser("download",
                                        help="download a data set, verified")
    download.add_argument("name", choices=("drosophila",),
                          help="the data set (drosophila: the ssTEM stack of the paper's Table 2)")
    download.add_argument("--dest",
                          help="target folder (default ~/.cache/frem/drosophila-vnc)")
    download.add_argument("--url",
                          help="base URL of a mirror ($FREM_DROSOPHILA_URL)")
    return parser


def run_train(args) -> int:
    from frem.seg.train import train
    config = train_config(args)
    metrics = train(config)
    print(json.dumps({"run": config.out, "test": metrics["test"], "best_epoch": metrics["best_epoch"],
                      "best_val_miou": metrics["best_val_miou"], "device": metrics["device"],
                      "wall_time_s": round(metrics["wall_time_s"], 1)}, indent=2))
    return 0


def run_tune(args) -> int:
    from frem.seg.tune import tune
    if args.trials < 1:
        raise ValueError(f"--trials must be at least 1, got {args.trials}")
    base = protocol_config(args, variant=args.variant)
    summary = tune(base, trials=args.trials, study_name=args.study, storage=args.storage, out=args.out,
                   pruner=args.pruner, progress=base.progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "train_command"}, indent=2))
    if "train_command" in summary:
        print("\nTrain the best setting in full with:\n  " + summary["train_command"])
    return 0


def run_reproduce(args) -> int:
    from frem.seg.reproduce import reproduce
    base = protocol_config(args)
    protocol = REPRODUCE_QUICK if args.quick else REPRODUCE
    seeds = args.seeds if args.seeds is not None else protocol["seeds"]
    trials = args.tune_trials if args.tune_trials is not None else protocol["tune_trials"]
    results = args.results or f"{args.out}/results"  # never the shipped results/ unless asked
    summary = reproduce(base, seeds=list(range(seeds)), out=args.out, results_dir=results,
                        tune_trials=trials, paper_tables=args.paper, progress=base.progress)
    print(f"{results}/README.md\n{summary['verdict']}")
    if summary["beside_paper"]:
        print("\n" + summary["beside_paper"])
    return 0


def run_evaluate(args) -> int:
    from frem.seg.evaluate import evaluate_run
    metrics = evaluate_run(args.run_dir, device=args.device, data_root=args.data, split=args.split)
    print(json.dumps({"run": args.run_dir, "checkpoint": "best.pt", "split": args.split, **metrics}, indent=2))
    return 0


def run_predict(args) -> int:
    from frem.seg.predict import predict
    for path in predict(args.checkpoint, args.images, args.out, device=args.device):
        print(path)
    return 0


def run_download(args) -> int:
    from frem.seg.data.drosophila import download
    from frem.seg.data.drosophila import OFFLINE_DOWNLOAD
    print(f"downloaded and verified: {download(args.dest, args.url, offline=OFFLINE_DOWNLOAD)}")
    return 0


COMMANDS = {"train": run_train, "tune": run_tune, "reproduce": run_reproduce, "evaluate": run_evaluate,
            "predict": run_predict}
# What continues each command after Ctrl-C: said in one line, no traceback.
CONTINUES = {
    "train": "run the same command with --resume to continue the run from its last epoch",
    "tune": "run the same command again to continue the search: the interrupted trial is queued again and resumes "
            "from its last checkpoint",
    "reproduce": "run the same command again: finished runs are kept and the unfinished one resumes",
    "evaluate": "nothing was written; run the same command again",
    "predict": "the images finished before it are written whole, the one it was on not at all; run the same "
               "command again",
    "data": "run the same command again: the download continues where it stopped",
}


def main(argv=None) -> int:
    missing = missing_requirements()
    if missing:
        print(f"frem: the command line needs the '{EXTRA}' extra (missing: {', '.join(missing)}): "
              f"{install_command(EXTRA)}", file=sys.stderr)
        return 2
    # timm's import on torch >= 2.14 warns about its own use of torch.jit.interface:
    # nothing a user can act on, and it would bury our one-line messages.
    warnings.filterwarnings("ignore", message=".*torch.jit.interface.* is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    handler = run_download if args.command == "data" else COMMANDS[args.command]
    try:
        if getattr(args, "device", None) is not None:  # before anything is read, downloaded or written
            from frem.seg.distributed import resolve_device
            resolve_device(args.device)
        return handler(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"frem {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"frem {args.command}: interrupted; {CONTINUES[args.command]}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
