"""Gaussian mixtures on pool features: EM in torch over row batches (GPU when present), scikit-learn as reference.

scikit-learn's full-covariance GaussianMixture on a million 640-d rows takes hours on a CPU and needs the pool
as one float64 array. Here a pool (often a read-only memory map) is read in row batches: each EM iteration is
one pass that computes the responsibilities and accumulates the sufficient statistics, so nothing larger than a
batch is ever built. The E-step whitens rows centred on the mixture's mean by the triangular Cholesky factors of
all precisions, float32 matmuls on coordinate blocks that skip the factors' zero half; in the fit it completes a
component only where its bound says the responsibility can matter, and the M-step sums the whitened rows it
already has (float32 within a batch, float64 across). Log-determinants, log-likelihoods and responsibilities are
float64. The semantics are scikit-learn's: hard k-means responsibilities to start, ``reg_covar`` on the
diagonal, stop when the mean log-likelihood changes by less than ``tol``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from ssat.clustering.blocks import float32_blocks
from ssat.clustering.kmeans import fit_kmeans
from ssat.errors import ConfigError, DataError, check_finite

COVARIANCE_TYPES = ("full", "diag")
BACKENDS = ("torch", "sklearn")
# The k-means start: the lowest-inertia of 3 k-means++ runs of 25 Lloyd iterations (a single run, scikit-learn's
# default, often seeds a centroid on a far outlier and EM then keeps a component on it), on at most 5,000 rows
# per component drawn at random: plenty for a start that EM refines, and a cost independent of the pool size.
KMEANS_NITER, KMEANS_NREDO, KMEANS_POINTS_PER_COMPONENT = 25, 3, 5000
LOG_2PI = math.log(2 * math.pi)
# Rows whose responsibility for a component is below this are left out of its mean and covariance sums: with
# separated clusters most rows count for one component only, which makes the M-step about K times cheaper. What is
# left out weighs at most N * 1e-12 points (1e-6 for a million rows), far below the E-step's float32 rounding.
NEGLIGIBLE_RESPONSIBILITY = 1e-12
# On a CPU, the E-step works on chunks of a batch whose (rows, K * D) float32 temporaries take about 4 MB: cache
# sized, yet few enough torch calls that OpenMP barriers stay cheap when other processes share the cores.
CHUNK_ELEMENTS = 2**20
CHUNK_MIN_ROWS = 256
# The whitening (x - mu_k) U_k with U_k the upper-triangular factor of component k's precision runs on column
# blocks of this many coordinates: block b needs only the coordinates up to its end, so the blocks skip the zero
# half of every U_k (about 0.56 of the full product at D = 512). The covariance sums skip their upper half alike.
COORDINATE_BLOCK = 64
# During the fit (full covariance), the E-step first bounds every squared Mahalanobis distance from below,
# completes only each row's most promising component, then those whose bound on the log-probability stays within
# PRUNE_LOG_RATIO of the best exact one. A component dropped this way has a responsibility below e^-60 = 1e-26
# (scikit-learn's would round to the same mean and covariance sums), so EM is unchanged while most of the K-fold
# whitening is skipped on separated data. The bound: with HEAD_BOUND_MIN_BLOCKS coordinate blocks or more, the
# whitened coordinates of the first HEAD_FRACTION of the blocks for every component (one block of 64 at D = 512;
# a quarter of the blocks was slower on the benchmark's clusters); below, |x - mu_k|^2 times the precision's
# smallest eigenvalue (an eigendecomposition per component and iteration: cheap below 256 dimensions, 0.25 s at
# 512). Rows are grouped by their most promising component, in chunks of PRUNED_CHUNK_ELEMENTS (rows x K x width)
# for the head: larger groups make larger matmuls. Scoring never prunes: every log-probability is exact there.
PRUNE_LOG_RATIO = 60.0
HEAD_FRACTION = 0.125
HEAD_BOUND_MIN_BLOCKS = 4
PRUNED_CHUNK_ELEMENTS = 2**22


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The given device, else CUDA when present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_gmm_options(n_components: int, covariance_type: str = "full", backend: str = "torch", max_iter: int = 100,
                      tol: float = 1e-3, reg_covar: float = 1e-6, batch_size: int = 65536) -> None:
    """Config errors found before any data is read, each naming its ``selector.`` key."""
    if n_components < 1:
        raise ConfigError(f"selector.n_components={n_components} must be at least 1")
    if covariance_type not in COVARIANCE_TYPES:
        raise ConfigError(f"selector.covariance_type={covariance_type!r} is not one of {', '.join(COVARIANCE_TYPES)}")
    if backend not in BACKENDS:
        raise ConfigError(f"selector.backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if max_iter < 1:
        raise ConfigError(f"selector.max_iter={max_iter} must be at least 1")
    if not tol >= 0:
        raise ConfigError(f"selector.tol={tol} must be >= 0")
    if not reg_covar >= 0:
        raise ConfigError(f"selector.reg_covar={reg_covar} must be >= 0")
    if batch_size < 1:
        raise ConfigError(f"selector.batch_size={batch_size} must be at least 1")


def _float32_tensor(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows as a float32 tensor: no copy for float32 rows on the CPU, read-only memory maps included."""
    rows = np.asarray(rows)
    if rows.dtype != np.float32:
        rows = rows.astype(np.float32)
    with warnings.catch_warnings():
        # torch warns that it cannot protect a read-only array; the rows are only ever read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        tensor = torch.from_numpy(rows)
    return tensor.to(device)


