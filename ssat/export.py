"""``python -m ssat.export <run dir or model file> [overrides]``: the SSAT model as a state dict whose keys load
into RobustBench's definition of the same architecture, for inputs in [0, 1] as RobustBench feeds them:

    WideResNet-28-10, 34-10   robustbench.model_zoo.architectures.wide_resnet.WideResNet(depth, widen_factor)
    PreActResNet-18           robustbench.model_zoo.architectures.resnet.PreActResNet(PreActBlockV2, [2, 2, 2, 2],
                              bn_before_fc=True)   (Rice et al. 2020's; RobustBench's PreActResNet18() differs)

ssat's models normalise inside; RobustBench's models that normalise hold the statistics as the buffers ``mu`` and
``sigma`` (its Rice2020OverfittingNet, Rice2020OverfittingNetL2). The file holds them when the model normalises,
and leaves them out when it does not (mean 0, std 1), so that it loads strictly into the plain class.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

from ssat.checkpoints import model_file
from ssat.config import build, compose_job
from ssat.errors import FAILED, ConfigError, SsatError
from ssat.models import Classifier
from ssat.pipeline import load_data
from ssat.run_dir import target, target_parser

SUFFIX = "robustbench.pt"


def normalises(model: Classifier) -> bool:
    return not (bool((model.mean == 0).all()) and bool((model.std == 1).all()))


def robustbench_state(model: Classifier, image_size: int | None) -> dict[str, Tensor]:
    """The model's state dict in RobustBench's layout (``mu``/``sigma`` only when it normalises)."""
    layout = model.robustbench
    if layout is None:
        raise ConfigError(f"RobustBench has no definition that computes this {model.architecture}: export takes "
                          f"model=wrn28_10 or wrn34_10 (any depth and width) with model.activation=relu, or "
                          f"model=preact_resnet18")
    channels = model.mean.shape[1]
    if channels != layout.channels or image_size not in (None, layout.image_size):
        raise ConfigError(f"RobustBench's definition of {model.architecture} takes {layout.channels}x"
                          f"{layout.image_size}x{layout.image_size} images; this model was trained on {channels}-"
                          f"channel {image_size}x{image_size} ones (dataset=digits32 is the digits at that shape)")
    state = layout.to_theirs(model.state_dict())
    if not normalises(model):
        del state["mu"], state["sigma"]
    return state


def loading_note(model: Classifier) -> str:
    definition = model.robustbench.definition.format(**model.definition_args())
    note = f"loads strictly into {definition}"
    if normalises(model):
        note += (" with the buffers mu and sigma and forward(x) = super().forward((x - self.mu) / self.sigma), as "
                 "RobustBench's normalising models (Rice2020OverfittingNet) define it")
    return note + "; inputs in [0, 1]"


def main(argv: list[str] | None = None) -> int:
    parser = target_parser("python -m ssat.export", __doc__)
    parser.add_argument("--out", type=Path, help=f"the exported file (default: <run dir>/{SUFFIX}, or "
                                                 f"<file>.{SUFFIX} beside a model file)")
    args = parser.parse_args(argv)
    try:
        found = target(args.target)
        cfg, _ = compose_job([*found.run_overrides, *args.overrides])
        if cfg.dataset.num_classes is None:  # an image folder's: its class folders say
            cfg.dataset.num_classes = load_data(cfg).num_classes
        model = model_file(build(cfg.model), str(found.model_file), None).model
        state = robustbench_state(model, cfg.dataset.image_size)
        out = args.out or (found.folder / SUFFIX if found.results is not None
                           else found.folder / f"{found.name}.{SUFFIX}")
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
    except SsatError as err:
        print(f"ssat.export: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        print(f"ssat.export: error: could not write {err.filename}: {err.strerror}", file=sys.stderr)
        return FAILED
    print(f"wrote {out}: {model.architecture} in RobustBench's layout; it {loading_note(model)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
