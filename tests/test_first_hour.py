"""A new user's first hour: install, data offline or online, a run, its evaluation in a new shell, a prediction.

Each test is a wrong turn a newcomer took once (issue 17), kept from coming back.
"""

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import frem
from frem.seg import checkpoint
from frem.seg.cli import main
from frem.seg.data import DataError
from frem.seg.data.drosophila import download
from frem.seg.evaluate import evaluate_run, model_from_checkpoint
from frem.seg.predict import predict, predict_image

ROOT = Path(__file__).resolve().parents[1]


def test_offline_the_download_error_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    def offline(*_args, **_kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as error:
        download(tmp_path / "cache", progress=False)
    message = str(error.value)
    assert "Name or service not known" in message and "--data DIR" in message and "FREM_DATA=DIR" in message


def test_a_run_remembers_its_data_so_evaluate_needs_the_run_folder_alone(tiny_config, drosophila_root,
                                                                         monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FREM_DATA", str(drosophila_root))
    config = tiny_config(data=None)  # the data comes from FREM_DATA, as in the README
    main(["train", "--quick", "--out", config.out, "--epochs", "1", "--tiles-per-section", "4",
          "--batch-size", "4", "--no-progress"])
    trained = json.loads(capsys.readouterr().out)["test"]
    metrics = json.loads((Path(config.out) / "metrics.json").read_text())
    assert metrics["data"]["root"] == str(drosophila_root.resolve()) and metrics["data"]["checksum"]
    monkeypatch.delenv("FREM_DATA")  # a new shell
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))  # and nothing to fall back to
    assert main(["evaluate", config.out]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["split"] == "test" and printed["miou"] == trained["miou"]


def test_evaluate_refuses_data_that_is_not_what_the_run_was_trained_on(copy_of_trained_run, tmp_path):
    folder = tmp_path / "other"
    for split in ("train", "val", "test"):
        (folder / split / "images").mkdir(parents=True)
        (folder / split / "masks").mkdir(parents=True)
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / split / "images" / "a.png")
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / split / "masks" / "a.png")
    (folder / "classes.txt").write_text("a\nb\nc\nd\n")
    state = checkpoint.load(copy_of_trained_run / "best.pt")
    state["config"]["dataset"] = "folder"
    checkpoint.save(state, copy_of_trained_run / "best.pt")
    with pytest.raises(DataError, match=r"is not the data .* was trained on .*pass --data DIR"):
        evaluate_run(copy_of_trained_run, data_root=str(folder))


