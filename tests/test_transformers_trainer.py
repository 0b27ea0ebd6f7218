"""FREM in the Hugging Face Trainer: FREMCallback re-draws every epoch of a real Trainer.train on a
transformers SegFormer built from its config (random init), with FREM verified to reach the loss."""

import os

import pytest
import torch

import frem
from frem.reach import EffectDoesNotReach

if os.environ.get("CI"):
    import accelerate  # noqa: F401  (CI installs the hf extra: run, never skip)
    import transformers
else:
    pytest.importorskip("accelerate", reason='needs the hf extra: pip install -e ".[hf]"')
    transformers = pytest.importorskip("transformers", reason='needs the hf extra: pip install -e ".[hf]"')
from frem.integrations.transformers import FREMCallback, trainer_epoch  # noqa: E402


def tiny_segformer():
    config = transformers.SegformerConfig(num_labels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                          num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=32)
    return transformers.SegformerForSemanticSegmentation(config)


class Tiles(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"pixel_values": torch.randn(3, 64, 64, generator=g), "labels": torch.randint(0, 3, (64, 64), generator=g)}


def test_trainer_redraws_each_epoch_and_logs_status(tmp_path):
    torch.manual_seed(0)
    model = tiny_segformer()
    handle = frem.attach(model, "bottleneck", B=4, X=50.0, example_input={"pixel_values": torch.randn(2, 3, 64, 64)})
    # the SegFormer trap: its last hidden state is returned twice; frem picks the stage's own output
    assert handle.layer == "segformer.stages.3" and frem.status(model)[0].reaches == "yes"
    drawn = []

    class Spy(transformers.TrainerCallback):  # after FREMCallback: sees each epoch's draw
        def on_epoch_begin(self, args, state, control, **kwargs):
            drawn.append((handle.epoch, handle.channels.tolist()))

    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=4,
                                          report_to=[], save_strategy="no", logging_strategy="epoch", use_cpu=True,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tiles(), callbacks=[FREMCallback(), Spy()])
    trainer.train()
    assert drawn == [(e, frem.select_channels(32, 4, 0, e).tolist()) for e in range(3)]
    logged = [row for row in trainer.state.log_history if "frem/segformer.stages.3/calls" in row]
    assert [row["frem/segformer.stages.3/calls"] for row in logged] == [2, 2, 2]
    assert {row["frem/segformer.stages.3/reaches"] for row in logged} == {"yes"}


def test_the_trainers_fractional_epoch_is_read_as_whole_epochs_done():
    state = transformers.TrainerState()
    for value, whole in ((None, 0), (0.0, 0), (0.9999999999, 1), (1.0, 1), (2.5, 2)):
        state.epoch = value
        assert trainer_epoch(state) == whole


def test_the_returned_hidden_state_trap_is_refused_not_trained():
    """FREM on SegFormer's returned last_hidden_state changes nothing its decode head reads."""
    model = tiny_segformer()
    with pytest.raises(EffectDoesNotReach, match=r"segformer output\['last_hidden_state'\] would run"):
        frem.attach(model, "segformer", entry="last_hidden_state", B=4, X=50.0,
                    example_input={"pixel_values": torch.randn(2, 3, 64, 64)})
