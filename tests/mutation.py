"""Mutation testing of the whole project, one module group at a time, each against its own tests.

    python tests/mutation.py                 # every group, one after the other
    python tests/mutation.py train tune      # some groups
    python tests/mutation.py --continue train   # go on with a stopped whole-group run (results kept)
    python tests/mutation.py --list          # the groups, their files and tests
    python tests/mutation.py --summarize kernels   # re-score a finished run
    python tests/mutation.py --sample 25 train evaluate   # 25 random mutants of each module
    python tests/mutation.py --modules train frem.seg.config   # every mutant of some of a group's modules
    python tests/mutation.py --again train   # after adding tests: rerun what survived or no test reached
    python tests/mutation.py --table         # the last scores per module, as a markdown table

mutmut mutates the group's files and runs, for each mutant, the tests of the
group that cover the mutated function. A group runs in a copy of the
repository (``/tmp/frem-mutation/<group>``), so groups never share mutmut's
state and the working tree stays untouched. In that copy ``kernels/`` lies
inside ``frem/`` (where it is installed), so the kernels' launcher is mutated
and imported like the rest; subprocesses (``python -m frem``) see the
mutants through PYTHONPATH. Each group prints its score and writes
``summary.json`` and ``survivors.txt`` beside its copy. Needs ``pip install
mutmut`` and the Drosophila data (FREM_DATA). DEVELOPERS.md keeps the last run.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("FREM_MUTATION_DIR", "/tmp/frem-mutation"))

# group -> (files to mutate, tests that should catch their bugs)
GROUPS = {
    "core": (["frem/module.py", "frem/hooks.py", "frem/selection.py", "frem/seg/metrics.py"],
             ["tests/test_module.py", "tests/test_hooks.py", "tests/test_metrics.py", "tests/test_model_operations.py",
              "tests/test_mixed_precision.py"]),
    "bottleneck": (["frem/bottleneck.py", "frem/rule.py", "frem/survey.py", "frem/known.py", "frem/sites.py"],
                   ["tests/test_networks.py"]),
    "kernels": (["frem/kernels/scale_channels.py"],
                ["tests/test_scale_channels.py", "tests/test_kernels.py", "tests/test_op_autograd.py",
                 "tests/test_opcheck.py"]),
    "train": (["frem/seg/train.py", "frem/seg/config.py", "frem/seg/variants.py", "frem/seg/models.py"],
              ["tests/test_train.py", "tests/test_protocol.py", "tests/test_config.py", "tests/test_robustness.py",
               "tests/test_first_hour.py"]),
    "checkpoint": (["frem/seg/checkpoint.py"], ["tests/test_checkpoint.py", "tests/test_robustness.py", "tests/test_evaluation.py"]),
    "evaluate": (["frem/seg/evaluate.py", "frem/seg/predict.py"],
                 ["tests/test_evaluation.py", "tests/test_first_hour.py", "tests/test_train.py"]),
    "tune": (["frem/seg/tune.py", "frem/seg/search_space.py"], ["tests/test_search.py", "tests/test_tune.py"]),
    "cli": (["frem/seg/cli.py"], ["tests/test_cli.py", "tests/test_first_hour.py", "tests/test_protocol.py"]),
    "data": (["frem/seg/data/base.py", "frem/seg/data/drosophila.py", "frem/seg/data/folder.py",
              "frem/seg/data/images.py"],
             ["tests/test_data.py", "tests/test_robustness.py", "tests/test_first_hour.py"]),
}
# Functions mutmut reaches but cannot test: Triton compiles the kernels' bodies from their source, so
# a trampoline is never called (mutmut 3.8 ignores "no mutate block"). tests/audit_mutants.sh mutates
# them by hand; their mutants are left out of the score.
HAND_MUTATED = {"kernels": ("x__scale_tiles_kernel__", "x__scale_strided_kernel__")}
# Not mutated: the wording of messages (tests match what matters in them), docstrings and the command
# line's help texts (each on a line of its own in cli.py, so an option's type and default are still
# mutated; test_cli checks that every option has help and that no help misstates a default).
DO_NOT_MUTATE_PATTERNS = [r'^\s*f?"', r'raise \w+\(f?"', r'warnings\.warn\(', r'^\s*"""', r'^\s*\+ \(?f?"',
                          r'^\s*(help|description|epilog)=']
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "results", "runs", "mutants", ".whl", ".data",
                                "__pycache__", ".hypothesis", ".pytest_cache", ".benchmarks", "reproduction")


