"""The GPU path on CPU: bf16 autocast (``trainer.precision=bf16-mixed``) and ``trainer.compile=true`` through the
whole digits pipeline, so that a dtype or compile bug shows here and not on a user's first GPU run."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch._dynamo.utils import counters

from conftest import run_in_process, train_digits_cnn
from ssat.attacks import PGDATLoss, TradesLoss
from ssat.lightning.ddpm import DDPMModule
from test_stage_graph import GENERATION

BF16 = ["trainer.precision=bf16-mixed"]
# Every kind of training step under autocast: PGD-AT in the intermediate model, TRADES with the EMA in SSAT, PGD in
# validation, a guided DDPM (pretraining and PCG fine-tuning), then sampling, embedding and the evaluation.
WHOLE = ["selector=pcg", *GENERATION, "intermediate.adversarial=true", "attack.steps=2", "ssat.ema.decay=0.9",
         "ssat.batches_per_epoch=2"]


def digits_model_and_batch() -> tuple[torch.nn.Module, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
    return train_digits_cnn(x[:1000], torch.tensor(digits.target[:1000])), x[1000:1256]


def test_trades_attack_under_bf16_autocast_is_as_strong_as_in_fp32():
    """The attack's KL starts near 0 (x_adv = x + 0.001 noise): in bf16 log-probabilities its gradient was rounding
    noise and TRADES-10 reached 0.41x the fp32 KL. The log-softmaxes run in fp32 whatever the autocast."""
    model, x = digits_model_and_batch()
    attack = TradesLoss(eps=0.1, alpha=0.02, steps=10)

    def kl_reached(x_adv: torch.Tensor) -> float:
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(model(x_adv), 1), F.log_softmax(model(x), 1), reduction="batchmean",
                                  log_target=True))

    torch.manual_seed(0)
    fp32 = kl_reached(attack.adversarial_examples(model, x))
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = attack.adversarial_examples(model, x)
        loss, _ = attack(model, x, torch.zeros(len(x), dtype=torch.long))
    assert x_adv.dtype == torch.float32 and loss.dtype == torch.float32
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
    assert kl_reached(x_adv) >= 0.8 * fp32 > 0


class AutocastSpy:
    """Wraps a training step's method and records the autocast dtype it ran under (None: no autocast)."""

    def __init__(self, monkeypatch, owner: type, method: str):
        self.seen: list[torch.dtype | None] = []
        wrapped = getattr(owner, method)

        def spy(*args, **kwargs):
            self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return wrapped(*args, **kwargs)

        monkeypatch.setattr(owner, method, spy)


def finite_losses(run_dir: Path, stage: str) -> list[float]:
    """Every training loss that the stage's CSV logger recorded."""
    (metrics,) = (run_dir / "logs" / stage).glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses), f"{stage}: {losses}"
    return losses


def check_results(results: dict) -> None:
    assert 0.0 <= results["robust_acc"] <= results["clean_acc"] <= 1.0
    assert results["sanity"]["checks"]["pgd_eps0_equals_clean"]["passed"]


@pytest.mark.slow
def test_bf16_mixed_runs_the_whole_pipeline_with_every_training_step_under_autocast(monkeypatch, tmp_path):
    spies = {name: AutocastSpy(monkeypatch, owner, "__call__" if owner is not DDPMModule else "training_step")
             for name, owner in (("pgd_at", PGDATLoss), ("trades", TradesLoss), ("ddpm", DDPMModule))}
    results = run_in_process(*BF16, *WHOLE, tmp_path=tmp_path)
    for name, spy in spies.items():
        assert spy.seen and set(spy.seen) == {torch.bfloat16}, f"{name} ran under {set(spy.seen)}"
    check_results(results)
    assert results["ssat_ema"] and results["guidance"]["name"] == "pcg"
    for stage in ("intermediate", "ssat", "ddpm_pretrain", "ddpm_finetune"):
        finite_losses(tmp_path / "run", stage)


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.slow
def test_compile_runs_the_pipeline_compiled_without_graph_breaks_or_reaching_the_recompile_limit(tmp_path):
    """trainer.compile with bf16 autocast (trainer=gpu's precision) through intermediate training, TRADES with the
    EMA, validation PGD and the evaluation: the model's forward compiles whole (no graph break), and the train,
    eval, attack and no-grad variants stay under Dynamo's recompile limit, past which it would fall back to eager
    without failing (a silent slowdown on a GPU). Dynamo's capture is the same for every backend; aot_eager traces
    the forward and backward graphs without inductor's code generation (C++ here, Triton on a GPU: a third of the
    time)."""
    torch._dynamo.reset()
    counters.clear()
    dynamo_log = Records()
    logging.getLogger("torch._dynamo").addHandler(dynamo_log)
    try:
        results = run_in_process(*BF16, "trainer.compile={backend: aot_eager}", "intermediate.epochs=1",
                                 "ssat.ema.decay=0.9", "ssat.batches_per_epoch=2", tmp_path=tmp_path)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(dynamo_log)
    assert counters["stats"]["unique_graphs"] >= 4  # train, no-grad, attack (frozen weights) and input-grad graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not [m for m in dynamo_log.messages if "recompile_limit" in m], dynamo_log.messages
    check_results(results)
    for stage in ("intermediate", "ssat"):
        finite_losses(tmp_path / "run", stage)
