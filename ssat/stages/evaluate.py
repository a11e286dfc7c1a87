"""Stage 6: clean, PGD and (optionally) AutoAttack accuracy on the test set, with sanity checks.

Every measure is a per-point "still correct" flag computed chunk by chunk; each chunk is saved atomically in the
stage folder, so an interrupted evaluation (hours of AutoAttack on CIFAR-10) resumes with the chunks still to
attack. Each chunk is seeded from its position, so a resumed evaluation gives the same numbers as one that ran
through. Attacks run with the model in eval mode on inputs in [0, 1] (normalisation is inside the model).

The sanity checks (Carlini et al. 2019, "On evaluating adversarial robustness") catch a broken evaluation or
gradient masking: PGD with eps = 0 must reproduce the clean predictions; robust accuracy must not rise as eps
grows; random noise must not fool more points than PGD; AutoAttack must not be above PGD.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from ssat.artifacts import ModelWeights
from ssat.attacks import AutoAttack, eval_mode, pgd_attack, project_linf
from ssat.cache import save_npy_atomic
from ssat.config import build
from ssat.data.splits import take_test_subset
from ssat.pipeline.runner import StageContext
from ssat.pipeline.stage import Stage
from ssat.progress import track

log = logging.getLogger("ssat")

# attack(model, x, y) -> x_adv, or None for clean accuracy
Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None


def correct_flags(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int,
                  device: torch.device | str = "cpu", attack: Attack = None, desc: str = "eval") -> np.ndarray:
    """Per point: is it classified correctly (at the adversarial example when ``attack`` is given)?"""
    model = model.to(device)
    flags = []
    with eval_mode(model):
        for start in track(range(0, len(images), batch_size), -(-len(images) // batch_size), desc, "batch",
                           leave=False):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device).float() / 255
            y = torch.from_numpy(labels[start:start + batch_size].astype(np.int64)).to(device)
            if attack is not None:
                x = attack(model, x, y)
            with torch.no_grad():
                flags.append((model(x).argmax(1) == y).cpu().numpy())
    return np.concatenate(flags) if flags else np.zeros(0, dtype=bool)


def random_noise_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                        samples: int) -> torch.Tensor:
    """The gradient-free baseline: random corners of the eps-ball; per point, the first sample that fools it
    (x itself where none does)."""
    x_adv = x.clone()
    todo = torch.ones(len(x), dtype=torch.bool, device=x.device)
    with torch.no_grad():
        for _ in range(samples):
            noisy = project_linf(x + eps * torch.randint_like(x, 0, 2).mul_(2).sub_(1), x, eps)
            fooled = todo & (model(noisy).argmax(1) != y)
            x_adv[fooled] = noisy[fooled]
            todo &= ~fooled
    return x_adv


class ResumableFlags:
    """Per-point flags of one measure over (images, labels), kept as atomically written chunk files."""

    def __init__(self, out_dir: Path, images: np.ndarray, labels: np.ndarray, model: nn.Module, batch_size: int,
                 device: torch.device | str, chunk_size: int, seed: int):
        self.out_dir, self.images, self.labels, self.model = Path(out_dir), images, labels, model
        self.batch_size, self.device, self.chunk_size, self.seed = batch_size, device, chunk_size, seed

    def __call__(self, name: str, attack: Attack, indices: np.ndarray | None = None) -> np.ndarray:
        images, labels = (self.images, self.labels) if indices is None else (self.images[indices],
                                                                             self.labels[indices])
        folder = self.out_dir / "flags" / name
        folder.mkdir(parents=True, exist_ok=True)
        parts = []
        for start in range(0, len(labels), self.chunk_size):
            stop = min(len(labels), start + self.chunk_size)
            path = folder / f"{start:09d}-{stop:09d}.npy"
            if path.exists():
                parts.append(np.load(path))
                continue
            torch.manual_seed(self.seed + start)
            part = correct_flags(self.model, images[start:stop], labels[start:stop], self.batch_size, self.device,
                                 attack, desc=f"{name} {start}-{stop}")
            save_npy_atomic(path, part)
            parts.append(part)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def sanity_subset(n: int, num_points: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, num_points), replace=False))


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, out_dir: Path, batch_size: int,
             pgd: dict[str, Any], autoattack: dict[str, Any], sanity: dict[str, Any],
             device: torch.device | str = "cpu", chunk_size: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Clean, PGD and AutoAttack accuracy and the sanity checks; per-point flags stay under out_dir/flags/."""
    flags = ResumableFlags(out_dir, images, labels, model, batch_size, device, chunk_size, seed)
    clean = flags("clean", None)
    robust = flags("pgd", partial(pgd_attack, **pgd))
    result: dict[str, Any] = {"clean_acc": float(clean.mean()), "robust_acc": float(robust.mean()),
                              "num_test": int(len(labels))}
    aa = None
    if autoattack.get("enabled"):
        attack = AutoAttack(autoattack.get("eps", pgd["eps"]), autoattack.get("version", "standard"), seed)
        num_points = autoattack.get("num_points") or len(labels)
        aa = flags("autoattack", attack, np.arange(min(num_points, len(labels))))
        result["autoattack_acc"] = float(aa.mean())
        result["autoattack_num_points"] = int(len(aa))
        result["autoattack_warnings"] = attack.warnings
    result["sanity"] = sanity_checks(flags, clean, robust, aa, pgd, **sanity, seed=seed)
    return result


