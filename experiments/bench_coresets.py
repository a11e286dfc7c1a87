"""How well, and how fast, the adversarial coresets match the full gradient, side by side with random subsets.

Real last-layer TRADES gradients of a small CNN (briefly trained on the digits training set) at its adversarial
examples; for each coreset size, the relative error |sum_i g_i - sum_j w_j g_j| / |sum_i g_i| of GradMatch, CRAIG
and uniform random subsets (weight N / k, mean of 10 draws), and the seconds each choice took.

    python experiments/bench_coresets.py [--fractions 0.05 0.1 0.3] [--fc-weights] [--gradient concat] [--lam 0.5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ssat.attacks import TradesLoss
from ssat.data.datasets import load_digits
from ssat.models import SmallCNN
from ssat.selection.coreset import Craig, GradMatch, last_layer_gradients


def gradients(fc_weights: bool, gradient: str) -> np.ndarray:
    data = load_digits(test_fraction=0.2, split_seed=0)
    images, labels = data.train_images, data.train_labels
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, mean=[0.3], std=[0.4], width=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.from_numpy(images).float() / 255, torch.from_numpy(labels.astype(np.int64))
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    batches = [(images[s:s + 256], labels[s:s + 256]) for s in range(0, len(labels), 256)]
    return last_layer_gradients(model, TradesLoss(eps=0.1, alpha=0.025, steps=10), batches, fc_weights=fc_weights,
                                combine=gradient)


def error(grads: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> float:
    full = grads.sum(0)
    return float(np.linalg.norm(full - (weights[:, None] * grads[indices]).sum(0)) / np.linalg.norm(full))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    parser.add_argument("--fc-weights", action="store_true", help="add the last layer's weight gradients")
    parser.add_argument("--gradient", choices=["sum", "concat"], default="sum",
                        help="TRADES' clean and adversarial parts summed (ACS) or concatenated")
    parser.add_argument("--lam", type=float, default=0.0, help="GradMatch's ridge weight (ACS: 0)")
    args = parser.parse_args()
    grads = gradients(args.fc_weights, args.gradient)
    n = len(grads)
    print(f"{n} candidates, gradient dimension {grads.shape[1]}")
    print(f"{'k':>6} {'random err':>11} {'gradmatch err':>14} {'craig err':>10} {'random/gm':>10} {'random/craig':>13}"
          f" {'gm s':>7} {'craig s':>8}")
    for fraction in args.fractions:
        k = round(fraction * n)
        random = np.mean([error(grads, np.random.default_rng(s).choice(n, k, replace=False), np.full(k, n / k))
                          for s in range(10)])
        started = time.perf_counter()
        gm = error(grads, *GradMatch(lam=args.lam)(grads, k, np.random.default_rng(0)))
        gm_seconds = time.perf_counter() - started
        started = time.perf_counter()
        craig = error(grads, *Craig()(grads, k, np.random.default_rng(0)))
        craig_seconds = time.perf_counter() - started
        print(f"{k:>6} {random:>11.4f} {gm:>14.4f} {craig:>10.4f} {random / gm:>10.1f} {random / craig:>13.1f}"
              f" {gm_seconds:>7.2f} {craig_seconds:>8.2f}")


if __name__ == "__main__":
    main()
