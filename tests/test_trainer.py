"""The trainer group's factory: atomic checkpoints and the speed options (channels_last, torch.compile)."""

from __future__ import annotations

import errno
import os
import resource

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ssat.attacks import TradesLoss
from ssat.lightning import RobustClassifierModule
from ssat.lightning.trainer import Accelerate, AtomicCheckpointIO, build_trainer
from ssat.models import SmallCNN


def tiny_fit(tmp_path, **options) -> tuple[L.Trainer, RobustClassifierModule]:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.randint(0, 10, (64,))), batch_size=32)
    module = RobustClassifierModule(SmallCNN(1, 10, [0.3], [0.4], width=8), TradesLoss(eps=0.1, alpha=0.05, steps=2),
                                    {"lr": 0.01}, epochs=1)
    trainer = build_trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=str(tmp_path), inference_mode=False,
                            **options)
    trainer.fit(module, loader)
    return trainer, module


def test_compile_keeps_the_state_dict_keys_and_trains(tmp_path):
    """torch.compile (the eager backend here: Dynamo's tracing without a C++ toolchain) in place: the training
    step, attack included, runs compiled and the checkpoint has the plain model's keys."""
    trainer, module = tiny_fit(tmp_path, compile={"backend": "eager"}, channels_last=True)
    assert any(isinstance(c, Accelerate) for c in trainer.callbacks)
    assert module.model._compiled_call_impl is not None
    assert trainer.global_step == 2
    keys = set(module.state_dict())
    assert keys and not any("_orig_mod" in k for k in keys)
    assert next(module.parameters()).is_contiguous()  # channels_last is applied on CUDA only


def test_checkpoints_are_written_whole_or_not_at_all(tmp_path):
    trainer, _ = tiny_fit(tmp_path)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    path = tmp_path / "ckpt" / "last.ckpt"
    trainer.save_checkpoint(path)
    first = torch.load(path, weights_only=False)["global_step"]
    assert first == 2 and os.listdir(path.parent) == ["last.ckpt"]

    # A full disk mid-write, made real with a file-size limit (what `ulimit -f` sets; Python ignores SIGXFSZ).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size // 2, hard))
    try:
        with pytest.raises(OSError) as info:
            trainer.save_checkpoint(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.errno == errno.EFBIG
    assert torch.load(path, weights_only=False)["global_step"] == first  # the previous checkpoint is whole
    assert os.listdir(path.parent) == ["last.ckpt"]  # and no temporary file is left