def sanity_checks(flags: ResumableFlags, clean: np.ndarray, robust: np.ndarray, aa: np.ndarray | None,
                  pgd: dict[str, Any], num_points: int = 500, eps_scales=(0.5, 1.0, 2.0), noise_samples: int = 10,
                  tolerance: float = 0.01, seed: int = 0) -> dict[str, Any]:
    """The checks on a seeded subset of the test points (AutoAttack's on the points it ran on); failures are logged
    loudly and listed under "failed"."""
    subset = sanity_subset(len(clean), num_points, seed)
    eps = pgd["eps"]
    checks: dict[str, dict[str, Any]] = {}

    zero = flags("sanity_pgd_eps0", partial(pgd_attack, **{**pgd, "eps": 0.0, "restarts": 1}), subset)
    mismatches = int((zero != clean[subset]).sum())
    checks["pgd_eps0_equals_clean"] = {
        "passed": mismatches == 0, "clean_acc": float(clean[subset].mean()), "pgd_eps0_acc": float(zero.mean()),
        "mismatched_points": mismatches}

    by_eps = {}
    for scale in sorted(eps_scales):
        if scale == 1.0:
            by_eps[eps] = float(robust[subset].mean())
        else:
            scaled = {**pgd, "eps": eps * scale, "alpha": pgd["alpha"] * scale}
            by_eps[eps * scale] = float(flags(f"sanity_pgd_eps_x{scale:g}", partial(pgd_attack, **scaled),
                                              subset).mean())
    accs = list(by_eps.values())
    checks["robust_acc_falls_with_eps"] = {
        "passed": all(b <= a + tolerance for a, b in zip(accs, accs[1:])),
        "eps": list(by_eps), "robust_acc": accs}

    noise = flags("sanity_random_noise", partial(random_noise_attack, eps=eps, samples=noise_samples), subset)
    pgd_acc = float(robust[subset].mean())
    checks["pgd_beats_random_noise"] = {
        "passed": pgd_acc <= float(noise.mean()) + tolerance, "pgd_acc": pgd_acc,
        "random_noise_acc": float(noise.mean()), "samples": noise_samples}

    if aa is not None:  # on the points AutoAttack ran on (the first len(aa))
        pgd_there = float(robust[:len(aa)].mean())
        checks["autoattack_not_above_pgd"] = {
            "passed": float(aa.mean()) <= pgd_there + tolerance, "autoattack_acc": float(aa.mean()),
            "pgd_acc": pgd_there, "num_points": int(len(aa))}

    failed = [name for name, check in checks.items() if not check["passed"]]
    for name in failed:
        log.warning("!!! SANITY CHECK FAILED: %s %s: a sign of gradient masking or an evaluation bug; "
                    "do not trust the robust accuracy", name, {k: v for k, v in checks[name].items() if k != "passed"})
    return {"passed": not failed, "failed": failed, "num_points": int(len(subset)), "tolerance": tolerance,
            "checks": checks}


def _run(ctx: StageContext, out: Path) -> dict[str, Any]:
    data = take_test_subset(ctx.value("data"), ctx.cfg.test_size)
    L.seed_everything(ctx.cfg.seed, verbose=False)
    model = ModelWeights.load_into(build(ctx.cfg.model), ctx.path("ssat"))
    ev = OmegaConf.to_container(ctx.cfg.eval, resolve=True)
    return evaluate(model, data.test_images, data.test_labels, out, ev["batch_size"], ev["pgd"], ev["autoattack"],
                    ev["sanity"], ctx.device, ev["chunk_size"], ctx.cfg.seed)


def _describe(ctx: StageContext) -> str:
    ev, n = ctx.cfg.eval, len(take_test_subset(ctx.value("data"), ctx.cfg.test_size).test_labels)
    return (f"clean, PGD-{ev.pgd.steps} ({ev.pgd.loss}, {ev.pgd.restarts} restart(s))"
            f"{', AutoAttack ' + ev.autoattack.version if ev.autoattack.enabled else ''} on {n} test images and "
            f"sanity checks")


STAGE = Stage("evaluate", _run, needs=("ssat", "data"), reads=("eval", "test_size", "seed", "trainer.accelerator"),
              describe=_describe, code=("ssat.models",))
