"""A model from the user's file in place of a trained one: the intermediate model (``intermediate.checkpoint``),
the guidance classifier (``generation.classifier``) and the model ``python -m ssat.evaluate`` measures.

Two stages make it: an uncached one reads the file (tensors only, ssat.checkpoints), fits it to ``model`` and
fails before any work when it does not fit; its key holds the file's sha256, not its path, so a moved file keeps
the keys and a changed one gets new ones. A cached one then stands where the training stage would, with its name:
it writes the weights as that stage's model.pt, which the stages after it read as they read a trained model's,
and records the model's accuracy on the validation split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ssat.artifacts import ModelWeights
from ssat.checkpoints import ModelFile, model_file
from ssat.config import build
from ssat.pipeline.runner import StageContext
from ssat.pipeline.stage import Stage
from ssat.stages.evaluate import correct_flags


def file_stage(name: str, key: str, argument: bool = False) -> Stage:
    """The uncached stage whose value is a ModelFile: ``model`` with the weights of the file at ``key``.
    ``argument``: the user gave the file as a command's argument, so messages name the file alone."""

    def run(ctx: StageContext, out: Path | None) -> tuple[ModelFile, str]:
        loaded = model_file(build(ctx.cfg.model), OmegaConf.select(ctx.cfg, key), None if argument else key)
        return loaded, loaded.sha256

    return Stage(name, run, reads=(key, "model"), unkeyed=(key,), cached=False, code=("ssat.models",))


def saved_stage(name: str, source: Stage) -> Stage:
    """The cached stage ``name`` holding the weights of ``source``'s file as its model.pt."""

    def run(ctx: StageContext, out: Path) -> dict[str, Any]:
        loaded: ModelFile = ctx.value(source.name)
        ModelWeights.save(out, loaded.model.state_dict())
        data = ctx.value("data")
        val = correct_flags(loaded.model, data.val_images, data.val_labels, ctx.cfg.eval.batch_size, ctx.device,
                            desc="validation")
        return {"file": loaded.path, "sha256": loaded.sha256, "monitor": "val/acc",
                "best_val": float(val.mean()) if len(val) else None}

    def describe(ctx: StageContext) -> str:
        loaded: ModelFile = ctx.value(source.name)
        return f"{loaded.model.architecture} from {loaded.path} (sha256 {loaded.sha256[:12]}), not trained"

    return Stage(name, run, needs=(source.name, "data"), reads=("eval.batch_size", "trainer.accelerator"),
                 describe=describe, code=("ssat.models",))
