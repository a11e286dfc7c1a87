"""The EMA callback (update rule, validation with the average, checkpoint round trip), best-checkpoint choice
with EMA weights, and early stopping with the epoch to convergence recorded."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from ssat.attacks import CrossEntropyLoss
from ssat.data.sampler import SSATBatchSampler
from ssat.data.training_set import LabeledAndSelected, batch_as_is
from ssat.lightning import EMA, RobustClassifierModule
from ssat.models import SmallCNN
from ssat.models.base import Classifier
from ssat.stages.training import FitSettings, TrainingJob, eval_loader, fit

OPTIM = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "schedule": "constant"}
AUGMENT = {"crop_padding": 1, "hflip": False}
BATCH = 50


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = np.round(data.images / 16.0 * 255).astype(np.uint8)[:, None]
    return images[:200], data.target[:200], images[1500:1600], data.target[1500:1600]


def make_trainer(stage, out_dir, max_epochs, callbacks, batches_per_epoch):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=callbacks, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                     use_distributed_sampler=False, num_sanity_val_steps=0, default_root_dir=str(out_dir))


def small_cnn():
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, num_classes=10, mean=[0.3], std=[0.4], width=4)


def run_fit(model, digits, out_dir, epochs, ema=None, patience=None, optim=OPTIM):
    images, labels, val_images, val_labels = digits
    sampler = SSATBatchSampler(len(labels), 0, BATCH, 0.0, seed=0)
    job = TrainingJob("test", model, CrossEntropyLoss(), LabeledAndSelected(images, labels), sampler, val_images,
                      val_labels, out_dir, make_trainer)
    return fit(job, FitSettings(epochs, optim, AUGMENT, 100, ema=ema, patience=patience))


def test_ema_averages_parameters_and_copies_batch_norm_statistics():
    module = RobustClassifierModule(small_cnn(), CrossEntropyLoss(), OPTIM, 1)
    ema = EMA(decay=0.9, warmup=2)
    ema.on_train_start(None, module)
    params = {n for n, _ in module.named_parameters()}
    expected = {k: v.clone() for k, v in module.state_dict().items()}
    for t in range(4):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
            for name, buf in module.named_buffers():
                if buf.is_floating_point() and "running" in name:
                    buf.copy_(torch.rand_like(buf))
        ema.on_train_batch_end(None, module, None, None, t)
        decay = min(0.9, (1 + t) / (2 + t))
        for name, value in module.state_dict().items():
            expected[name] = decay * expected[name] + (1 - decay) * value if name in params else value.clone()
    assert ema.updates == 4
    for name, value in expected.items():
        torch.testing.assert_close(ema.ema[name], value, msg=name)
    assert not torch.equal(ema.ema["model.head.weight"], module.state_dict()["model.head.weight"])


def test_validation_runs_on_the_average_and_training_goes_on_with_the_live_weights():
    module = RobustClassifierModule(small_cnn(), CrossEntropyLoss(), OPTIM, 1)
    ema = EMA(decay=0.5)
    ema.on_train_start(None, module)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    ema.on_train_batch_end(None, module, None, None, 0)
    live = {k: v.clone() for k, v in module.state_dict().items()}
    ema.on_validation_start(None, module)
    for name, value in module.state_dict().items():
        assert torch.equal(value, ema.ema[name]), name
    ema.on_validation_end(None, module)
    for name, value in module.state_dict().items():
        assert torch.equal(value, live[name]), name


def test_ema_state_is_saved_in_the_checkpoint_and_restored_exactly(digits, tmp_path):
    info = run_fit(small_cnn(), digits, tmp_path, epochs=2, ema={"decay": 0.9, "warmup": 2})
    batches = len(SSATBatchSampler(200, 0, BATCH, 0.0))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = last["callbacks"]["EMA"]
    assert state["updates"] == 2 * batches and info["ema"]
    saved = EMA.weights_in(last)
    assert not torch.equal(saved["model.head.weight"], last["state_dict"]["model.head.weight"]), \
        "the checkpoint's state_dict holds the live weights, the callback the average"

    # model.pt is the average at the best epoch
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    model_pt = torch.load(tmp_path / "model.pt", weights_only=True)
    for name, value in model_pt.items():
        assert torch.equal(value, EMA.weights_in(best)[f"model.{name}"]), name

    # a fresh callback resumed from last.ckpt holds exactly the saved average and update count
    restored = EMA(decay=0.9, warmup=2)
    images, labels, val_images, val_labels = digits
    module = RobustClassifierModule(small_cnn(), CrossEntropyLoss(), OPTIM, 2, AUGMENT)
    loader = torch.utils.data.DataLoader(LabeledAndSelected(images, labels),
                                         batch_sampler=SSATBatchSampler(200, 0, BATCH, 0.0),
                                         collate_fn=batch_as_is)
    trainer = make_trainer("test", tmp_path, 2, [restored], batches)
    trainer.fit(module, loader, eval_loader(val_images, val_labels, 100),
                ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert restored.updates == state["updates"]
    assert restored.ema.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(restored.ema[name], value), name

    # and training on resumes the count where it stopped
    run_fit(small_cnn(), digits, tmp_path, epochs=3, ema={"decay": 0.9, "warmup": 2})
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["callbacks"]["EMA"]["updates"] == 3 * batches


class Linear(Classifier):
    """No batch norm: with a learning rate of 0 its validation accuracy cannot change between epochs."""

    def __init__(self):
        super().__init__([0.3], [0.4])
        self.feature_dim = 64
        self.flatten = nn.Flatten()
        self.head = nn.Linear(64, 10)

    def body(self, x):
        return self.flatten(x)


def test_early_stopping_stops_and_records_the_epoch_to_convergence(digits, tmp_path):
    torch.manual_seed(0)
    frozen = {**OPTIM, "lr": 0.0, "momentum": 0.0}
    info = run_fit(Linear(), digits, tmp_path, epochs=10, patience=2, optim=frozen)
    assert info["early_stopped"]
    assert info["best_epoch"] == 0 and info["epochs_to_convergence"] == 1
    assert info["epochs"] == 3, "epoch 0 is the best, epochs 1 and 2 did not improve: stop after 3"


def test_without_patience_every_epoch_runs(digits, tmp_path):
    frozen = {**OPTIM, "lr": 0.0, "momentum": 0.0}
    info = run_fit(Linear(), digits, tmp_path, epochs=3, optim=frozen)
    assert not info["early_stopped"] and info["epochs"] == 3