class FeatureRows:
    """The features as float32 row batches on a device.

    With ``keep`` (EM passes over the rows up to max_iter times) a GPU holds them once uploaded when they take
    less than half of its free memory; otherwise every pass uploads them batch by batch.
    """

    def __init__(self, features: np.ndarray, batch_size: int, device: torch.device, keep: bool = False):
        self.features, self.batch_size, self.device = features, batch_size, device
        self.n, self.dim = features.shape
        self.on_device = None
        if keep and device.type == "cuda" and 8 * self.n * self.dim < torch.cuda.mem_get_info(device)[0]:
            self.on_device = torch.empty((self.n, self.dim), dtype=torch.float32, device=device)
            for start, x in self._read():
                self.on_device[start:start + len(x)] = x

    def _read(self) -> Iterator[tuple[int, torch.Tensor]]:
        for start, x in float32_blocks(self.features, self.batch_size):
            yield start, _float32_tensor(x, self.device)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self.on_device is None:
            yield from self._read()
        else:
            for start in range(0, self.n, self.batch_size):
                yield start, self.on_device[start:start + self.batch_size]


@contextmanager
def full_float32_matmuls():
    """float32 matmuls at full precision: TF32 (if a caller enabled it) would cost the covariances 3 digits."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def coordinate_blocks(dim: int) -> list[tuple[int, int]]:
    """(start, end) of the COORDINATE_BLOCK-wide column blocks of D coordinates."""
    return [(start, min(dim, start + COORDINATE_BLOCK)) for start in range(0, dim, COORDINATE_BLOCK)]


class _TorchMixture:
    """Mixture parameters on the device, in the forms the E-step needs.

    The rows are centred on the mixture's mean (so float32 keeps the digits that matter) and multiplied by the
    upper-triangular factors U_k of all precisions at once (full): for each coordinate block, one matmul of the
    rows' coordinates up to the block's end by the block's columns of every U_k, (end, K * width), float32
    (``whiten``). diag takes the precisions one component at a time. log_norms (float64) hold log weight + log
    det U_k - D log(2 pi) / 2.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor, covariance_type: str):
        self.weights, self.means, self.covariances, self.covariance_type = weights, means, covariances, covariance_type
        self.means32 = means.float()
        n_components, dim = means.shape
        centre = weights @ means
        self.centre32 = centre.float()
        if covariance_type == "full":
            chol, info = torch.linalg.cholesky_ex(covariances)
            _raise_if_not_positive_definite(info > 0)
            self.chol = chol
            eye = torch.eye(dim, dtype=chol.dtype, device=chol.device).expand_as(chol)
            factors = torch.linalg.solve_triangular(chol, eye, upper=False).mT
            log_det = -torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            offsets = torch.einsum("kd,kde->ke", means - centre, factors)
            # per block: (end, the block's columns of every U_k (end, K, width), minus their offsets (K, width))
            self.whiten = [(end, factors[:, :end, start:end].permute(1, 0, 2).float().contiguous(),
                            -offsets[:, start:end].float()) for start, end in coordinate_blocks(dim)]
            self.spectral = len(self.whiten) < HEAD_BOUND_MIN_BLOCKS
            if self.spectral:  # lambda_min(Sigma_k^-1) = 1 / lambda_max(Sigma_k), shrunk to stay a lower bound
                self.offsets32 = (means - centre).float()
                self.half_offset_norms = 0.5 * self.offsets32.square().sum(1)
                self.min_precisions = (1 - 1e-6) / torch.linalg.eigvalsh(covariances)[:, -1]
        else:
            _raise_if_not_positive_definite((covariances <= 0).any(-1))
            self.precisions32 = (1.0 / covariances).float()
            log_det = -0.5 * torch.log(covariances).sum(-1)
        self.log_norms = torch.log(weights) + log_det - 0.5 * dim * LOG_2PI
        self.prunes = covariance_type == "full"

    @classmethod
    def from_fit(cls, fit: GaussianMixtureFit, device: torch.device) -> _TorchMixture:
        def as64(a):
            return torch.as_tensor(a, dtype=torch.float64, device=device)

        return cls(as64(fit.weights), as64(fit.means), as64(fit.covariances), fit.covariance_type)

    def log_prob(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row log-likelihood (B,) and responsibilities (B, K), float64, every component exact."""
        return self._normalise(self._weighted_log_prob(x))

    def e_step(self, x: torch.Tensor, stats: _SufficientStatistics | _WhitenedStatistics | None) -> torch.Tensor:
        """The fit's E-step: per-row log-likelihood (B,) float64, the responsibilities added to stats (if any).

        With full covariance it leaves out the components whose responsibility is certainly below
        e^-PRUNE_LOG_RATIO (theirs is then exactly 0) and hands stats (_WhitenedStatistics) the whitened rows it
        computed.
        """
        if not self.prunes:
            loglik, resp = self.log_prob(x)
            if stats is not None:
                stats.add(x, resp)
            return loglik
        parts, whitened = [], [[] for _ in self.means32]
        for chunk in self._chunks(x, pruned=True):
            loglik, completed = self._pruned_log_prob(chunk, keep_whitened=stats is not None)
            parts.append(loglik)
            for k, pair in enumerate(completed):  # kept for the batch: the sums are then a few large matmuls
                whitened[k].append(pair)
        if stats is not None:
            for k, pairs in enumerate(whitened):
                z, resp_k = (pairs[0] if len(pairs) == 1 else
                             (torch.cat([z for z, _ in pairs]), torch.cat([r for _, r in pairs])))
                if len(z):
                    stats.add(k, z, resp_k)
        return torch.cat(parts)

    def _chunks(self, x: torch.Tensor, pruned: bool = False) -> tuple[torch.Tensor, ...]:
        """The whole batch on a GPU, or for the spectral bound; on a CPU, chunks whose (rows, K, width) float32
        temporaries are cache-sized."""
        if x.device.type != "cpu" or (pruned and self.spectral):
            return (x,)
        n_components, dim = self.means32.shape
        width = min(dim, COORDINATE_BLOCK) if self.covariance_type == "full" else dim
        elements = PRUNED_CHUNK_ELEMENTS if pruned else CHUNK_ELEMENTS
        return x.split(max(CHUNK_MIN_ROWS, elements // (n_components * width)))

    def log_posteriors(self, x: torch.Tensor) -> torch.Tensor:
        """log p(k | x) (B, K), float64, every component exact."""
        weighted = self._weighted_log_prob(x)
        return weighted - torch.logsumexp(weighted, dim=1, keepdim=True)

    def _weighted_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(x | mu_k, Sigma_k) (B, K), float64: the distances chunk by chunk (cache-sized
        temporaries), the float64 arithmetic on (B, K) once for the batch (few torch calls)."""
        squared = torch.cat([self._squared_mahalanobis(chunk) for chunk in self._chunks(x)])
        return self.log_norms - 0.5 * squared.double()

    def _squared_mahalanobis(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mu_k)^T Sigma_k^-1 (x - mu_k) (B, K), float32."""
        if self.covariance_type == "full":
            centred = x - self.centre32
            return sum(self._whiten(centred, block).square_().sum(-1) for block in self.whiten)
        return torch.stack([(x - mean).square_() @ precisions
                            for mean, precisions in zip(self.means32, self.precisions32)], dim=1)

    @staticmethod
    def _whiten(centred: torch.Tensor, block: tuple, component: int | None = None) -> torch.Tensor:
        """Whitened coordinates (x - mu_k) U_k of one block for every component (rows, K, width), or one's."""
        end, weights, negative_offsets = block
        if component is not None:
            return torch.addmm(negative_offsets[component], centred[:, :end], weights[:, component])
        whitened = torch.addmm(negative_offsets.view(-1), centred[:, :end], weights.view(end, -1))
        return whitened.view(len(centred), *negative_offsets.shape)

    def _pruned_log_prob(self, x: torch.Tensor, keep_whitened: bool = True
                         ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per-row log-likelihood (B,) and, per component, the whitened coordinates (rows, D) and responsibilities of
        the rows whose responsibility for it is not negligible (with keep_whitened; else no components).

        Upper bounds on every log-probability pick each row's most promising component, which is completed first;
        then only the components whose bound stays within PRUNE_LOG_RATIO of the best exact one. The rows are
        grouped by their most promising component, so that each component's first rows are a slice, not a gather.
        """
        n_components = len(self.means32)
        centred = x - self.centre32
        bound, head, partial, n_head = self._upper_bounds(centred)
        best = bound.argmax(1)
        order = torch.argsort(best, stable=True)
        centred, bound, best = centred[order], bound[order], best[order]
        head, partial = (None, None) if head is None else (head[order], partial[order])
        ends = torch.bincount(best, minlength=n_components).cumsum(0).tolist()
        groups = [slice(start, end) for start, end in zip([0, *ends[:-1]], ends)]
        weighted = torch.full_like(bound, -math.inf)
        first = []
        for k, rows in enumerate(groups):
            _, weighted_k, z = self._complete(centred, head, partial, rows, k, n_head)
            weighted[rows, k] = weighted_k
            first.append(z)
        floor = weighted.max(1).values - PRUNE_LOG_RATIO
        completed = []
        for k, (rows, z) in enumerate(zip(groups, first)):
            candidates = torch.nonzero((best != k) & (bound[:, k] > floor)).squeeze(1)
            if len(candidates):
                more, weighted_k, z_more = self._complete(centred, head, partial, candidates, k, n_head, floor)
                weighted[more, k] = weighted_k
                rows = torch.cat([torch.arange(rows.start, rows.stop, device=x.device), more])
                z = torch.cat([z, z_more])
            completed.append((rows, z))
        loglik, resp = self._normalise(weighted)
        kept = []
        for k, (rows, z) in enumerate(completed if keep_whitened else []):
            resp_k = resp[rows, k]
            counted = resp_k >= NEGLIGIBLE_RESPONSIBILITY
            if not counted.all():
                z, resp_k = z[counted], resp_k[counted]
            kept.append((z, resp_k))
        return torch.empty_like(loglik).index_copy_(0, order, loglik), kept

    def _upper_bounds(self, centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                                               int]:
        """Upper bounds on log w_k + log N(x | mu_k, Sigma_k) (B, K) float64, the whitened head coordinates they
        came from (B, K, head) or None, their squared norms (B, K) or None, and the number of head blocks.

        Spectral (fewer than HEAD_BOUND_MIN_BLOCKS coordinate blocks): |x - mu_k|^2 lambda_min(Sigma_k^-1) is at
        most the squared Mahalanobis distance, for one (B, D) x (D, K) matmul; the distances, float32, are shrunk
        by 1e-4 of the norms they come from to stay below the exact ones. Head: the sum of squares of the first
        HEAD_FRACTION of the whitened coordinates, for every component.
        """
        if self.spectral:
            half_norms = 0.5 * centred.square().sum(1, keepdim=True) + self.half_offset_norms
            half_squared = torch.addmm(half_norms, centred, self.offsets32.mT, alpha=-1)
            half_squared = half_squared.sub_(1e-4 * half_norms).clamp_(min=0)
            return self.log_norms - self.min_precisions * half_squared.double(), None, None, 0
        n_head = max(1, round(HEAD_FRACTION * len(self.whiten)))
        head = torch.cat([self._whiten(centred, block) for block in self.whiten[:n_head]], dim=2)  # (B, K, head)
        partial = head.square().sum(-1)
        return self.log_norms - 0.5 * partial.double(), head, partial, n_head

    def _complete(self, centred: torch.Tensor, head: torch.Tensor | None, partial: torch.Tensor | None,
                  rows: torch.Tensor | slice, k: int, n_head: int, floor: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor | slice, torch.Tensor, torch.Tensor]:
        """Component k's log-probabilities and whitened coordinates of the given rows, from block n_head on; with a
        floor, the rows whose upper bound falls below it are dropped on the way. Returns the rows kept too."""
        selected = centred[rows]
        squared, parts = (0.0, []) if head is None else (partial[rows, k], [head[rows, k]])
        floor = None if floor is None else floor[rows]
        for block in self.whiten[n_head:]:
            z = self._whiten(selected, block, k)
            squared = squared + z.square().sum(-1)
            parts.append(z)
            if floor is not None:
                keep = torch.nonzero(self.log_norms[k] - 0.5 * squared.double() > floor).squeeze(1)
                if len(keep) < len(selected):
                    rows, selected, squared, floor = rows[keep], selected[keep], squared[keep], floor[keep]
                    parts = [part[keep] for part in parts]
        return rows, self.log_norms[k] - 0.5 * squared.double(), parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def _normalise(self, weighted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-likelihood and responsibilities from the per-component log-probabilities (B, K)."""
        # logsumexp by hand, so that the one exp also gives the responsibilities
        top = weighted.max(dim=1, keepdim=True).values
        shifted = weighted.sub_(top).exp_()
        total = shifted.sum(dim=1, keepdim=True)
        return (total.log() + top).squeeze(1), shifted.div_(total)

    def to_fit(self, n_iter: int, converged: bool, log_likelihoods: np.ndarray) -> GaussianMixtureFit:
        return GaussianMixtureFit(self.weights.cpu().numpy(), self.means.cpu().numpy(), self.covariances.cpu().numpy(),
                                  self.covariance_type, n_iter, converged, float(log_likelihoods.mean()),
                                  log_likelihoods)


def _raise_if_not_positive_definite(failed: torch.Tensor) -> None:
    if failed.any():
        k = int(torch.nonzero(failed)[0, 0])
        raise DataError(f"the covariance of GMM component {k} is not positive definite (collapsed, duplicated or "
                        f"collinear points); raise selector.reg_covar, lower selector.n_components or reduce the "
                        f"dimension with selector.pca_dim")


class _SufficientStatistics:
    """Sums over rows of r, r (x - c) and r (x - c)(x - c)^T (full) or r (x - c)^2 (diag) for each component.

    c is the component's mean before the M-step, so the new covariance follows without cancellation as
    S / n - d d^T with d = new mean - c (small). The products are float64: summed in float32, the rounding of
    thousands of terms leaves the covariance of collinear features (rank below D) with negative eigenvalues far
    larger than reg_covar. With the negligible responsibilities left out they cost a fraction of the E-step.
    """

    def __init__(self, centres32: torch.Tensor, covariance_type: str):
        n_components, dim = centres32.shape
        self.centres32, self.covariance_type = centres32, covariance_type
        options = dict(dtype=torch.float64, device=centres32.device)
        self.counts = torch.zeros(n_components, **options)
        self.first = torch.zeros(n_components, dim, **options)
        second_shape = (n_components, dim, dim) if covariance_type == "full" else (n_components, dim)
        self.second = torch.zeros(second_shape, **options)

    def add(self, x: torch.Tensor, resp: torch.Tensor) -> None:
        self.counts += resp.sum(0)
        for k in range(len(self.centres32)):
            resp_k = resp[:, k]
            rows = torch.nonzero(resp_k >= NEGLIGIBLE_RESPONSIBILITY).squeeze(1)
            if len(rows) < len(x):
                x_k, resp_k = x.index_select(0, rows), resp_k.index_select(0, rows)
            else:
                x_k = x
            root_rk = resp_k.sqrt()
            scaled = (x_k - self.centres32[k]).double().mul_(root_rk[:, None])  # sqrt(r) (x - c)
            self.first[k] += scaled.mT @ root_rk
            if self.covariance_type == "full":  # the blocks on and below the diagonal (m_step mirrors them)
                for start, end in coordinate_blocks(scaled.shape[1]):
                    self.second[k, start:end, :end] += scaled[:, start:end].mT @ scaled[:, :end]
            else:
                self.second[k] += scaled.square_().sum(0)

    def m_step(self, reg_covar: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weights, means and covariances as scikit-learn's M-step (which adds 10 eps to every count)."""
        counts = self.counts + 10 * torch.finfo(torch.float64).eps
        shift = self.first / counts[:, None]
        means = self.centres32.double() + shift
        if self.covariance_type == "full":
            second = self.second.tril() + self.second.tril(-1).mT
            covariances = second / counts[:, None, None] - shift[:, :, None] * shift[:, None, :]
            covariances = 0.5 * (covariances + covariances.mT)
            covariances.diagonal(dim1=-2, dim2=-1).add_(reg_covar)
        else:
            covariances = self.second / counts[:, None] - shift.square() + reg_covar
        return counts / counts.sum(), means, covariances


class _WhitenedStatistics:
    """The full-covariance M-step's sums in each component's whitened coordinates z = L_k^-1 (x - mu_k).

    Sums of r, r z and r z z^T (the blocks on and below the diagonal), over the rows the E-step completed, from
    the z it computed. In these coordinates a component's covariance is near the identity, so float32 products
    summed over a chunk lose nothing that matters, and the covariance mapped back, L_k (S / n - m m^T) L_k^T, is
    positive semi-definite whatever the rounding (collinear features included): the float64 sums of raw
    coordinates need twice the time. Exactly scikit-learn's M-step: mean mu_k + L_k m and that covariance.
    """

    def __init__(self, mixture: _TorchMixture):
        self.mixture = mixture
        n_components, dim = mixture.means.shape
        options = dict(dtype=torch.float64, device=mixture.means.device)
        self.counts = torch.zeros(n_components, **options)
        self.first = torch.zeros(n_components, dim, **options)
        self.second = torch.zeros(n_components, dim, dim, **options)

    def add(self, k: int, z: torch.Tensor, resp_k: torch.Tensor) -> None:
        """z: the whitened rows of component k whose responsibility resp_k is not negligible."""
        self.counts[k] += resp_k.sum()
        root_rk = resp_k.sqrt().float()
        scaled = z * root_rk[:, None]  # sqrt(r) z
        self.first[k] += (scaled.mT @ root_rk).double()
        for start, end in coordinate_blocks(z.shape[1]):
            self.second[k, start:end, :end] += (scaled[:, start:end].mT @ scaled[:, :end]).double()

    def m_step(self, reg_covar: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weights, means and covariances as scikit-learn's M-step (which adds 10 eps to every count)."""
        counts = self.counts + 10 * torch.finfo(torch.float64).eps
        shift = self.first / counts[:, None]
        second = self.second.tril() + self.second.tril(-1).mT
        whitened = second / counts[:, None, None] - shift[:, :, None] * shift[:, None, :]
        chol = self.mixture.chol
        means = self.mixture.means + (chol @ shift[:, :, None]).squeeze(-1)
        covariances = chol @ whitened @ chol.mT
        covariances = 0.5 * (covariances + covariances.mT)
        covariances.diagonal(dim1=-2, dim2=-1).add_(reg_covar)
        return counts / counts.sum(), means, covariances


@dataclass
class GaussianMixtureFit:
    """A fitted mixture; ``score`` gives per-point log-likelihoods and posteriors in row batches."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, D)
    covariances: np.ndarray  # (K, D, D) full or (K, D) diag
    covariance_type: str
    n_iter: int
    converged: bool
    mean_log_likelihood: float  # on the fitted rows, under the returned parameters
    # the fitted rows' log-likelihoods under the returned parameters (torch back-end: its last pass computes them,
    # so a caller that fitted every row needs no scoring pass for them)
    log_likelihoods: np.ndarray | None = field(default=None, repr=False, compare=False)
    # the scikit-learn model of a backend='sklearn' fit, which then also scores (all float64, the reference)
    sklearn_model: GaussianMixture | None = field(default=None, repr=False, compare=False)

    def score(self, features: np.ndarray, batch_size: int = 65536,
              device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Log-likelihood (N,) and posteriors (N, K), both float64, holding one batch of rows at a time."""
        n = len(features)
        loglik = np.empty(n, dtype=np.float64)
        posteriors = np.empty((n, len(self.weights)), dtype=np.float64)
        for start, (batch_loglik, batch_posteriors) in self._per_block(features, batch_size, device, "score"):
            loglik[start:start + len(batch_loglik)] = batch_loglik
            posteriors[start:start + len(batch_loglik)] = batch_posteriors
        return loglik, posteriors

    def log_posteriors(self, features: np.ndarray, batch_size: int = 65536,
                       device: str | torch.device | None = None) -> np.ndarray:
        """log p(k | x) (N, K), float64, from the per-component log-densities: far from a boundary the posteriors
        round to exactly 1 and 0, their logs keep how far."""
        out = np.empty((len(features), len(self.weights)), dtype=np.float64)
        for start, block in self._per_block(features, batch_size, device, "log_posteriors"):
            out[start:start + len(block)] = block
        return out

    def row_scores(self, features: np.ndarray, kind: str, batch_size: int = 65536,
                   device: str | torch.device | None = None, projection=None) -> np.ndarray:
        """One float64 per row, streamed: ``loglik`` (log-likelihood) or ``posterior_gap`` (the gap between the two
        largest log-posteriors), of the rows after ``projection`` (a PCAProjection, or None); nothing (N, K) or
        (N, D) is ever held, so a memory-mapped pool larger than RAM is scored through the page cache."""
        out = np.empty(len(features), dtype=np.float64)
        method = "score" if kind == "loglik" else "log_posteriors"
        for start, result in self._per_block(features, batch_size, device, method, projection):
            if kind == "loglik":
                block = result[0]
            else:
                top2 = np.partition(result, -2, axis=1)
                block = top2[:, -1] - top2[:, -2]
            out[start:start + len(block)] = block
        return out

    def _per_block(self, features: np.ndarray, batch_size: int, device: str | torch.device | None, method: str,
                   projection=None) -> Iterator[tuple[int, object]]:
        """(start, the mixture's ``score`` (loglik, posteriors) or ``log_posteriors`` of the block, numpy float64),
        the block first projected (torch back-end: float32 on the device; sklearn: then as float64)."""
        device = resolve_device(device if self.sklearn_model is None else "cpu")
        mixture = None if self.sklearn_model is not None else _TorchMixture.from_fit(self, device)
        with torch.no_grad(), full_float32_matmuls():
            for start, x in FeatureRows(features, batch_size, device):
                if not torch.isfinite(x).all():  # checked as it is read: a pool larger than RAM is read once
                    check_finite(x.cpu().numpy(), "features", first_row=start, total=len(features))
                if projection is not None:
                    x = projection.apply(x)
                if mixture is None:
                    x64 = x.double().cpu().numpy()
                    yield start, ((self.sklearn_model.score_samples(x64), self.sklearn_model.predict_proba(x64))
                                  if method == "score" else self.sklearn_model._estimate_log_prob_resp(x64)[1])
                elif method == "score":
                    loglik, posteriors = mixture.log_prob(x)
                    yield start, (loglik.cpu().numpy(), posteriors.cpu().numpy())
                else:
                    yield start, mixture.log_posteriors(x).cpu().numpy()


def _nearest_centroid(rows: FeatureRows, centroids: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centroid: the hard responsibilities both back-ends start from."""
    centroids32 = torch.as_tensor(np.asarray(centroids, dtype=np.float32), device=rows.device)
    centre = centroids32.mean(0)  # both sides centred on it, so float32 keeps the digits that tell centroids apart
    centred = centroids32 - centre
    half_norms = 0.5 * centred.square().sum(1)
    labels = np.empty(rows.n, dtype=np.int64)
    for start, x in rows:
        # |x - c|^2 / 2 less the |x|^2 / 2 that all centroids share: one matmul
        labels[start:start + len(x)] = torch.addmm(half_norms, x - centre, centred.mT, alpha=-1).argmin(1).cpu().numpy()
    return labels


def _fit_torch(rows: FeatureRows, labels: np.ndarray, centroids: np.ndarray, covariance_type: str, max_iter: int,
               tol: float, reg_covar: float) -> GaussianMixtureFit:
    device = rows.device
    n_components = len(centroids)
    stats = _SufficientStatistics(torch.as_tensor(centroids, dtype=torch.float32, device=device), covariance_type)
    for start, x in rows:
        nearest = torch.as_tensor(labels[start:start + len(x)], device=device)
        stats.add(x, torch.nn.functional.one_hot(nearest, n_components).double())
    mixture = _TorchMixture(*stats.m_step(reg_covar), covariance_type)

    lower_bound, converged, n_iter = -math.inf, False, 0
    while n_iter < max_iter and not converged:
        n_iter += 1
        stats = (_WhitenedStatistics(mixture) if mixture.prunes
                 else _SufficientStatistics(mixture.means32, covariance_type))
        total = torch.zeros((), dtype=torch.float64, device=device)
        for _, x in rows:
            total += mixture.e_step(x, stats).sum()
        previous, lower_bound = lower_bound, total.item() / rows.n
        mixture = _TorchMixture(*stats.m_step(reg_covar), covariance_type)
        converged = abs(lower_bound - previous) < tol

    log_likelihoods = np.empty(rows.n, dtype=np.float64)
    for start, x in rows:
        log_likelihoods[start:start + len(x)] = mixture.e_step(x, None).cpu().numpy()
    return mixture.to_fit(n_iter, converged, log_likelihoods)


def _initial_parameters(x: np.ndarray, labels: np.ndarray, n_components: int, covariance_type: str,
                        reg_covar: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights, means and precisions of the hard assignment, as scikit-learn's M-step computes them."""
    dim = x.shape[1]
    counts = np.bincount(labels, minlength=n_components) + 10 * np.finfo(np.float64).eps
    means = np.zeros((n_components, dim))
    precisions = np.empty((n_components, dim, dim) if covariance_type == "full" else (n_components, dim))
    for k in range(n_components):
        members = x[labels == k]
        means[k] = members.sum(0) / counts[k]
        diff = members - means[k]
        if covariance_type == "full":
            covariance = diff.T @ diff / counts[k] + reg_covar * np.eye(dim)
            precision = np.linalg.inv(covariance)
            precisions[k] = 0.5 * (precision + precision.T)
        else:
            precisions[k] = 1.0 / ((diff * diff).sum(0) / counts[k] + reg_covar)
    return counts / counts.sum(), means, precisions


def _fit_sklearn(features: np.ndarray, labels: np.ndarray, n_components: int, covariance_type: str, max_iter: int,
                 tol: float, reg_covar: float, seed: int) -> GaussianMixtureFit:
    x = np.asarray(features, dtype=np.float64)
    weights, means, precisions = _initial_parameters(x, labels, n_components, covariance_type, reg_covar)
    # every parameter is given, so init_params only decides what scikit-learn computes and discards:
    # random_from_data is the cheapest (kmeans would run scikit-learn's k-means for nothing)
    model = GaussianMixture(n_components, covariance_type=covariance_type, tol=tol, reg_covar=reg_covar,
                            max_iter=max_iter, init_params="random_from_data", weights_init=weights,
                            means_init=means, precisions_init=precisions, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as converged=False
        model.fit(x)
    return GaussianMixtureFit(model.weights_, model.means_, model.covariances_, covariance_type, int(model.n_iter_),
                              bool(model.converged_), float(model.score(x)), sklearn_model=model)


def _kmeans_sample(features: np.ndarray, n_components: int, seed: int) -> np.ndarray:
    """The rows k-means starts from: all, or KMEANS_POINTS_PER_COMPONENT per component drawn at random."""
    size = KMEANS_POINTS_PER_COMPONENT * n_components
    if len(features) <= size:
        return features
    return features[np.sort(np.random.default_rng(seed).choice(len(features), size, replace=False))]


def fit_gmm(features: np.ndarray, n_components: int, covariance_type: str = "full", max_iter: int = 100,
            tol: float = 1e-3, reg_covar: float = 1e-6, seed: int = 0, backend: str = "torch",
            device: str | torch.device | None = None, batch_size: int = 65536,
            init_means: np.ndarray | None = None) -> GaussianMixtureFit:
    """EM from hard responsibilities: each row to its nearest k-means centroid (or nearest of ``init_means``).

    features: (N, D) float32 or float16, a memory map included (never copied by the torch back-end; the sklearn
    back-end, the reference, converts it to one float64 array). EM stops when the mean log-likelihood changes by
    less than ``tol`` or after ``max_iter`` iterations.
    """
    check_gmm_options(n_components, covariance_type, backend, max_iter, tol, reg_covar, batch_size)
    if features.ndim != 2:
        raise DataError(f"features must be a 2-D array (points x dimensions), not of shape {features.shape}")
    if n_components > len(features):
        raise ConfigError(f"selector.n_components={n_components} is more than the {len(features)} points "
                          f"the GMM is fitted on")
    check_finite(features, "the GMM's features", batch_size)
    if init_means is None:
        init_means = fit_kmeans(_kmeans_sample(features, n_components, seed), n_components, niter=KMEANS_NITER,
                                nredo=KMEANS_NREDO, seed=seed)
    elif np.shape(init_means) != (n_components, features.shape[1]):
        raise ValueError(f"init_means has shape {np.shape(init_means)}, not ({n_components}, {features.shape[1]})")
    device = resolve_device(device)
    with torch.no_grad(), full_float32_matmuls():
        rows = (FeatureRows(features, batch_size, device, keep=True) if backend == "torch"
                else FeatureRows(features, batch_size, torch.device("cpu")))
        labels = _nearest_centroid(rows, init_means)
        if backend == "sklearn":
            return _fit_sklearn(features, labels, n_components, covariance_type, max_iter, tol, reg_covar, seed)
        return _fit_torch(rows, labels, np.asarray(init_means), covariance_type, max_iter, tol, reg_covar)
