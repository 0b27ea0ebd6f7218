"""FREM in the Hugging Face ``Trainer``: re-draw the channels at the start of every training epoch.

    import frem
    from frem.integrations.transformers import FREMCallback

    model = SegformerForSemanticSegmentation(config)            # or any model the Trainer trains
    frem.attach(model, "bottleneck", B=8, X=250, example_input={"pixel_values": batch})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[FREMCallback()])

The ``Trainer`` calls ``model.train()`` at every training step, so
``redraw="train"`` would re-draw every step there: use this callback. The
epoch is the ``Trainer``'s (``state.epoch``, whole epochs done), so a run
resumed from a checkpoint re-draws what an uninterrupted one would. At the end
of each epoch ``frem.status`` goes into the ``Trainer``'s log history (the
training calls of every FREM, whether its effect reached the outputs), and a
FREM that never ran while the model trained warns, as ``frem.resample`` does.
Needs ``transformers`` (``pip install transformers``).
"""

from __future__ import annotations

import math

from frem.extras import install_command

try:
    from transformers import TrainerCallback
except ImportError:
    raise ModuleNotFoundError("frem.integrations.transformers needs transformers: pip install transformers "
                              f"(or {install_command('hf')})") from None

import frem


def trainer_epoch(state) -> int:
    """Whole epochs the Trainer has done: ``state.epoch`` is fractional (epoch + steps / steps per epoch),
    and exactly the epoch's number at its start (a small tolerance for the float sum)."""
    return math.floor((state.epoch or 0.0) + 1e-6)


class FREMCallback(TrainerCallback):
    """Calls ``frem.resample(model, epoch)`` at every ``on_epoch_begin``; logs ``frem.status`` per epoch."""

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("the Trainer gave FREMCallback no model: pass model= to the Trainer")
        frem.resample(model, trainer_epoch(state))
        return control

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.is_world_process_zero:
            for row in frem.status(model):
                state.log_history.append({"epoch": state.epoch, "step": state.global_step,
                                          f"frem/{row.layer}/calls": row.calls,
                                          f"frem/{row.layer}/reaches": row.reaches})
        return control
