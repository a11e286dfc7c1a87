"""PCA of pool features from batch sums, so that a memory-mapped pool of millions is read, never copied.

A full-covariance Gaussian mixture costs O(N K D^2) per EM iteration; projecting 640-d features on their top
principal components first is what makes LCS-GMM on a pool of millions take minutes instead of hours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ssat.clustering.gmm import FeatureRows, full_float32_matmuls, resolve_device
from ssat.errors import ConfigError, DataError, check_finite


@dataclass
class PCAProjection:
    """The top principal components of a set of features, largest variance first."""

    mean: np.ndarray  # (D,) float64
    components: np.ndarray  # (d, D) float64, orthonormal rows; sign: largest-magnitude entry positive (as sklearn)
    explained_variance: np.ndarray  # (d,) float64, with the n - 1 denominator (as sklearn)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates of a block of float32 rows on its device (float32)."""
        mean32 = torch.as_tensor(self.mean, dtype=torch.float32, device=x.device)
        return (x - mean32) @ torch.as_tensor(self.components.T, dtype=torch.float32, device=x.device)

    def transform(self, features: np.ndarray, batch_size: int = 65536,
                  device: str | torch.device | None = None) -> np.ndarray:
        """(N, d) float32 coordinates, computed one batch of rows at a time."""
        device = resolve_device(device)
        mean32 = torch.as_tensor(self.mean, dtype=torch.float32, device=device)
        components32 = torch.as_tensor(self.components.T, dtype=torch.float32, device=device)
        out = np.empty((len(features), len(self.components)), dtype=np.float32)
        with torch.no_grad(), full_float32_matmuls():
            for start, x in FeatureRows(features, batch_size, device):
                out[start:start + len(x)] = ((x - mean32) @ components32).cpu().numpy()
        return out


def fit_pca(features: np.ndarray, n_components: int, batch_size: int = 65536,
            device: str | torch.device | None = None) -> PCAProjection:
    """Mean and covariance summed over row batches, then an eigendecomposition of the D x D covariance.

    Rows are centred on the first batch's mean before their products are taken, so the covariance does not come
    from the difference of two large numbers; each batch's products are float32 matmuls (half the cost of float64),
    summed across batches in float64.
    """
    n, dim = features.shape
    if not 1 <= n_components <= dim:
        raise ConfigError(f"selector.pca_dim={n_components} must be between 1 and the feature dimension {dim}")
    if n < 2:
        raise DataError(f"PCA needs at least 2 rows of features; got {n}")
    check_finite(features, "the PCA's features", batch_size)
    device = resolve_device(device)
    shift = None
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    products = torch.zeros((dim, dim), dtype=torch.float64, device=device)
    with torch.no_grad(), full_float32_matmuls():
        for _, x in FeatureRows(features, batch_size, device):
            if shift is None:
                shift32 = x.double().mean(0).float()
                shift = shift32.double()
            x = x - shift32
            total += x.sum(0, dtype=torch.float64)
            products += (x.mT @ x).double()
    offset = total / n
    covariance = (products - n * torch.outer(offset, offset)) / (n - 1)
    variances, vectors = torch.linalg.eigh(covariance)
    top = torch.argsort(variances, descending=True)[:n_components]
    components = vectors[:, top].mT
    largest = components.abs().argmax(1)
    components *= torch.sign(components[torch.arange(n_components), largest])[:, None]
    return PCAProjection((shift + offset).cpu().numpy(), components.cpu().numpy(), variances[top].cpu().numpy())
