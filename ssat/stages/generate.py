"""Generation stages (PCG, LCG-KM, LCG-GMM): pretrain or load a DDPM, fine-tune it with guidance, sample a pool.

    ddpm_pretrain (only without a pretrained DDPM) -> ddpm_finetune -> sample (+ plain samples)

Each function writes into the ``out_dir`` it is given (the cache's work folder) and returns a small info dict.
Training stages keep checkpoints/last.ckpt and resume from it, as the classifier stages do; sampling resumes
from its progress.json.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ssat import distributed
from ssat.artifacts import GeneratedImages
from ssat.attacks import eval_mode
from ssat.config import build
from ssat.data.pools import MemmapImages
from ssat.data.splits import SemiSupervisedData
from ssat.errors import ConfigError, DataError
from ssat.generation.guidance import GuidanceLoss
from ssat.generation.sampling import generate_pool
from ssat.generation.unet import build_unet, check_lambda, check_pretrained, load_ddpm, new_scheduler, save_ddpm
from ssat.lightning.ddpm import DDPMModule, to_unit_range
from ssat.lightning.seeding import EpochSeed, loader_generator
from ssat.pipeline.runner import StageContext
from ssat.pipeline.stage import Stage
from ssat.stages.embed import selection_model
from ssat.stages.model_file import file_stage
from ssat.stages.training import TrainerFactory

PROBE_SIZE = 64


def generated_pool_sizes(num_images: int | None, plain_fraction: float, budget: float | None = None,
                         budget_of: int | None = None) -> tuple[int, int]:
    """(guided, plain) image counts: num_images, or round(budget * budget_of) when budget_of is set."""
    if budget_of is not None:
        if budget is None or not 0 < budget <= 1 or budget_of < 1:
            raise ConfigError(f"generation.budget_of={budget_of} needs a budget in (0, 1] and a positive size, "
                              f"got budget={budget}")
        num_images = round(budget * budget_of)
    if num_images is None or num_images < 1:
        raise ConfigError(f"generation.num_images={num_images} must be a positive number of images")
    if not 0 <= plain_fraction <= 1:
        raise ConfigError(f"generation.plain_fraction={plain_fraction} is outside [0, 1]")
    plain = round(plain_fraction * num_images)
    return num_images - plain, plain


def training_loader(images: np.ndarray, batch_size: int, seed: int) -> DataLoader:
    """Shuffled batches of the images, the order a function of (seed, epoch) alone (Lightning sets the epoch), so
    that a resumed run sees the same order; under DDP each rank gets its own share."""
    if len(images) == 0:
        raise DataError("DDPM training needs labeled images, and the labeled set is empty")
    dataset = TensorDataset(torch.from_numpy(np.ascontiguousarray(images)))
    sampler = DistributedSampler(dataset, distributed.world_size(), distributed.rank(), shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=loader_generator())


def _fit(module: DDPMModule, loader: DataLoader, out_dir: Path, make_trainer: TrainerFactory, stage: str,
         epochs: int, seed: int) -> L.Trainer:
    """Train with checkpoints/last.ckpt (written at the end of every epoch), resuming from it when an earlier
    attempt left one; EpochSeed makes the timesteps and noise of an epoch, and so the resumed weights, exact."""
    if epochs < 1:
        raise ConfigError(f"generation.{stage.removeprefix('ddpm_')}.epochs={epochs} must be at least 1")
    ckpt_dir = out_dir / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="last", enable_version_counter=False)
    trainer = make_trainer(stage, out_dir, epochs, [EpochSeed(seed), checkpoint], len(loader))
    last = ckpt_dir / "last.ckpt"
    trainer.fit(module, loader, ckpt_path=last if last.exists() else None)
    return trainer


def ddpm_pretrain(images: np.ndarray, out_dir: Path, make_trainer: TrainerFactory,
                  unet_config: dict[str, Any] | None, epochs: int, batch_size: int, lr: float,
                  seed: int) -> dict[str, Any]:
    """A small UNet trained from scratch on uint8 (N, C, H, W) images (plain DDPM loss), saved to out_dir/unet."""
    L.seed_everything(seed, verbose=False)
    _, channels, height, width = images.shape
    if height != width:
        raise DataError(f"the DDPM needs square images, the labeled images are {height}x{width}")
    unet = build_unet(height, channels, unet_config)
    module = DDPMModule(unet, new_scheduler(), lr=lr)
    loader = training_loader(images, batch_size, seed)
    trainer = _fit(module, loader, Path(out_dir), make_trainer, "ddpm_pretrain", epochs, seed)
    if trainer.is_global_zero:
        save_ddpm(module.unet, module.noise_scheduler, GeneratedImages.unet_dir(out_dir))
    return {"epochs": int(trainer.current_epoch), "steps": int(trainer.global_step),
            "parameters": sum(p.numel() for p in unet.parameters()), "num_images": len(images)}


@torch.no_grad()
def logits_bank(classifier: nn.Module, images: np.ndarray, bank_size: int, seed: int,
                device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """Classifier logits (in eval mode) of a random subset of ``bank_size`` images (all if there are fewer)."""
    if bank_size < 1:
        raise ConfigError(f"generation.finetune.bank_size={bank_size} must be at least 1")
    n = min(bank_size, len(images))
    rows = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    classifier = classifier.to(device)
    out = []
    with eval_mode(classifier):
        for start in range(0, n, batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[rows[start:start + batch_size]])).to(device)
            out.append(classifier(x.float().div_(255.0)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def _probe(module: DDPMModule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
           device: torch.device | str) -> dict[str, float]:
    """Both losses on one fixed noised batch: a cheap before/after measure of what fine-tuning changed."""
    module = module.to(device)
    with eval_mode(module.unet):
        parts = module.losses(x0.to(device), t.to(device), eps.to(device))
    return {k: float(v) for k, v in parts.items()}


def ddpm_finetune(data: SemiSupervisedData, classifier: nn.Module, unet_dir_or_id: str, out_dir: Path,
                  make_trainer: TrainerFactory, guidance: GuidanceLoss, lam: float, epochs: int, batch_size: int,
                  lr: float, bank_size: int, seed: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Fits ``guidance`` on a logits bank of labeled images, fine-tunes the DDPM with L_ddpm + lam * L_reg on the
    labeled images and saves it to out_dir/unet. ``classifier`` is frozen in place (eval, no parameter grads)."""
    check_lambda(lam)
    L.seed_everything(seed, verbose=False)
    _, channels, height, _ = data.labeled_images.shape
    unet, scheduler = load_ddpm(unet_dir_or_id, height, channels)
    bank = logits_bank(classifier, data.labeled_images, bank_size, seed, device)
    guidance.fit(bank, bank.argmax(1))
    module = DDPMModule(unet, scheduler, classifier, guidance, lam, lr)
    # The probe: the first labeled images at timesteps spread evenly over the schedule, with fixed noise.
    probe_x0 = to_unit_range(torch.from_numpy(np.ascontiguousarray(data.labeled_images[:PROBE_SIZE])))
    probe_t = torch.linspace(0, len(module.alphas_cumprod) - 1, len(probe_x0)).long()
    probe_eps = torch.randn(probe_x0.shape, generator=torch.Generator().manual_seed(seed))
    before = _probe(module, probe_x0, probe_t, probe_eps, device)
    trainer = _fit(module, training_loader(data.labeled_images, batch_size, seed), Path(out_dir), make_trainer,
                   "ddpm_finetune", epochs, seed)
    after = _probe(module, probe_x0, probe_t, probe_eps, device)
    if trainer.is_global_zero:
        save_ddpm(module.unet, module.noise_scheduler, GeneratedImages.unet_dir(out_dir))
    return {"guidance": guidance.name, "lam": float(lam), "bank_size": len(bank), "epochs": int(trainer.current_epoch),
            "steps": int(trainer.global_step), **{f"probe_{k}_before": v for k, v in before.items()},
            **{f"probe_{k}_after": v for k, v in after.items()}}