def toml_list(values) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def prepare(group: str) -> Path:
    copy = WORK / group
    shutil.rmtree(copy, ignore_errors=True)
    copy_tree(copy)
    configure(group, copy)
    # mutants/ must exist before mutmut starts: Python remembers a PYTHONPATH entry that was missing
    # at start-up as absent, and the tests would then import the installed, unmutated frem.
    (copy / "mutants").mkdir()
    return copy


def copy_tree(copy: Path) -> None:
    shutil.copytree(ROOT, copy, ignore=IGNORE, dirs_exist_ok=True)
    shutil.copytree(copy / "kernels", copy / "frem" / "kernels", dirs_exist_ok=True)  # as installed: frem.kernels
    shutil.rmtree(copy / "kernels")


def configure(group: str, copy: Path) -> None:
    files, tests = GROUPS[group]
    pyproject = (copy / "pyproject.toml").read_text()
    pyproject = pyproject[:pyproject.index("[tool.mutmut]")] if "[tool.mutmut]" in pyproject else pyproject
    (copy / "pyproject.toml").write_text(pyproject + f"""[tool.mutmut]
source_paths = ["frem/"]
only_mutate = {toml_list(files)}
also_copy = ["examples/", "benchmarks/", "README.md", "DEVELOPERS.md", ".ci/"]  # tests read the docs too
do_not_mutate_patterns = {toml_list(DO_NOT_MUTATE_PATTERNS)}
pytest_add_cli_args_test_selection = {toml_list(tests)}
# torch.compile cannot trace mutmut's trampolines: the compile tests run in the normal suite only.
pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q", "-k", "not compile", "-m", "not cuda"]
process_isolation = "forkserver"   # torch is not fork-safe
timeout_multiplier = 8.0
use_git_change_detection = false
""")


MUTMUT_RUN = [sys.executable, str(Path(__file__).resolve()), "--mutmut", "run", "--max-children", "2"]


def mutmut_fastest_first(args: list[str]) -> None:
    """mutmut, giving each mutant its tests in the order of their recorded time, quickest first.

    A mutant counts as caught at its first failing test (``-x``), and mutmut passes the tests in
    set order, so a mutant that a 0.1 s test catches could first sit through a 40 s one.
    """
    from mutmut.runners import harness
    from mutmut.state import state

    regular = harness.PytestRunner._pytest_args_regular_run
    harness.PytestRunner._pytest_args_regular_run = lambda runner, tests: regular(
        runner, sorted(tests, key=lambda test: state().duration_by_test.get(test, 0.0)))
    from mutmut.__main__ import cli
    sys.argv = ["mutmut", *args]
    cli()


def refreshed(group: str) -> Path:
    """The group's copy with the working tree's code and tests, keeping mutmut's results if it exists.

    mutmut maps functions to the tests that call them once, and afterwards only for new tests: a
    function added since (or a test now calling it) would stay "no tests". So when the code or the
    tests changed, the map is dropped and mutmut traces every test again (minutes; results are kept).
    """
    copy = WORK / group
    if not copy.exists():
        return prepare(group)
    before = sources(copy)
    for output in ("runs", "reproduction"):  # what a mutant that ignored --out left in the tests' folder
        shutil.rmtree(copy / "mutants" / output, ignore_errors=True)
    copy_tree(copy)
    configure(group, copy)
    if sources(copy) != before:
        (copy / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    return copy


def sources(copy: Path) -> dict:
    return {path: path.read_bytes() for folder in ("frem", "tests") for path in sorted((copy / folder).rglob("*.py"))}


def generate(copy: Path) -> None:
    """mutmut's generation and stats only: a mutant name that matches nothing stops it there."""
    subprocess.run(MUTMUT_RUN + ["frem.no_such_mutant"], cwd=copy, env=environment(copy), capture_output=True)


def up_to_date(group: str) -> tuple[Path, dict]:
    """The group's copy refreshed and its mutants generated, with the state of each that counts."""
    copy = refreshed(group)
    generate(copy)
    return copy, scored(group, mutant_states(copy))


def sample_file(group: str) -> Path:
    return WORK / f"{group}.sample.json"


def scored_part(group: str, states: dict) -> dict:
    """Per module, the mutants its score counts and how they were chosen: all of them once every
    one has a result, else the group's sample if one was drawn, else those checked so far."""
    sampled = set(json.loads(sample_file(group).read_text())) if sample_file(group).exists() else None
    part = {}
    for module, names in sorted(by_module(states).items()):
        if all(states[n] != "not checked" for n in names):
            part[module] = ("all", names)
        elif sampled is not None:
            part[module] = ("sample", [n for n in names if n in sampled])
        else:
            part[module] = ("partial", [n for n in names if states[n] != "not checked"])
    return part


def last_summary(group: str) -> dict:
    previous = WORK / f"{group}.summary.json"
    return json.loads(previous.read_text()) if previous.exists() else {}


def recorded_minutes(group: str, default: float) -> float:
    return last_summary(group).get("minutes", default)


def run(group: str, keep: bool = False) -> dict:
    """The whole group. ``keep``: continue in the existing copy (mutmut keeps every result there
    and runs what is unchecked), so a run of many hours can stop and go on another day."""
    copy = refreshed(group) if keep else prepare(group)
    if not keep:  # its names' results are gone; a module not finished falls back on the sample otherwise
        sample_file(group).unlink(missing_ok=True)
    started = time.time()
    subprocess.run(MUTMUT_RUN, cwd=copy, env=environment(copy))
    return summarize(group, minutes=(time.time() - started) / 60)


def again(group: str) -> dict:
    """After tests (or code) changed: bring the copy up to date and run what is not caught yet.

    mutmut first regenerates the mutants of changed functions and collects stats for new tests
    (a name that matches nothing stops it there); then the mutants not caught (survivors, those no
    test reached, and changed functions' new mutants) are named, since mutmut otherwise lets a
    result stand, and a run without names would run every mutant not checked yet: the whole
    group, where a sample was drawn. A module last scored over all its mutants stays whole: the new
    mutants of its changed functions are run too, not just those of the sample.
    """
    started = time.time()
    whole = {module for module, row in last_summary(group).get("modules", {}).items() if row.get("kind") == "all"}
    copy, states = up_to_date(group)
    every = by_module(states)
    counted = {n for module, (_, names) in scored_part(group, states).items()
               for n in (every[module] if module in whole else names)}
    if named := sorted(n for n in counted if states[n] not in ("killed", "timeout")):
        subprocess.run(MUTMUT_RUN + named, cwd=copy, env=environment(copy))
    return summarize(group, minutes=recorded_minutes(group, 0.0) + (time.time() - started) / 60)


def mutant_states(copy: Path) -> dict:
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=copy,
                             env=environment(copy), capture_output=True, text=True).stdout
    states = {}
    for line in listing.splitlines():
        match = re.match(r"\s*(\S+): (\w[\w ]*)$", line)
        if match:
            states[match.group(1)] = match.group(2).strip()
    return states


