"""A stage of the pipeline, declared once: its name, the stages it needs, the config paths it reads, its code
version, whether every DDP rank runs it, and how it runs.

Keys are complete by construction: a stage's key hashes its name, version, the values at its declared paths and
its inputs' keys, and the stage runs on a *view* of the config in which every other value raises
``UndeclaredRead`` when it is read. A stage cannot depend on a setting its key leaves out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

if TYPE_CHECKING:
    from ssat.pipeline.runner import StageContext

# Where things are and how fast they are read, never what is computed: every stage may read them, no key holds
# them. (A data set's location is replaced in the data's key by a fingerprint of what was read there.)
UNKEYED = ("cache_dir", "logger", "loader", "dataset.root", "dataset.download", "pool.cache_dir", "pool.paths",
           "pool.root")
UNDECLARED = "ssat.undeclared"


class UndeclaredRead(RuntimeError):
    """A stage read a config value it does not declare: a bug in the stage's declaration, not the user's input."""


def _undeclared(path: str) -> None:
    raise UndeclaredRead(f"a stage read {path}, which its declaration does not list: add it to the stage's reads "
                         f"(its cache key would otherwise miss it)")


OmegaConf.register_new_resolver(UNDECLARED, _undeclared, replace=True)


@dataclass(frozen=True)
class When:
    """A path read only when the config value at ``condition`` is true (the intermediate model reads ``attack``
    only when ``intermediate.adversarial``), so that changing it elsewhere does not invalidate the stage."""

    condition: str
    path: str


@dataclass(frozen=True)
class Stage:
    """``run(ctx, out_dir) -> info`` computes the stage into ``out_dir`` (the cache's work folder); ``describe(ctx)``
    says in a few words what it is about to do. ``version`` is part of the key: bump it when what the stage computes
    changes (tests/test_stage_versions.py fails until it is, see ssat/pipeline/versions.py). A stage that is not ``cached`` (the data, the pool) is computed in
    memory on every run and returns its value; it has a key all the same, which its dependants' keys include."""

    name: str
    run: Callable[[StageContext, Path | None], Any]
    needs: tuple[str, ...] = ()
    reads: tuple[str | When, ...] = ()
    version: int = 1
    every_rank: bool = False
    cached: bool = True
    describe: Callable[[StageContext], str] = field(default=lambda ctx: "")
    check: Callable[[DictConfig, Any], None] | None = None  # (cfg, data): its settings, before any stage runs
    code: tuple[str, ...] = ()  # packages it runs code of that no import shows (built from a config's _target_)
    unkeyed: tuple[str, ...] = ()  # paths under its reads that it only checks: what it computes ignores them

    def paths(self, cfg: DictConfig) -> list[str]:
        """The declared paths that apply under this config."""
        return [r for r in self.reads if isinstance(r, str)] + [
            r.path for r in self.reads if isinstance(r, When) and bool(OmegaConf.select(cfg, r.condition))]


def plain(value: Any) -> Any:
    """A config node as plain, resolved containers (what a key hashes)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def is_under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def values_at(cfg: DictConfig, paths: Iterable[str], unkeyed: Iterable[str] = ()) -> dict[str, Any]:
    """{path: resolved value} for each path, the location-only settings (UNKEYED) and ``unkeyed`` left out at any
    depth."""
    left_out = (*UNKEYED, *unkeyed)
    out = {}
    for path in sorted(set(paths)):
        if is_under(path, left_out):
            continue
        value = plain(OmegaConf.select(cfg, path, throw_on_missing=True))
        out[path] = _without(value, path, left_out)
    return out


def _without(value: Any, path: str, left_out: tuple[str, ...]) -> Any:
    if not isinstance(value, dict):
        return value
    return {k: _without(v, f"{path}.{k}", left_out) for k, v in value.items() if not is_under(f"{path}.{k}", left_out)}


def stage_key(name: str, version: int, values: dict[str, Any], input_keys: dict[str, str]) -> str:
    """The one place a key is spelled: stage name and version, the values it reads, its inputs' keys."""
    payload = json.dumps({"stage": name, "version": version, "reads": values, "inputs": input_keys},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def restricted_view(cfg: DictConfig, paths: Iterable[str]) -> DictConfig:
    """The config as a stage may see it: the declared paths (and the UNKEYED ones) resolved, every other value an
    interpolation that raises UndeclaredRead when read. Read-only."""
    allowed = sorted(set(paths) | set(UNKEYED))

    def build(node: Any, path: str) -> Any:
        if path and is_under(path, allowed):
            return plain(OmegaConf.select(cfg, path))
        if isinstance(node, DictConfig) and (not path or any(a.startswith(path + ".") for a in allowed)):
            return {str(k): build(node._get_node(k), f"{path}.{k}" if path else str(k)) for k in node.keys()}
        return "${" + UNDECLARED + ":" + path + "}"

    view = OmegaConf.create(build(cfg, ""))
    OmegaConf.set_readonly(view, True)
    return view

