"""FREM inside the real nnU-Net v2: plan and preprocess, nnUNetv2_train, nnUNetv2_predict, on the CPU.

A tiny 2-D data set in nnU-Net's raw format is cut from the Drosophila
sections; the trainer is examples/nnunet_trainer.py, installed the way its
docstring says (a folder of its own under ``nnUNet_extTrainer``), with a
subclass that trains 2 epochs of 3 iterations and records what FREM did.
Needs the ``nnunet`` extra (``pip install -e ".[nnunet]"``); CI installs it, and
fails rather than skips without it. Run against nnunetv2 2.8.1 (CI) and, by
hand, 2.7.0 (an nnU-Net without nnUNet_extTrainer: the trainer then goes into
nnU-Net's own variants folder, as the example's docstring says, and is removed
afterwards).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import frem
import frem.search

if os.environ.get("CI"):
    import nnunetv2  # noqa: F401  (CI must run this test, not skip it)
else:
    pytest.importorskip("nnunetv2", reason='needs the nnunet extra: pip install -e ".[nnunet]"')

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DATASET = "Dataset123_FREMDrosophila"
CROP = 128

TEST_TRAINER = '''

class nnUNetTrainerFREMTest(nnUNetTrainerFREM):
    """Two epochs of three iterations, recording the drawn channels and what FREM did to the features."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)  # nnU-Net reads these names back
        self.num_epochs = 2
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1
        self.frem_record = {"epochs": [], "ratios": []}

    def on_train_start(self):
        super().on_train_start()
        handle = frem.attached(self.network)[0]
        stage = handle._target_ref()
        seen = {}
        stage.register_forward_hook(lambda m, i, o: seen.__setitem__("raw", o.detach().float()), prepend=True)

        def after(_module, _inputs, output):
            raw, enhanced = seen.pop("raw"), output.detach().float()
            per_channel = enhanced.abs().sum((0, 2, 3)) / raw.abs().sum((0, 2, 3)).clamp_min(1e-12)
            chosen = torch.zeros(per_channel.numel(), dtype=torch.bool)
            chosen[handle.channels.cpu()] = True
            self.frem_record["ratios"].append([handle.training, float(per_channel[chosen].median()),
                                              float(per_channel[~chosen].median())])
        stage.register_forward_hook(after)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        handle = frem.attached(self.network)[0]
        self.frem_record["epochs"].append([self.current_epoch, handle.epoch, handle.channels.tolist()])

    def on_train_end(self):
        with open(self.output_folder + "/frem_record.json", "w") as f:
            json.dump(self.frem_record, f)
        super().on_train_end()


from frem.integrations.nnunet import FREMMixin
from nnunetv2.training.nnUNetTrainer.variants.loss.nnUNetTrainerCELoss import nnUNetTrainerCELoss


class nnUNetTrainerCELossFREMTest(FREMMixin, nnUNetTrainerCELoss):
    """Another variant (cross-entropy only) with FREM added by the mixin, settings of its own, a second site,
    FREM off in the first of two short epochs."""
    frem_B, frem_X, frem_seed = 4, 250.0, 7
    frem_also = ({"layer": "encoder.stages.4", "B": 2, "X": 5.0, "seed": 1},)  # the plans' 6 stages: the next to last
    frem_off_epochs = (0,)

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def on_train_end(self):
        handle = frem.attached(self.network)[0]
        with open(self.output_folder + "/frem_record.json", "w") as f:
            json.dump({"losses": [type(m).__name__ for m in self.loss.modules()], "epoch": handle.epoch,
                       "channels": handle.channels.tolist(), "X": handle.X}, f)
        super().on_train_end()
