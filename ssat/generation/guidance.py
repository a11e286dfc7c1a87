"""Guidance losses for DDPM fine-tuning (PCG, LCG-KM, LCG-GMM): the frozen classifier's logits of x0_hat -> L_reg.

Every loss is differentiable w.r.t. the logits, so its gradient reaches the UNet through x0_hat. The two gap
losses are fitted once, before fine-tuning, on a bank of logits of labeled images grouped by predicted class.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from torch import Tensor, nn

from ssat.clustering.kmeans import fit_kmeans
from ssat.errors import ConfigError, DataError


class GuidanceLoss(nn.Module):
    """L_reg = mean over the batch of a per-sample score of the logits (B, K); lower is what guidance wants."""

    name = "guidance"

    def fit(self, bank_logits: Tensor, bank_pred: Tensor) -> GuidanceLoss:
        """Fit on logits (N, K) of labeled images and their predicted classes (N,); nothing to fit by default."""
        return self

    def per_sample(self, logits: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        """What results.json records of the guidance a run used."""
        return {"name": self.name}

    def forward(self, logits: Tensor) -> Tensor:
        return self.per_sample(logits).mean()


# PCG's sign of the max softmax in L_reg: the paper aims at low-confidence samples (minimising + max softmax);
# the release's `confidence_minimization_loss` returns - max softmax, which pushes confidence up.
CONFIDENCE_SIGNS = {"paper": 1.0, "release": -1.0}


class ConfidenceGuidance(GuidanceLoss):
    """PCG: L_reg = sign * mean max softmax. sign=paper (+1) lowers the classifier's confidence on the samples,
    the paper's aim (boundary samples); sign=release (-1) raises it, as the released code does."""

    name = "pcg"

    def __init__(self, sign: str = "paper"):
        super().__init__()
        if sign not in CONFIDENCE_SIGNS:
            raise ConfigError(f"selector.guidance.sign={sign!r} is not one of {', '.join(CONFIDENCE_SIGNS)}")
        self.sign = sign

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "sign": self.sign}

    def per_sample(self, logits: Tensor) -> Tensor:
        return CONFIDENCE_SIGNS[self.sign] * logits.float().softmax(dim=1).amax(dim=1)


class ClusterGapGuidance(GuidanceLoss):
    """L_reg = mean (d_(2) - d_(1)): the gap between a sample's two nearest centres of its predicted class.

    The centres are ``components`` per class in logit space. A class with fewer bank points than components gets
    one centre per point; a class with fewer than two centres (one point, or none predicted at all) has no gap,
    and its samples contribute 0 (and no gradient) instead of failing.
    """

    def __init__(self, components: int = 5, seed: int = 0):
        super().__init__()
        if components < 2:
            raise ConfigError(f"selector.guidance.components={components} must be at least 2 for a gap")
        self.components, self.seed = components, seed
        # (classes, components, classes) centres and which of them exist; filled by fit (and by a checkpoint).
        self.register_buffer("centres", torch.zeros(0, components, 0))
        self.register_buffer("valid", torch.zeros(0, components, dtype=torch.bool))

    def _fit_class(self, points: np.ndarray, k: int) -> np.ndarray:
        """k centres (k, K) of one class's bank logits, 2 <= k <= len(points)."""
        raise NotImplementedError

    def fit(self, bank_logits: Tensor, bank_pred: Tensor) -> ClusterGapGuidance:
        logits = bank_logits.detach().float().cpu().numpy()
        pred = bank_pred.detach().cpu().numpy()
        if logits.ndim != 2 or len(logits) == 0 or len(pred) != len(logits):
            raise DataError(f"the guidance bank needs logits (N, K) and N predictions, got {tuple(logits.shape)} "
                            f"and {tuple(pred.shape)}")
        classes = logits.shape[1]
        centres = np.zeros((classes, self.components, classes), dtype=np.float32)
        valid = np.zeros((classes, self.components), dtype=bool)
        for c in range(classes):
            points = logits[pred == c]
            k = min(self.components, len(points))
            if k > 0:
                centres[c, :k] = points.mean(0) if k == 1 else self._fit_class(points, k)
                valid[c, :k] = True
        device = self.centres.device
        self.centres = torch.from_numpy(centres).to(device)
        self.valid = torch.from_numpy(valid).to(device)
        return self

    def per_sample(self, logits: Tensor) -> Tensor:
        if self.centres.shape[0] != logits.shape[1]:
            raise RuntimeError(f"{type(self).__name__} is fitted for {self.centres.shape[0]} classes, "
                               f"the logits have {logits.shape[1]}: call fit() on a logits bank first")
        logits = logits.float()
        pred = logits.detach().argmax(dim=1)
        valid = self.valid[pred]
        distances = torch.linalg.vector_norm(logits[:, None, :] - self.centres[pred], dim=2)
        two = distances.masked_fill(~valid, torch.inf).topk(2, dim=1, largest=False).values
        return torch.where(valid.sum(1) >= 2, two[:, 1] - two[:, 0], torch.zeros_like(two[:, 0]))

    @torch.no_grad()
    def mean_gap(self, logits: Tensor) -> float:
        """The loss as a plain number: a diagnostic of how close samples sit to a boundary between two centres."""
        return float(self.per_sample(logits).mean())


class CentroidGapGuidance(ClusterGapGuidance):
    """LCG-KM (the paper's best; no public code): per-class k-means centroids of the bank logits."""

    name = "lcg_km"

    def __init__(self, components: int = 5, niter: int = 25, nredo: int = 1, seed: int = 0):
        super().__init__(components, seed)
        self.niter, self.nredo = niter, nredo

    def _fit_class(self, points: np.ndarray, k: int) -> np.ndarray:
        return fit_kmeans(points, k, niter=self.niter, nredo=self.nredo, seed=self.seed)


class GMMGapGuidance(ClusterGapGuidance):
    """LCG-GMM (the release): the means of a per-class diagonal Gaussian mixture on the bank logits."""

    name = "lcg_gmm"

    def __init__(self, components: int = 5, max_iter: int = 100, reg_covar: float = 1e-6, seed: int = 0):
        super().__init__(components, seed)
        self.max_iter, self.reg_covar = max_iter, reg_covar

    def _fit_class(self, points: np.ndarray, k: int) -> np.ndarray:
        gmm = GaussianMixture(n_components=k, covariance_type="diag", max_iter=self.max_iter,
                              reg_covar=self.reg_covar, random_state=self.seed)
        return gmm.fit(points.astype(np.float64)).means_