@pytest.mark.parametrize("options, message", [
    (["--data", "/no/such/folder"], "no Drosophila data at /no/such/folder"),
    (["--B", "9999"], "B=9999 is larger than the 512 channels"),
    (["--X", "-1"], "X must be a finite number"),
    (["--resume"], "holds no run to resume"),
])
def test_a_rejected_command_leaves_no_run_folder(options, message, drosophila_root, tmp_path, capsys):
    out = tmp_path / "runs" / "x"
    data = [] if "--data" in options else ["--data", str(drosophila_root)]
    assert main(["train", "--quick", "--out", str(out), *data, *options]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_keep_best_deletes_last_pt_and_the_run_cannot_be_resumed(tiny_config):
    from frem.seg.train import train
    config = tiny_config(keep="best")
    train(config)
    out = Path(config.out)
    assert (out / "best.pt").exists() and (out / "metrics.json").exists() and not (out / "last.pt").exists()
    with pytest.raises(ValueError, match="kept only best.pt .* cannot be continued"):
        train(config.with_(resume=True, epochs=2))
    with pytest.raises(ValueError, match="already holds a run"):
        train(config)


def test_reproduce_writes_its_results_under_out_unless_told(monkeypatch, tmp_path, drosophila_root):
    from frem.seg import reproduce
    seen = {}
    monkeypatch.setattr(reproduce, "reproduce", lambda base, **kwargs: seen.update(kwargs) or
                        {"verdict": "", "beside_paper": ""})
    out = tmp_path / "repro"
    assert main(["reproduce", "--quick", "--out", str(out), "--data", str(drosophila_root)]) == 0
    assert seen["results_dir"] == f"{out}/results" and seen["progress"] is True
    assert main(["reproduce", "--quick", "--out", str(out), "--results", str(tmp_path / "r"),
                 "--data", str(drosophila_root), "--no-progress"]) == 0
    assert seen["results_dir"] == str(tmp_path / "r") and seen["progress"] is False


def scene(size=128, seed=0) -> np.ndarray:
    """An 8-bit greyscale scene with structure a model can respond to."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    image = 100 + 60 * np.sin(x / 7.0) * np.cos(y / 11.0) + rng.normal(0, 10, (size, size))
    return image.clip(0, 255).astype(np.uint8)[..., None]


def test_the_same_scene_at_another_bit_depth_gives_the_same_labels(trained_run):
    state = checkpoint.load(trained_run / "best.pt")
    assert state["normalization"] == {"mode": "image"}
    model = model_from_checkpoint(state)
    eight = scene()
    versions = {"8-bit": eight,
                "16-bit": eight.astype(np.uint16) * 257,            # the full 16-bit range
                "12-bit in 16": eight.astype(np.uint16) * 16 + 3,   # a camera's 12 bits, offset
                "float32": eight.astype(np.float32) / 255.0}
    labels = {name: predict_image(model, image, state["normalization"], "cpu") for name, image in versions.items()}
    assert len(np.unique(labels["8-bit"])) > 1, "a constant prediction would prove nothing"
    for name, predicted in labels.items():
        assert np.array_equal(predicted, labels["8-bit"]), name


def test_dataset_normalisation_is_there_for_calibrated_units(tiny_config):
    from frem.seg.train import train
    config = tiny_config(normalize="dataset")
    train(config)
    state = checkpoint.load(Path(config.out) / "best.pt")
    assert state["normalization"]["mode"] == "dataset" and state["normalization"]["units"] == "raw"
    assert 50 < state["normalization"]["mean"] < 200  # 8-bit intensities, not /255
    assert state["config"]["normalize"] == "dataset"


def test_label_pngs_show_the_class_colours_and_keep_the_indices(trained_run, drosophila_root, tmp_path):
    image = drosophila_root / "stack2" / "raw" / "00.tif"
    crop = tmp_path / "crop.tif"
    tifffile.imwrite(crop, tifffile.imread(image)[:128, :128])
    predict(trained_run / "best.pt", [crop], tmp_path / "pred")
    labels = Image.open(tmp_path / "pred" / "crop_labels.png")
    assert labels.mode == "P"  # a viewer shows colours, not black
    palette = labels.getpalette()[:12]
    assert palette[:3] != palette[3:6] and palette[9:12] == [30, 30, 30]  # background stays dark
    assert set(np.unique(np.array(labels))) <= {0, 1, 2, 3}


def test_frem_lightning_works_after_import_frem_and_names_its_extra_when_missing():
    assert frem.integrations.lightning.FREMResample().__class__.__name__ == "FREMResample"
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None\n"
            "import frem\n"
            "try:\n    frem.integrations.lightning\nexcept ModuleNotFoundError as e:\n"
            "    print(repr(str(e)), e.__cause__ is None and e.__suppress_context__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == (f"'frem.integrations.lightning needs Lightning: pip install -e \"{ROOT}[lightning]\" "
                                   "(or pip install lightning)' True"), done.stderr


def test_import_frem_costs_little_more_than_torch():
    """Triton, Inductor and Dynamo load when a kernel is first launched or compiled, not at import;
    ``import frem`` alone loads nothing (its names load when first used, PEP 562).

    Bound: the library's own share (the self time of every frem module the public names load)
    under 0.5 s; measured 0.03-0.06 s on the 2-core development machine, where torch took 2.2-4.4 s."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c",
                           "import sys, frem; assert 'torch' not in sys.modules\n"
                           "frem.attach, frem.FREM, frem.scale_channels, frem.candidates\n"
                           "print(sorted(m for m in ('triton', 'torch._dynamo', 'torch._inductor') if m in sys.modules))"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": ""})
    assert done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]
    own = {}
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s+(\S+)", line)
        if match and match.group(2).split(".")[0] == "frem":
            own[match.group(2)] = int(match.group(1))
    assert {"frem.module", "frem.bottleneck", "frem.kernels.scale_channels"} <= set(own), own
    assert sum(own.values()) < 500_000, f"the library costs {sum(own.values()) / 1e6:.2f} s beyond torch"


def test_the_command_answers_help_version_and_typos_without_importing_torch():
    """`frem --help` took seconds when it imported the whole stack first."""
    code = ("import sys\nfrom frem.seg.cli import main\n"
            "for argv in (['--help'], ['--version'], ['train', '--help'], ['train', '--quik'], ['tune', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print([m for m in ('torch', 'segmentation_models_pytorch', 'optuna') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-1000:] + done.stderr[-2000:]
    assert "frem 0.1.0" in done.stdout and "did you mean --quick?" in done.stderr


def test_the_readme_set_up_block_has_the_offline_form_and_the_cpu_wheel():
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Set-up"):readme.index("## FREM in your own training code")]
    assert '-e ".[seg]" && frem train --quick' in setup and '-e ".[seg]" && FREM_DATA=' in setup
    # a newcomer on a laptop meets the CPU build before the command that would fetch 4 GB of CUDA wheels
    assert setup.index("download.pytorch.org/whl/cpu") < setup.index('pip install -e ".[seg]"')
    assert "pip install frem" not in setup.replace("pip install frem[", "")  # not published yet
