"""The checkpoint module's contract, file by file: atomic writes, their failures, stale temporaries,
strict JSON, the messages of load, and the run lock. (Whole runs exercise it in test_robustness.)"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil

import pytest
import torch

from frem.seg import checkpoint
from frem.seg.checkpoint import (CheckpointError, RunLocked, WriteError, atomic_write, clean_stale_temporaries,
                                 load, run_lock, save, save_json, strict_json)


def test_a_write_creates_missing_folders_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a" / "b" / "metrics.json"
    save_json({"miou": 0.5}, target)
    assert json.loads(target.read_text()) == {"miou": 0.5}
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_users_usual_mode_not_mkstemps_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        save({"x": torch.ones(1)}, tmp_path / "last.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_interrupted_write_keeps_the_old_file_and_propagates_the_interrupt(tmp_path):
    target = tmp_path / "best.pt"
    save({"v": torch.zeros(2)}, target)

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_a_failed_write_names_the_file_and_the_cause(tmp_path):
    def refused(f):
        raise PermissionError("not allowed\nsecond line")

    with pytest.raises(WriteError) as raised:
        atomic_write(tmp_path / "last.pt", refused, checkpoint.RESUME)
    message = str(raised.value)
    assert message.startswith(f"could not write {tmp_path / 'last.pt'}: PermissionError: not allowed.")
    assert "second line" not in message and message.endswith("run the same command with --resume to continue")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WriteError, match=r"free some space and run the same command again$"):  # not a training run
        atomic_write(tmp_path / "labels.png", refused)


def test_a_file_written_at_a_path_is_whole_or_absent(tmp_path):
    target = tmp_path / "a.png"
    with checkpoint.atomic_path(target) as part:
        part.write_bytes(b"whole")
        assert not target.exists() and part.name.startswith(".a.png.")
    assert target.read_bytes() == b"whole" and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    with pytest.raises(KeyboardInterrupt), checkpoint.atomic_path(target) as part:
        part.write_bytes(b"half")
        raise KeyboardInterrupt  # Ctrl-C mid-write
    assert target.read_bytes() == b"whole" and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_a_full_disk_is_named_as_such(tmp_path):
    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"could not write .*last.pt: the disk is full\. The files written"):
        atomic_write(tmp_path / "last.pt", full)


FILL = """
import resource, signal, sys, torch
from frem.seg import checkpoint
if sys.argv[2] == "limit":  # the OS refuses to let this process's files pass 64 KiB
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
checkpoint.save({"small": torch.zeros(4)}, sys.argv[1] + "/best.pt")
try:
    checkpoint.save({"model": torch.randn(1 << 22)}, sys.argv[1] + "/last.pt")  # 16 MiB
except checkpoint.WriteError as error:
    print(error)
"""


def _fill(folder, how):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", FILL, str(folder), how], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_a_file_size_limit_is_named_and_the_earlier_files_stay(tmp_path):
    """A real refusal by the OS (EFBIG under RLIMIT_FSIZE) in the middle of torch.save, which reports it as
    'unexpected pos ...': the message names the cause, the earlier checkpoint stays, nothing is left behind."""
    message = _fill(tmp_path, "limit")
    assert message.startswith(f"could not write {tmp_path / 'last.pt'}: the file is larger than this file system "
                              "or process allows. The files written before it are intact"), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    assert torch.equal(torch.load(tmp_path / "best.pt", weights_only=True)["small"], torch.zeros(4))


def test_a_really_full_disk_is_named_as_such(tmp_path):
    """An 8 MiB tmpfs filled by a 16 MiB checkpoint (needs mount, so root; skipped where it is refused). Once the
    partial file is gone the disk has room again, so only the failed write's own errno can say it was full."""
    import subprocess
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        message = _fill(disk, "full")
        assert sorted(p.name for p in disk.iterdir()) == ["best.pt"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert message.startswith(f"could not write {disk / 'last.pt'}: the disk is full. The files written before "
                              "it are intact"), message


def test_stale_temporaries_are_what_a_killed_write_leaves_and_nothing_else(tmp_path, monkeypatch):
    def killed(f):
        raise SystemExit

    with monkeypatch.context() as patch:  # a process killed mid-write never reaches its cleanup
        patch.setattr(checkpoint.Path, "unlink", lambda self, missing_ok=False: None)
        with pytest.raises(SystemExit):
            atomic_write(tmp_path / "last.pt", killed)
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.pt.")
    keep = [tmp_path / "best.pt", tmp_path / ".lock", tmp_path / "notes.tmp"]
    for path in keep:
        path.write_text("keep")
    (tmp_path / ".folder.tmp").mkdir()
    assert clean_stale_temporaries(tmp_path) == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".folder.tmp"] + [p.name for p in keep])


def test_strict_json_replaces_every_non_finite_number_at_any_depth():
    value = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": math.nan, "e": 3}, "f": "nan"}
    assert strict_json(value) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": None, "e": 3}, "f": "nan"}