def environment(copy: Path) -> dict:
    # PYTHONSAFEPATH: the copy's root (mutmut's working folder) holds the unmutated frem/, which
    # python -m would put first on sys.path.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(copy / "mutants"), "PYTHONSAFEPATH": "1",
            "FREM_DATA": os.environ.get("FREM_DATA", str(ROOT.parent / "shared" / "data" / "drosophila-vnc"))}


def sample(group: str, per_module: int) -> dict:
    """Run a uniform random sample of each module's mutants (the same sample every time).

    A full run of the application's groups takes hours on 2 cores (a train.py mutant that
    survives runs about a minute of training tests); a sample estimates each module's score,
    with its 95% interval, and finds the kinds of bug the tests miss.
    """
    started = time.time()
    copy, states = up_to_date(group)  # the results already there are kept
    chosen = []
    for module, names in sorted(by_module(states).items()):
        chosen += random.Random(f"{group}:{module}").sample(sorted(names), min(per_module, len(names)))
    sample_file(group).write_text(json.dumps(chosen, indent=1))
    if to_run := [name for name in chosen if states[name] == "not checked"]:
        subprocess.run(MUTMUT_RUN + to_run, cwd=copy, env=environment(copy))
    return summarize(group, minutes=(time.time() - started) / 60)


def modules(group: str, wanted: list[str]) -> dict:
    """Every unchecked mutant of some of the group's modules: a whole module scored exactly,
    where the whole group would not fit a day."""
    started = time.time()
    copy, states = up_to_date(group)
    found = by_module(states)
    if unknown := [m for m in wanted if m not in found]:
        raise SystemExit(f"no module {', '.join(unknown)} in group {group}: it has {', '.join(sorted(found))}")
    if to_run := sorted(n for m in wanted for n in found[m] if states[n] == "not checked"):
        subprocess.run(MUTMUT_RUN + to_run, cwd=copy, env=environment(copy))
    return summarize(group, minutes=recorded_minutes(group, 0.0) + (time.time() - started) / 60)


def by_module(states: dict) -> dict:
    modules = {}
    for name in states:
        modules.setdefault(re.match(r"(.*?)\.x[_ǁ]", name).group(1), []).append(name)
    return modules


def scored(group: str, states: dict) -> dict:
    """The mutants that count: mutmut's mutants of the kernels' bodies are never called (Triton
    compiles them from source) and are mutated by hand instead."""
    return {name: state for name, state in states.items()
            if not any(f".{prefix}" in name for prefix in HAND_MUTATED.get(group, ()))}