def sample(unet_dir_or_id: str, out_dir: Path, n: int, batch_size: int, seed: int, scheduler: str = "ddpm",
           num_inference_steps: int | None = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """n images from a saved (or hub) DDPM into out_dir/images.npy; resumes an interrupted run."""
    unet, noise_scheduler = load_ddpm(unet_dir_or_id)
    return generate_pool(unet, noise_scheduler.config, Path(out_dir), n, batch_size, seed, scheduler,
                         num_inference_steps, device)


# What an unconditional DDPM trained from scratch may learn from: labels are not needed, so the pool may join.
PRETRAIN_IMAGES = {
    "labeled": lambda data: data.labeled_images,
    "labeled_and_pool": lambda data: np.concatenate([data.labeled_images, np.asarray(data.pool_images)]),
}


def check_generation(cfg, data: SemiSupervisedData) -> None:
    """The generation settings and the DDPM source, checked before the intermediate model trains."""
    gen = cfg.generation
    if gen.pretrained is None and gen.pretrain.images not in PRETRAIN_IMAGES:
        raise ConfigError(f"generation.pretrain.images={gen.pretrain.images!r} is not one of "
                          f"{', '.join(PRETRAIN_IMAGES)}")
    check_lambda(gen.lam)
    generated_pool_sizes(gen.num_images, gen.plain_fraction, cfg.budget, gen.budget_of)
    _, channels, size, _ = data.labeled_images.shape
    if gen.pretrained is not None:
        check_pretrained(gen.pretrained, size, channels)


def _pretrain(ctx: StageContext, out: Path) -> dict[str, Any]:
    gen = ctx.cfg.generation
    images = PRETRAIN_IMAGES[gen.pretrain.images](ctx.value("data"))
    return ddpm_pretrain(images, out, ctx.trainer_factory(), OmegaConf.to_container(gen.unet), gen.pretrain.epochs,
                         gen.pretrain.batch_size, gen.pretrain.lr, gen.pretrain.seed)


DDPM_PRETRAIN = Stage(
    "ddpm_pretrain", _pretrain, needs=("data",), reads=("generation.unet", "generation.pretrain", "trainer"),
    every_rank=True, code=("ssat.lightning",), describe=lambda ctx: f"a small UNet from scratch on {ctx.cfg.generation.pretrain.images} "
                                          f"images, {ctx.cfg.generation.pretrain.epochs} epochs")


def _source(ctx: StageContext, out: Path | None):
    """The DDPM to fine-tune and to draw plain samples from: the pretrained one's folder, or a hub id / local dir."""
    if "ddpm_pretrain" in ctx.inputs:
        return str(GeneratedImages.unet_dir(ctx.path("ddpm_pretrain"))), None
    return ctx.cfg.generation.pretrained, None


DDPM_SOURCE = Stage("ddpm_source", _source, reads=("generation.pretrained",), cached=False)


# generation.classifier=<file>: the guidance classifier is that file's model (built from `model`), not the
# intermediate one (the release's older scripts guided with a robust SSAT model).
CLASSIFIER = file_stage("guidance_classifier", "generation.classifier")


def _finetune(ctx: StageContext, out: Path) -> dict[str, Any]:
    cfg, gen = ctx.cfg, ctx.cfg.generation
    classifier = ctx.value(CLASSIFIER.name).model if CLASSIFIER.name in ctx.inputs else selection_model(ctx)
    return ddpm_finetune(ctx.value("data"), classifier, ctx.value("ddpm_source"), out, ctx.trainer_factory(),
                         build(cfg.selector).guidance, gen.lam, gen.finetune.epochs, gen.finetune.batch_size,
                         gen.finetune.lr, gen.finetune.bank_size, cfg.seed, ctx.device)


DDPM_FINETUNE = Stage(
    "ddpm_finetune", _finetune, needs=("ddpm_source", "intermediate", "data"), every_rank=True, check=check_generation,
    reads=("selector", "generation.lam", "generation.finetune", "seed", "trainer"),
    code=("ssat.selection", "ssat.generation", "ssat.models", "ssat.lightning"),
    describe=lambda ctx: f"{ctx.cfg.selector.name} guidance, lambda {ctx.cfg.generation.lam}, "
                         f"{ctx.cfg.generation.finetune.epochs} epochs")

SIZES = ("generation.num_images", "generation.plain_fraction", "generation.budget_of", "budget")


def _sizes(ctx: StageContext) -> tuple[int, int]:
    gen = ctx.cfg.generation
    return generated_pool_sizes(gen.num_images, gen.plain_fraction, ctx.cfg.budget, gen.budget_of)


def _sample(ctx: StageContext, out: Path) -> dict[str, Any]:
    sampler = ctx.cfg.generation.sampler
    return sample(str(GeneratedImages.unet_dir(ctx.path("ddpm_finetune"))), out, _sizes(ctx)[0], sampler.batch_size, ctx.cfg.seed,
                  sampler.scheduler, sampler.num_inference_steps, ctx.device)


def _sample_plain(ctx: StageContext, out: Path) -> dict[str, Any]:
    sampler = ctx.cfg.generation.sampler
    return sample(ctx.value("ddpm_source"), out, _sizes(ctx)[1], sampler.batch_size, ctx.cfg.seed + 1,
                  sampler.scheduler, sampler.num_inference_steps, ctx.device)


SAMPLE = Stage("sample", _sample, needs=("ddpm_finetune",), every_rank=True,
               reads=(*SIZES, "generation.sampler", "seed", "trainer.accelerator"),
               describe=lambda ctx: f"{_sizes(ctx)[0]} images from the fine-tuned DDPM "
                                    f"({ctx.cfg.generation.sampler.scheduler})")
SAMPLE_PLAIN = Stage("sample_plain", _sample_plain, needs=("ddpm_source",), every_rank=True,
                     reads=(*SIZES, "generation.sampler", "seed", "trainer.accelerator"),
                     describe=lambda ctx: f"{_sizes(ctx)[1]} images from the DDPM before fine-tuning")


def _generated_pool(ctx: StageContext, out: Path | None):
    parts = [GeneratedImages.path(ctx.path(name)) for name in ("sample", "sample_plain") if name in ctx.inputs]
    return replace(ctx.value("data"), pool_images=MemmapImages(parts), pool_hidden_labels=None), None


GENERATED_POOL = Stage("pool", _generated_pool, needs=("data", "sample"), cached=False)


def generation_stages(cfg) -> list[Stage]:
    """The stages that make a generative selector's pool: (the guidance classifier's file, pretrain,) fine-tune,
    sample (and plain samples)."""
    gen = cfg.generation
    plain = gen.plain_fraction > 0
    source = DDPM_SOURCE if gen.pretrained is not None else replace(DDPM_SOURCE, needs=("ddpm_pretrain",))
    own = gen.classifier != "intermediate"
    finetune = replace(DDPM_FINETUNE, needs=("ddpm_source", CLASSIFIER.name, "data")) if own else DDPM_FINETUNE
    return [*((CLASSIFIER,) if own else ()), *(() if gen.pretrained is not None else (DDPM_PRETRAIN,)), source,
            finetune, SAMPLE, *((SAMPLE_PLAIN,) if plain else ()),
            replace(GENERATED_POOL, needs=("data", "sample", "sample_plain")) if plain else GENERATED_POOL]