def test_metrics_files_are_indented_for_people_to_read(tmp_path):
    save_json({"test": {"miou": 0.5}}, tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text() == '{\n  "test": {\n    "miou": 0.5\n  }\n}\n'


def test_load_messages_add_the_hint_only_when_there_is_one(tmp_path):
    with pytest.raises(CheckpointError) as raised:
        load(tmp_path / "best.pt")
    assert str(raised.value) == f"no checkpoint at {tmp_path / 'best.pt'}"
    with pytest.raises(CheckpointError) as raised:
        load(tmp_path / "best.pt", hint="train first")
    assert str(raised.value) == f"no checkpoint at {tmp_path / 'best.pt'}: train first"
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError) as raised:
        load(tmp_path / "bad.pt")
    assert "damaged" in str(raised.value) and str(raised.value).endswith(")")
    with pytest.raises(CheckpointError, match=r"damaged .*; use --resume"):
        load(tmp_path / "bad.pt", hint="use --resume")


def test_load_names_every_missing_key(tmp_path):
    torch.save({"config": {}, "model": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"lacks classes, in_channels, normalization\); see the README$"):
        load(tmp_path / "x.pt", hint="see the README")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="lacks config, model, classes"):
        load(tmp_path / "list.pt")
    assert load(tmp_path / "x.pt", required=("config",))["model"] == {}


def test_the_run_lock_refuses_a_second_holder_names_the_first_and_is_free_after(tmp_path):
    folder = tmp_path / "new" / "run"
    with run_lock(folder):
        assert (folder / ".lock").read_text() == f"frem (pid {os.getpid()})"
        with pytest.raises(RunLocked, match=rf"{folder} is in use by frem \(pid {os.getpid()}\)"):
            with run_lock(folder):
                pass
    with run_lock(folder):  # released with the first holder
        pass


def test_a_failure_after_the_rename_is_a_write_error_not_a_missing_temporary(tmp_path, monkeypatch):
    def sync_fails(folder):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint, "_sync_folder", sync_fails)
    with pytest.raises(WriteError, match="OSError: .*Input/output error"):
        save_json({"a": 1}, tmp_path / "m.json")


@pytest.mark.parametrize(("free", "full"), [(2**20 - 1, True), (2**20, False), (3**20, False)])
def test_less_than_a_mebibyte_free_counts_as_a_full_disk(tmp_path, monkeypatch, free, full):
    usage = shutil._ntuple_diskusage(total=2**40, used=2**40 - free, free=free)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage)

    def refused(f):
        raise PermissionError("not allowed")

    with pytest.raises(WriteError) as raised:
        atomic_write(tmp_path / "last.pt", refused)
    assert ("the disk is full" in str(raised.value)) == full


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", [
    b".",                                          # a lone STOP: the unpickler fails with an IndexError
    b"\x80\x02",                                   # a pickle header and nothing: an EOFError without a message
    pickle.dumps({1, 2}, protocol=2),              # a plain pickle: torch says "Invalid magic number"
    b"PK\x03\x04" + b"\x00" * 30,                   # a broken zip
])
def test_every_damaged_file_is_one_checkpoint_error_with_torchs_first_line(tmp_path, content):
    (tmp_path / "best.pt").write_bytes(content)
    try:
        torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever torch raises is what the message must carry
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    with pytest.raises(CheckpointError) as raised:
        load(tmp_path / "best.pt", hint="train again")
    assert str(raised.value) == (f"{tmp_path / 'best.pt'} is damaged (truncated or not a checkpoint: "
                                 f"{first_line}); train again")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_torch_refuses_names_the_unpicklers_reason(tmp_path):
    (tmp_path / "best.pt").write_bytes(pickle.dumps([1, 2], protocol=4))
    with pytest.raises(CheckpointError) as raised:
        load(tmp_path / "best.pt")
    expected = "is damaged (not a readable checkpoint: Unsupported operand 149)"
    assert str(raised.value) == f"{tmp_path / 'best.pt'} {expected}"


@pytest.mark.parametrize(("message", "reason"), [
    ("Weights only load failed.\nPlease file an issue ...: WeightsUnpickler error: \n\nUnsupported operand 149\n\n"
     "Check the documentation", "Unsupported operand 149"),                       # torch 2.6 and later
    ("Weights only load failed. WeightsUnpickler error: Unsupported operand 149", "Unsupported operand 149"),
    ("WeightsUnpickler error: Unsupported class x\nsee also: the error: list", "Unsupported class x"),
    ("WeightsUnpickler error: a reason that says error: too", "a reason that says error: too"),
    ("an unpickling failure without torch's wording", "not a checkpoint"),
    ("WeightsUnpickler error:", "not a checkpoint"),
])
def test_the_unpicklers_reason_in_each_torch_wording(message, reason):
    assert checkpoint.unpickler_reason(pickle.UnpicklingError(message)) == reason


def test_running_out_of_memory_while_loading_is_not_called_damage(tmp_path, monkeypatch):
    save({"config": {}}, tmp_path / "best.pt")

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(checkpoint.torch, "load", out_of_memory)
    with pytest.raises(MemoryError):
        load(tmp_path / "best.pt")