def wilson(caught: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p, spread = caught / n, z * math.sqrt(caught * (n - caught) / n + z * z / 4) / n
    centre = p + z * z / (2 * n)
    return (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)


def summarize(group: str, minutes: float | None = None) -> dict:
    """Score a group from mutmut's results in its copy, module by module (``scored_part``)."""
    every_mutant = mutant_states(WORK / group)
    everything = scored(group, every_mutant)
    if minutes is None:  # re-scored later: keep the recorded time
        minutes = recorded_minutes(group, math.nan)
    modules, counted = {}, []
    for module, (kind, names) in scored_part(group, everything).items():
        counts = {state: sum(1 for n in names if everything[n] == state)
                  for state in sorted({everything[n] for n in names})}
        caught = counts.get("killed", 0) + counts.get("timeout", 0)
        low, high = wilson(caught, len(names))
        modules[module] = {"kind": kind, "mutants": len(names), "counts": counts,
                           "score": caught / max(len(names), 1), "interval_95": [round(low, 3), round(high, 3)]}
        counted += names
        print(f"  {module} ({kind}): {caught}/{len(names)} caught ({100 * caught / max(len(names), 1):.1f}%, "
              f"95% {100 * low:.0f}-{100 * high:.0f}%); {counts}")
    states = {n: everything[n] for n in counted}
    caught = sum(1 for s in states.values() if s in ("killed", "timeout"))
    summary = {"group": group, "files": GROUPS[group][0], "tests": GROUPS[group][1],
               "mutants_in_group": len(everything), "mutants": len(states),
               "hand_mutated_left_out": len(every_mutant) - len(everything),
               "score": caught / max(len(states), 1), "modules": modules, "minutes": round(minutes, 1)}
    (WORK / f"{group}.summary.json").write_text(json.dumps(summary, indent=2))
    (WORK / f"{group}.survivors.txt").write_text(
        "\n".join(n for n, s in states.items() if s in ("survived", "no tests", "not checked")) + "\n")
    print(f"{group}: {caught}/{len(states)} caught ({100 * summary['score']:.1f}%) in {minutes:.0f} min")
    return summary


def table() -> str:
    """The per-module scores of the last runs, as DEVELOPERS.md shows them."""
    lines = ["| group | module | mutants | scored | caught | survived | no test | score | 95% interval |",
             "|---|---|---|---|---|---|---|---|---|"]
    for group in GROUPS:
        path = WORK / f"{group}.summary.json"
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        everything = by_module(scored(group, mutant_states(WORK / group)))
        for module, row in summary.get("modules", {}).items():
            counts = row["counts"]
            caught = counts.get("killed", 0) + counts.get("timeout", 0)
            kind = row.get("kind", "sample" if summary.get("sampled") else "all")
            low, high = row["interval_95"]
            lines.append(f"| {group} | `{module}` | {len(everything.get(module, []))} | {row['mutants']} ({kind}) | "
                         f"{caught} | {counts.get('survived', 0)} | {counts.get('no tests', 0)} | "
                         f"{100 * row['score']:.0f}% | {100 * low:.0f}-{100 * high:.0f}% |")
    return "\n".join(lines)


def main(argv) -> int:
    if argv[:1] == ["--mutmut"]:  # how the driver starts mutmut
        mutmut_fastest_first(argv[1:])
        return 0
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    options = {"--table", "--list", "--summarize", "--sample", "--modules", "--again", "--continue"}
    rest = [a for a in argv if a not in options]
    count = int(rest.pop(0)) if "--sample" in argv else None  # --sample N GROUP...
    groups, wanted = (rest[:1], rest[1:]) if "--modules" in argv else (rest, [])  # --modules GROUP MODULE...
    # a group's name is checked before anything is copied or deleted under WORK
    if unknown := [a for a in groups if a not in GROUPS]:
        raise SystemExit(f"unknown group or option {', '.join(unknown)}: groups are {', '.join(GROUPS)}; "
                         "see --help")
    if "--table" in argv:
        print(table())
    elif "--list" in argv:
        for group, (files, tests) in GROUPS.items():
            print(f"{group}: {' '.join(files)}\n    tests: {' '.join(tests)}")
    elif "--summarize" in argv:  # re-score finished runs without running them again
        for group in groups or list(GROUPS):
            summarize(group)
    elif "--sample" in argv:  # N mutants of each module
        for group in groups:
            sample(group, count)
    elif "--modules" in argv:  # every mutant of those modules
        modules(groups[0], wanted)
    elif "--again" in argv:  # after adding tests: rerun what was not caught
        for group in groups:
            again(group)
    else:
        for group in groups or list(GROUPS):
            run(group, keep="--continue" in argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