'''


def write_dataset(raw: Path, drosophila_root: Path) -> Path:
    """Six 128 px training cases and one test case in nnU-Net's 2-D PNG layout (label 0 = background)."""
    from frem.seg.data.drosophila import load_section, checksums
    folder = raw / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    sums = checksums(drosophila_root)  # the test excerpt's own list
    for case, section in enumerate((0, 1, 2, 12, 13, 16)):  # sections the test excerpt holds (15 is the test case)
        _, image, classes = load_section(drosophila_root, section, sums)
        top = 16 * case  # the excerpt's sections are 256 px
        Image.fromarray(image[top:top + CROP, top:top + CROP, 0]).save(folder / "imagesTr" / f"case{case:03d}_0000.png")
        # frem's classes: membrane 0, mitochondria 1, synapse 2, background 3 -> nnU-Net: background 0
        labels = ((classes.astype(np.int64) + 1) % 4).astype(np.uint8)
        Image.fromarray(labels[top:top + CROP, top:top + CROP]).save(folder / "labelsTr" / f"case{case:03d}.png")
    _, image, _ = load_section(drosophila_root, 15, sums)
    Image.fromarray(image[:CROP, :CROP, 0]).save(folder / "imagesTs" / "test000_0000.png")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "EM"}, "labels": {"background": 0, "membrane": 1, "mitochondria": 2, "synapse": 3},
        "numTraining": 6, "file_ending": ".png"}))
    return folder


def nnunet(command: str, *args, env) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).parent / command
    done = subprocess.run([str(executable), *args], capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_nnunet_trains_with_frem_redrawn_each_epoch_and_predicts_like_the_bare_network(drosophila_root, tmp_path,
                                                                                       monkeypatch, request):
    raw, preprocessed, results, ext = (tmp_path / name for name in ("raw", "preprocessed", "results", "trainers"))
    write_dataset(raw, drosophila_root)
    trainer = (ROOT / "examples" / "nnunet_trainer.py").read_text() + "\n\nimport json\n\nimport torch\n" + TEST_TRAINER
    import nnunetv2
    import nnunetv2.paths
    if hasattr(nnunetv2.paths, "nnUNet_extTrainer"):
        # nnU-Net >= 2.8, as the example's docstring says: a folder of its own under nnUNet_extTrainer
        ext.mkdir()
        (ext / "nnunet_trainer_frem.py").write_text(trainer)
    else:  # older nnU-Net: its own variants folder, removed again after the test
        ext = Path(nnunetv2.__file__).parent / "training" / "nnUNetTrainer" / "variants" / "frem_test"
        ext.mkdir()
        (ext / "__init__.py").write_text("")
        (ext / "nnunet_trainer_frem.py").write_text(trainer)
        request.addfinalizer(lambda: shutil.rmtree(ext, ignore_errors=True))
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed),
           "nnUNet_results": str(results), "nnUNet_extTrainer": str(ext), "nnUNet_n_proc_DA": "0",
           "nnUNet_compile": "false", "OMP_NUM_THREADS": "2"}
    # planning sets torch's thread count from nnUNet_n_proc_DA, training runs augmentation in-process with 0
    nnunet("nnUNetv2_plan_and_preprocess", "-d", "123", "-c", "2d", "-np", "1", "--verify_dataset_integrity",
           env={**env, "nnUNet_n_proc_DA": "1"})
    nnunet("nnUNetv2_train", "123", "2d", "0", "-tr", "nnUNetTrainerFREMTest", "-device", "cpu", env=env)

    model_folder = results / DATASET / "nnUNetTrainerFREMTest__nnUNetPlans__2d"
    record = json.loads((model_folder / "fold_0" / "frem_record.json").read_text())
    plans = json.loads((preprocessed / DATASET / "nnUNetPlans.json").read_text())
    stages = len(plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"])
    width, second = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"][:-3:-1]
    B = round(162 / 512 * width)
    # re-drawn each epoch, to frem's pure function of (seed, epoch)
    assert [e[:2] for e in record["epochs"]] == [[0, 0], [1, 1]]
    for _, epoch, channels in record["epochs"]:
        assert channels == frem.select_channels(width, B, 0, epoch).tolist()
    assert record["epochs"][0][2] != record["epochs"][1][2]
    training = [r for r in record["ratios"] if r[0]]
    evaluation = [r for r in record["ratios"] if not r[0]]
    assert len(training) == 6 and evaluation  # 2 epochs x 3 iterations; nnU-Net's validation in eval mode
    for _, enhanced, other in training:
        assert enhanced == pytest.approx(632.0, rel=1e-3) and other == pytest.approx(1.0)
    for _, enhanced, other in evaluation:
        assert enhanced == other == 1.0

    # The checkpoint holds no FREM state: it loads into nnU-Net's plain network, which gives the same logits.
    checkpoint = torch.load(model_folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert not [k for k in checkpoint["network_weights"] if "frem" in k]
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(name, env[name])  # nnU-Net reads them when asked, here in this process
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, verbose=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    assert frem.attached(predictor.network)[0].layer == f"encoder.stages.{stages - 1}"
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    bare = nnUNetTrainer.build_network_architecture(
        predictor.plans_manager, predictor.configuration_manager, 1, 4, enable_deep_supervision=False)
    bare.load_state_dict(checkpoint["network_weights"])
    x = torch.randn(1, 1, CROP, CROP)
    with torch.no_grad():
        predictor.network.load_state_dict(checkpoint["network_weights"])
        assert torch.equal(predictor.network.eval()(x), bare.eval()(x))

    nnunet("nnUNetv2_predict", "-i", str(raw / DATASET / "imagesTs"), "-o", str(tmp_path / "predicted"), "-d", "123",
           "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerFREMTest", "-chk", "checkpoint_final.pth", "-device", "cpu",
           env=env)
    predicted = np.array(Image.open(tmp_path / "predicted" / "test000.png"))
    assert predicted.shape == (CROP, CROP) and set(np.unique(predicted)) <= {0, 1, 2, 3}

    # The mixin on another nnU-Net variant: that variant's loss, FREM with the class's settings, its status logged.
    nnunet("nnUNetv2_train", "123", "2d", "0", "-tr", "nnUNetTrainerCELossFREMTest", "-device", "cpu", env=env)
    fold = results / DATASET / "nnUNetTrainerCELossFREMTest__nnUNetPlans__2d" / "fold_0"
    record = json.loads((fold / "frem_record.json").read_text())
    assert "RobustCrossEntropyLoss" in record["losses"] and "MemoryEfficientSoftDiceLoss" not in record["losses"]
    assert (record["epoch"], record["X"]) == (1, 250.0)
    assert record["channels"] == frem.select_channels(width, 4, 7, 1).tolist()
    (log,) = fold.glob("training_log_*.txt")
    logged = [line.split(": ", 1)[1].strip() for line in log.read_text().splitlines()
              if "FREM at" in line or "FREM premise" in line]
    assert logged[0] == f"FREM premise: Premise(bottleneck='encoder.stages.{stages - 1} output', " \
        f"skip='encoder output[{stages - 2}]', deep='encoder.stages.{stages - 1}', shallow='encoder.stages.0')"
    assert logged[1::3] == [f"FREM at encoder.stages.{stages - 1}: B=4 of {width}, X=250, epoch {e}'s draw, "
                            f"{calls} training calls, 0 capped" for e, calls in ((0, 0), (1, 2))]  # epoch 0: off
    assert logged[2::3] == [f"FREM at encoder.stages.{stages - 2}: B=2 of {second}, X=5, epoch {e}'s draw, "
                            f"{calls} training calls, 0 capped" for e, calls in ((0, 0), (1, 2))]
    assert len(logged) == 7 and [line.split(": bottleneck ")[0] for line in logged[3::3]] == [
        "FREM premise (FREM off this epoch)", "FREM premise (FREM on this epoch)"]
    premise = json.loads((fold / "frem_premise.json").read_text())  # the paper's Fig. 2 for nnU-Net's network
    assert [(row["epoch"], row["frem"]) for row in premise] == [(0, "off"), (1, "on")]
    assert all(0 < row["grad_deep"] and 0 < row["bottleneck"] and 0 < row["skip"] for row in premise)
    assert (fold / "frem_premise.png").stat().st_size > 10_000

    # A TPE search whose trials are nnUNetv2_train runs: each trial's B and X reach the network through the
    # environment, and its score is nnU-Net's own validation Dice.
    import optuna

    from frem.search import suggest

    def objective(trial):
        setting = suggest(trial, width)
        out = tmp_path / f"trial{trial.number}"
        nnunet("nnUNetv2_train", "123", "2d", "0", "-tr", "nnUNetTrainerCELossFREMTest", "-device", "cpu",
               env={**env, "nnUNet_results": str(out), "FREM_B": str(setting["B"]), "FREM_X": repr(setting["X"])})
        folder = out / DATASET / "nnUNetTrainerCELossFREMTest__nnUNetPlans__2d" / "fold_0"
        trained = json.loads((folder / "frem_record.json").read_text())
        assert trained["X"] == setting["X"] and len(trained["channels"]) == setting["B"]
        return json.loads((folder / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"]

    study = frem.search.create_study(f"sqlite:///{tmp_path / 'study.db'}", "nnunet", seed=0)
    study.optimize(objective, n_trials=2)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(1 <= t.params["B"] <= width and 0 <= t.value <= 1 for t in study.trials)
    # a bad setting in the environment: one line from nnUNetv2_train, naming the variable, nothing trained
    for variable, value in (("FREM_B", "abc"), ("FREM_X", "-1"), ("FREM_X", "nan"), ("FREM_SEED", "1.5")):
        out = tmp_path / "bad"
        done = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_train"), "123", "2d", "0", "-tr", "nnUNetTrainerCELossFREMTest",
                               "-device", "cpu"], env={**env, "nnUNet_results": str(out), variable: value},
                              capture_output=True, text=True, timeout=600)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 1 and lines[-1].startswith(f"nnUNetv2_train: {variable}={value!r} in the "
                                                             "environment is not"), done.stderr[-2000:]
        assert "Traceback" not in done.stderr and not list(out.rglob("checkpoint_*.pth"))
    shutil.rmtree(preprocessed)  # the largest part; the rest goes with tmp_path
