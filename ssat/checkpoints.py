"""Weights from a file the user names (``intermediate.checkpoint``, ``generation.classifier``, ``python -m
ssat.evaluate <file>``): read as tensors only, never by running pickled code, and fitted to the configured model
whatever layout they were saved in (a plain state dict, a Lightning checkpoint, DDP's ``module.`` prefixes, a
file from ``python -m ssat.export`` in RobustBench's layout)."""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ssat.errors import ConfigError

log = logging.getLogger("ssat")

# Where checkpoints keep the weights: Lightning's and most training scripts' keys.
CONTAINERS = ("state_dict", "model_state_dict", "model", "net")
# Prefixes that wrappers add to every key: DDP / DataParallel, a LightningModule's attribute, torch.compile.
PREFIXES = ("module.", "model.", "_orig_mod.")
# What the model holds that a file from elsewhere may lack: the input normalisation (kept from the config).
NORMALISATION = ("mean", "std")
SHOWN = 3  # keys named in a mismatch message, per kind


@dataclass
class ModelFile:
    """A model with the weights of a user's file, and what identifies that file (its content, not its path)."""

    model: nn.Module
    path: str
    sha256: str


def named(path: str, key: str | None) -> str:
    """The file as the user typed it: ``key=path``, or the path alone for a command's argument."""
    return f"{key}={path}" if key else str(path)


def read_tensors(path: str, key: str | None) -> tuple[dict[str, Tensor], str]:
    """The state dict in the file named by ``key=path`` (or the argument ``path``) and the file's sha256.
    safetensors by suffix, else ``torch.load(weights_only=True)``; a file that needs pickled objects is refused,
    saying how to convert it."""
    file, what = Path(path), named(path, key)
    if not file.is_file():
        raise ConfigError(f"{what}: no such file")
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            return load(data), digest
        except SafetensorError as err:
            raise ConfigError(f"{what} is not a readable safetensors file: {err}") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise ConfigError(f"{what} is not a file torch.load can read: {_first_line(err)}") from None
        convert = (f"python -c \"import torch; c = torch.load('{path}', weights_only=False); "
                   f"torch.save(c.get('state_dict', c) if isinstance(c, dict) else c.state_dict(), 'weights.pt')\"")
        raise ConfigError(f"{what} holds pickled Python objects besides tensors, and a file named on the command "
                          f"line is loaded as tensors only (weights_only=True: loading pickles runs their code); if "
                          f"you trust the file, convert it once with {convert} and pass "
                          f"{named('weights.pt', key)}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise ConfigError(f"{what} is not a file torch.load can read: {_first_line(err)}") from None
    return _state_dict(obj, what), digest


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _state_dict(obj, what: str) -> dict[str, Tensor]:
    """The mapping of names to tensors at the top of a checkpoint or under one of CONTAINERS."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        for name in CONTAINERS:
            if isinstance(obj.get(name), Mapping):
                return _state_dict(obj[name], what)
    raise ConfigError(f"{what} holds no state dict: expected a mapping of names to tensors, at the top or under "
                      f"one of {', '.join(CONTAINERS)}")


def _readings(state: dict[str, Tensor], model: nn.Module) -> list[dict[str, Tensor]]:
    """The ways to read the file's keys: as saved, without wrapper prefixes (the keys without the prefix dropped,
    as a LightningModule's loss buffers), and each of those in RobustBench's layout when the model has one."""
    readings, todo = [], [state]
    while todo:
        current = todo.pop()
        readings.append(current)
        for prefix in PREFIXES:
            stripped = {k[len(prefix):]: v for k, v in current.items() if k.startswith(prefix)}
            if stripped:
                todo.append(stripped)
    layout = getattr(model, "robustbench", None)
    return readings + ([layout.to_ours(r) for r in readings] if layout is not None else [])


def load_weights(model: nn.Module, state: dict[str, Tensor], what: str) -> nn.Module:
    """Loads ``state`` into ``model`` under the reading of its keys that fits best. A file without the input
    normalisation keeps the model's (the config's dataset statistics), saying so; any other missing or unexpected
    key, or a shape that differs, is one ConfigError naming them."""
    expected = model.state_dict()
    best = max(_readings(state, model), key=lambda r: (len(r.keys() & expected.keys()), -len(r.keys() - expected)))
    missing = [k for k in expected if k not in best]
    kept = [k for k in missing if k in NORMALISATION]
    missing = [k for k in missing if k not in NORMALISATION]
    unexpected = [k for k in best if k not in expected]
    shapes = [f"{k} (file {tuple(best[k].shape)}, model {tuple(v.shape)})" for k, v in expected.items()
              if k in best and best[k].shape != v.shape]
    if missing or unexpected or shapes:
        arch = getattr(model, "architecture", type(model).__name__)
        problems = [f"{len(items)} {kind} ({', '.join(items[:SHOWN])}{', ...' if len(items) > SHOWN else ''})"
                    for kind, items in (("keys missing", missing), ("unexpected keys", unexpected),
                                        ("keys of another shape", shapes)) if items]
        raise ConfigError(f"{what} does not fit the configured model {arch}: {'; '.join(problems)}; choose the "
                          f"model= (and its depth, width) the file was trained with")
    if kept:
        log.warning("%s has no input normalisation (%s): the model keeps the config's, mean %s, std %s; a model "
                    "trained on inputs in [0, 1] as they are needs model.mean=[0,...] model.std=[1,...]", what,
                    ", ".join(kept), expected["mean"].flatten().tolist(), expected["std"].flatten().tolist())
    model.load_state_dict({**{k: expected[k] for k in kept}, **best})
    return model


def model_file(model: nn.Module, path: str, key: str | None) -> ModelFile:
    """``model`` with the weights of the file at ``key=path`` (or the argument ``path``), in eval mode."""
    state, digest = read_tensors(path, key)
    return ModelFile(load_weights(model, state, named(path, key)).eval(), str(path), digest)
