"""Search FREM's B and X with TPE in your own training loop, on a study that survives a kill.

Your training function stays yours: ``frem.search.attach_trial`` puts FREM at
the bottleneck with the trial's B (of the layer's width) and X,
``frem.search.report`` hands each validation score to the pruner, and the
study lives in a SQLite file (``frem.search.create_study``), so running this
again continues the search with settings it has not tried, and so do several
copies run at once on the same file; a killed worker's trial is retried by
the next worker that starts a trial once its heartbeat is missed. Here the
data are synthetic discs in noise and the network a small U-Net, so it runs
on a CPU in a minute.

    python examples/search_own_loop.py --trials 8 --storage sqlite:///frem-search.db
"""

import argparse
import time

import optuna
import torch
from torch import nn

import frem
import frem.search


def block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class SmallUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1, self.enc2 = block(1, 8), nn.Sequential(nn.MaxPool2d(2), block(8, 16))
        self.deep = nn.Sequential(nn.MaxPool2d(2), block(16, 32))
        self.up2, self.dec2 = nn.ConvTranspose2d(32, 16, 2, stride=2), block(32, 16)
        self.up1, self.dec1 = nn.ConvTranspose2d(16, 8, 2, stride=2), block(16, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d = self.dec2(torch.cat([self.up2(self.deep(e2)), e2], 1))
        return self.head(self.dec1(torch.cat([self.up1(d), e1], 1)))


def discs(n, size=32, seed=0):
    """Images of a few bright discs in noise, and their masks."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for cy, cx, r in torch.randint(4, size - 4, (3, 3), generator=g).tolist():
            masks[i] |= ((yy - cy) ** 2 + (xx - cx) ** 2 <= (r % 5 + 2) ** 2).long()
    return masks[:, None].float() + 0.5 * torch.randn(n, 1, size, size, generator=g), masks


def iou(model, images, masks):
    model.eval()
    with torch.no_grad():
        predicted = model(images).argmax(1).bool()
    model.train()
    truth = masks.bool()
    return float((predicted & truth).sum() / (predicted | truth).sum().clamp(min=1))


def train_and_validate(trial, epochs, data):
    """A user's own training function: only the three frem lines are new."""
    (train_x, train_y), (val_x, val_y) = data
    torch.manual_seed(0)
    model = SmallUNet()
    frem.search.attach_trial(model, trial, "bottleneck", example_input=train_x[:1])  # B, X from the trial
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    score = 0.0
    for epoch in range(epochs):
        frem.resample(model, epoch)  # the paper's per-epoch re-draw
        for start in range(0, len(train_x), 8):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(train_x[start:start + 8]), train_y[start:start + 8])
            loss.backward()
            optimizer.step()
        score = iou(model, val_x, val_y)
        trial.set_user_attr("epochs_trained", epoch + 1)
        frem.search.report(trial, score, epoch)  # raises optuna.TrialPruned when the pruner stops it
    return score


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="trials this run adds to the study")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--storage", default="sqlite:///frem-search.db", help="any Optuna storage URL")
    parser.add_argument("--study", default="frem-own-loop")
    parser.add_argument("--heartbeat", type=int, default=frem.search.HEARTBEAT_S,
                        help="seconds between a running trial's heartbeats; twice that without one: dead")
    args = parser.parse_args()

    data = discs(32, seed=0), discs(16, seed=1)
    # resumable, parallel-safe: no setting twice, a dead worker's trial retried (frem.search's docstring)
    study = frem.search.create_study(args.storage, args.study, seed=0,
                                     pruner=frem.search.pruner("hyperband", args.epochs),
                                     heartbeat=args.heartbeat)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    before = len(study.trials)
    started = time.perf_counter()
    study.optimize(lambda trial: train_and_validate(trial, args.epochs, data), n_trials=args.trials)
    seconds = time.perf_counter() - started
    trials = study.trials[before:]
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    epochs = sum(t.user_attrs.get("epochs_trained", 0) for t in trials)
    print(f"{len(trials)} trials in {seconds:.1f} s ({seconds / max(epochs, 1):.2f} s an epoch), {pruned} pruned: "
          f"{epochs} of {len(trials) * args.epochs} epochs trained; the study now holds {len(study.trials)}")
    best = study.best_trial
    print(f"best: trial {best.number}, IoU {best.value:.3f}, {best.params}")
    model = SmallUNet()
    print(frem.attach(model, "bottleneck", **best.params, example_input=data[0][0][:1]))


if __name__ == "__main__":
    main()
