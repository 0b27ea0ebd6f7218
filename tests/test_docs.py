"""Every command the README and docs/ show, checked by a test.

* Each ``frem`` line (``torchrun ... -m frem`` too) is parsed by the real parser and built into the
  configuration it names, so a renamed option, a wrong value or a stale placeholder fails here.
* The quick ones run as written in a scratch folder, on the test excerpt of the Drosophila data:
  ``frem train --quick``, and ``frem evaluate`` / ``frem predict`` on a real finished run at the path
  the line names (``runs/frem``: the session's tiny run copied there; ``images/*.tif``: a real section).
  Longer protocols (the paper's 2000 epochs, searches, reproductions) are parsed, not run.
* Every Python block runs, as written, in a fresh interpreter.
* Every other program a line names is checked against what the repository has: an example or script
  that exists, an extra pyproject declares, an nnU-Net command the nnU-Net test runs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from frem.seg.cli import build_parser, protocol_config, train_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "DEVELOPERS.md"]
BLOCK = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>\w*)\n(?P<code>.*?)^(?P=indent)```", re.S | re.M)
SEPARATORS = {"&&", "&", ";", "|", "||"}
EXTERNAL = {"export", "optuna-dashboard", "sha256sum", "cd"}  # programs not ours, nothing to check


def blocks(lang: str):
    for path in DOCS:
        for match in BLOCK.finditer(path.read_text()):
            if match.group("lang") == lang:
                yield path, textwrap.dedent(match.group("indent") + match.group("code"))


def shell_commands():
    """(doc, line, env, argv) for every command of every bash block."""
    for path, code in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command: list = []
            for word in words + [";"]:
                if word in SEPARATORS:
                    if command:
                        yield _split_env(path, line, command)
                    command = []
                else:
                    command.append(word)


def _split_env(path, line, words):
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if ">" in words:  # a redirection: the command is what comes before it
        words = words[:words.index(">")]
    return path.relative_to(ROOT).as_posix(), line.strip(), env, words


COMMANDS = list(shell_commands())
PYTHON = list(blocks("python"))


def test_the_docs_show_commands_and_code_to_check():
    assert len(COMMANDS) >= 30 and len(PYTHON) >= 4
    assert any(argv[:2] == ["frem", "train"] and "--quick" in argv for _, _, _, argv in COMMANDS)


def frem_config(argv):
    """What a ``frem`` command line builds: its parsed arguments and, for the training commands, the config."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:
        raise AssertionError(f"frem {shlex.join(argv)} does not parse (exit {exit.code})") from None
    if args.command == "train":
        return args, train_config(args)
    if args.command == "tune":
        return args, protocol_config(args, variant=args.variant)
    if args.command == "reproduce":
        return args, protocol_config(args)
    return args, None


@pytest.mark.parametrize("doc, line, env, argv", COMMANDS, ids=[f"{c[0]}: {c[1][:60]}" for c in COMMANDS])
def test_every_command_line_names_what_frem_and_the_repository_have(doc, line, env, argv):
    program = argv[0]
    if program == "torchrun":
        module = argv[argv.index("-m") + 1]
        assert module == "frem", line
        frem_config(argv[argv.index("-m") + 2:])
    elif program == "frem":
        frem_config(argv[1:])
    elif program == "pip":
        extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        for word in argv[2:]:
            named = re.fullmatch(r"\.?\[([\w,-]+)\]", word)
            if named:
                assert set(named.group(1).split(",")) <= extras, f"{doc}: {line} names an extra pyproject lacks"
    elif program in ("python", "python3"):
        if argv[1] != "-m":
            assert (ROOT / argv[1]).is_file(), f"{doc}: {line}: no {argv[1]} in the repository"
    elif program in ("pytest", "bash"):
        assert (ROOT / argv[1]).exists(), f"{doc}: {line}: no {argv[1]} in the repository"
    elif program.startswith("nnUNetv2_"):
        assert f'"{program}"' in (ROOT / "tests" / "test_nnunet.py").read_text() and "nnUNetTrainerFREM" in line, \
            f"{doc}: {line}: tests/test_nnunet.py does not run {program} with FREM's trainer"
    else:
        assert program in EXTERNAL, f"{doc}: {line}: frem's docs name {program!r}; check it here"


def runs_as_written(argv) -> bool:
    """What a test can run as written: a quick training, and the commands that read a finished run."""
    return argv[0] == "frem" and (argv[1] in ("evaluate", "predict") or (argv[1] == "train" and "--quick" in argv))


RUNNABLE = [c for c in COMMANDS if runs_as_written(c[3])]


@pytest.mark.slow
@pytest.mark.parametrize("doc, line, env, argv", RUNNABLE, ids=[f"{c[0]}: {c[1][:60]}" for c in RUNNABLE])
def test_the_quick_commands_run_as_written(doc, line, env, argv, drosophila_root, trained_run, tmp_path):
    """In a scratch folder: FREM_DATA (as the README's offline form sets it) is the test excerpt, a run the
    line reads is a real finished run, and the images it names are a real section."""
    if argv[1] != "train":
        run = next(Path(w) for w in argv if w.startswith("runs/"))
        run = run.parent if run.suffix == ".pt" else run
        shutil.copytree(trained_run, tmp_path / run)
    (tmp_path / "images").mkdir()
    shutil.copy(drosophila_root / "stack2" / "raw" / "00.tif", tmp_path / "images" / "section.tif")
    words = [w for pattern in argv[1:] for w in
             ([str(p.relative_to(tmp_path)) for p in sorted(tmp_path.glob(pattern))] if "*" in pattern else [pattern])]
    done = subprocess.run([sys.executable, "-m", "frem", *words], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, **env, "FREM_DATA": str(drosophila_root)})
    assert done.returncode == 0, f"{doc}: {line}\n{done.stderr[-3000:]}"
    if argv[1] == "predict":
        assert (tmp_path / "predictions" / "section_labels.png").is_file()
    if argv[1] == "train":
        assert (tmp_path / argv[argv.index("--out") + 1] / "best.pt").is_file()
        again = subprocess.run([sys.executable, "-m", "frem", "evaluate", argv[argv.index("--out") + 1]],
                               cwd=tmp_path, capture_output=True, text=True, timeout=600)  # "in a new shell"
        assert again.returncode == 0 and '"split": "test"' in again.stdout, again.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("doc, code", PYTHON, ids=[f"{p.relative_to(ROOT)}-{i}" for i, (p, _) in enumerate(PYTHON)])
def test_every_python_block_runs_as_written(doc, code, tmp_path):
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{doc}:\n{code}\n{done.stderr[-3000:]}"
    for expected in re.findall(r"print\((.*)\)\s+# (.+)$", code, re.M):  # a printed value the block shows
        shown = expected[1].split(":")[0].strip()
        assert shown in done.stdout, f"{doc}: the block says {expected[0]} prints {shown!r}; it printed " \
                                     f"{done.stdout[-500:]!r}"


def test_the_candidate_table_the_docs_show_is_what_frem_prints():
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import frem
    from handwritten import PlainUNet
    shown = next(code for _, code in blocks("") if code.startswith("layer "))
    torch.manual_seed(0)
    printed = [line.rstrip() for line in str(frem.candidates(PlainUNet(), torch.randn(2, 1, 32, 32))).splitlines()]
    for line in shown.splitlines():
        if line.strip() != "...":
            assert line.rstrip() in printed, f"docs/library.md shows {line!r}; frem prints:\n" + "\n".join(printed)


def test_every_link_between_the_pages_resolves():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to {target}, which is not there"
