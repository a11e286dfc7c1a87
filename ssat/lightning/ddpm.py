"""DDPM training with an optional guidance term: L = L_ddpm + lambda * L_reg(f(x0_hat)).

One module serves plain DDPM training (lambda = 0 or no guidance: ddpm_pretrain) and guided fine-tuning
(PCG, LCG-KM, LCG-GMM: ddpm_finetune). The classifier f is frozen (eval mode, no parameter gradients) but it is
NOT run under no_grad: L_reg's gradient must reach the UNet through x0_hat, or guidance has no effect (the older
public scripts had exactly that bug).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torch import Tensor, nn

from ssat.errors import ConfigError, TrainingDiverged
from ssat.generation.guidance import GuidanceLoss
from ssat.generation.unet import check_lambda


def to_unit_range(images: Tensor) -> Tensor:
    """uint8 images -> floats in [-1, 1], the DDPM's data range."""
    return images.float().div(127.5).sub(1.0)


class DDPMModule(L.LightningModule):
    """Trains ``unet`` to predict the noise; with a classifier and a guidance loss and lam > 0, also guides it."""

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, classifier: nn.Module | None = None,
                 guidance: GuidanceLoss | None = None, lam: float = 0.0, lr: float = 2e-5):
        super().__init__()
        check_lambda(lam)
        if lam > 0 and (classifier is None or guidance is None):
            raise ConfigError(f"generation.lam={lam} > 0 needs a classifier and generation.guidance")
        if scheduler.config.prediction_type != "epsilon":
            raise ConfigError(f"the DDPM scheduler predicts {scheduler.config.prediction_type!r}, not 'epsilon'")
        self.unet = unet
        self.noise_scheduler = scheduler
        self.classifier = classifier
        self.guidance = guidance
        self.lam, self.lr = float(lam), float(lr)
        if classifier is not None:
            classifier.eval().requires_grad_(False)
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().clone().float(), persistent=False)

    def train(self, mode: bool = True) -> DDPMModule:
        """Lightning puts the whole module in train mode; the classifier stays in eval mode (BatchNorm stats)."""
        super().train(mode)
        if self.classifier is not None:
            self.classifier.eval()
        return self

    def on_fit_start(self) -> None:
        """Lightning keeps the modes it is given, and from_pretrained returns the UNet in eval mode."""
        self.train()

    def predicted_x0(self, x_t: Tensor, t: Tensor, eps_hat: Tensor) -> Tensor:
        """The scheduler's predicted original sample for epsilon prediction, clamped to [-1, 1]."""
        alpha_bar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return ((x_t - (1 - alpha_bar).sqrt() * eps_hat) / alpha_bar.sqrt()).clamp(-1.0, 1.0)

    def losses(self, x0: Tensor, t: Tensor, eps: Tensor, guided: bool = True) -> dict[str, Tensor]:
        """L_ddpm, and L_reg of the classifier's logits of x0_hat (in [0, 1]) when ``guided`` and guidance is set."""
        x_t = self.noise_scheduler.add_noise(x0, eps, t)
        eps_hat = self.unet(x_t, t).sample
        out = {"ddpm": F.mse_loss(eps_hat.float(), eps.float())}
        if guided and self.guidance is not None and self.classifier is not None:
            x0_hat = self.predicted_x0(x_t, t, eps_hat.float())
            out["reg"] = self.guidance(self.classifier((x0_hat + 1.0) / 2.0))
        return out

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x0 = to_unit_range(batch[0])
        t = torch.randint(0, len(self.alphas_cumprod), (len(x0),), device=x0.device)
        parts = self.losses(x0, t, torch.randn_like(x0), guided=self.lam > 0)
        loss = parts["ddpm"] + self.lam * parts["reg"] if "reg" in parts else parts["ddpm"]
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the DDPM loss became {loss.item()} at epoch {self.current_epoch}, "
                                   f"batch {batch_idx}; lower the learning rate (checkpoints/last.ckpt is kept)")
        self.log_dict({f"train/{k}": v for k, v in {**parts, "loss": loss}.items()}, prog_bar=True,
                      batch_size=len(x0))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.unet.parameters(), lr=self.lr)
