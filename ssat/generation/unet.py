"""The DDPM's UNet and noise scheduler: a small one built from a config, a local save_pretrained folder, or a hub id.

Everything that can be wrong with the model (not a UNet, wrong image size or channels, hub unreachable) is
checked here, before any long work, and reported in one line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler, UNet2DModel
from omegaconf import DictConfig, OmegaConf

from ssat.errors import ConfigError, DataError, SsatError

log = logging.getLogger("ssat")

TRAIN_TIMESTEPS = 1000
# Small enough to train on a CPU at 8x8 and 32x32: two levels, attention at the coarse one.
SMALL_UNET: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}
UNET_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"


def check_lambda(lam: float) -> None:
    if not lam >= 0:
        raise ConfigError(f"generation.lam={lam} must be >= 0")


def _plain(config: Mapping | DictConfig | None) -> dict[str, Any]:
    """Hydra lists become tuples, as diffusers' block arguments expect."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in (config or {}).items()}


def build_unet(image_size: int, channels: int, config: Mapping | DictConfig | None = None) -> UNet2DModel:
    """A fresh UNet for ``image_size`` x ``image_size`` images with ``channels`` channels; ``config`` overrides
    SMALL_UNET key by key (UNet2DModel's arguments)."""
    kwargs = {**SMALL_UNET, **_plain(config)}
    levels = len(kwargs["block_out_channels"])
    if image_size % 2 ** (levels - 1):
        raise ConfigError(f"generation.unet.block_out_channels has {levels} levels, which halve the image "
                          f"{levels - 1} times: the image size {image_size} must be divisible by {2 ** (levels - 1)}")
    try:
        return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, **kwargs)
    except (TypeError, ValueError, AttributeError) as err:
        raise ConfigError(f"generation.unet={kwargs} is not a valid UNet2DModel config: {err}") from None


def new_scheduler() -> DDPMScheduler:
    """The DDPM paper's schedule (linear betas 1e-4 to 0.02, 1000 steps), as google/ddpm-cifar10-32 uses."""
    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS)


def save_ddpm(unet: UNet2DModel, scheduler: DDPMScheduler, directory: Path) -> None:
    """UNet and scheduler config side by side in one folder, the layout of google/ddpm-cifar10-32."""
    unet.save_pretrained(directory)
    scheduler.save_pretrained(directory)


def _local_layout(path: Path) -> tuple[str | None, Path | None]:
    """The UNet's subfolder (the root, or a saved pipeline's unet/) and the folder with the scheduler config."""
    if (path / UNET_CONFIG).is_file():
        unet_sub = None
    elif (path / "unet" / UNET_CONFIG).is_file():
        unet_sub = "unet"
    else:
        raise DataError(f"generation.pretrained={str(path)!r} is a local path but not a diffusers UNet folder "
                        f"(no {UNET_CONFIG}); save one with UNet2DModel.save_pretrained")
    for folder in (path / (unet_sub or ""), path / "scheduler", path):
        if (folder / SCHEDULER_CONFIG).is_file():
            return unet_sub, folder
    return unet_sub, None


def check_unet_config(config: Mapping, source: str, image_size: int | None, channels: int | None) -> None:
    """The UNet must be a UNet2DModel for the data set's image size and channels."""
    if config.get("_class_name") != "UNet2DModel":
        raise DataError(f"generation.pretrained={source!r} holds a {config.get('_class_name')!r}, not a UNet2DModel")
    size = config.get("sample_size")
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if image_size is not None and size != (image_size, image_size):
        raise ConfigError(f"the UNet of generation.pretrained={source!r} makes {size[0]}x{size[1]} images but "
                          f"dataset.image_size={image_size}")
    for key in ("in_channels", "out_channels"):
        if channels is not None and config.get(key) != channels:
            raise ConfigError(f"the UNet of generation.pretrained={source!r} has {key}={config.get(key)} but "
                              f"dataset.channels={channels}")


@contextmanager
def _hub_errors(source: str):
    """Hub and network failures (many exception types) become one DataError line that says what to do."""
    try:
        yield
    except SsatError:
        raise
    except Exception as err:  # noqa: BLE001
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
        raise DataError(
            f"cannot load the DDPM {source!r} from the Hugging Face hub (offline?) and no local folder has that "
            f"name: {reason}; pass generation.pretrained=<local dir saved with save_pretrained> or "
            f"generation.pretrained=null to train a small UNet first") from None


def check_pretrained(source: str, image_size: int | None = None, channels: int | None = None) -> dict[str, Any]:
    """The UNet's config, checked against the data set; reads only the config, so it is cheap to call first."""
    path = Path(source).expanduser()
    if path.exists():
        unet_sub, _ = _local_layout(path)
        try:
            config = UNet2DModel.load_config(path, subfolder=unet_sub)
        except (OSError, ValueError) as err:
            raise DataError(f"generation.pretrained={source!r}: unreadable UNet config: {err}") from None
    else:
        with _hub_errors(source):
            config = UNet2DModel.load_config(source)
    check_unet_config(config, source, image_size, channels)
    return dict(config)


def load_ddpm(source: str, image_size: int | None = None,
              channels: int | None = None) -> tuple[UNet2DModel, DDPMScheduler]:
    """UNet and scheduler from a local folder (when ``source`` exists on disk) or else a Hugging Face hub id,
    checked against the data set's image size and channels."""
    check_pretrained(source, image_size, channels)
    path = Path(source).expanduser()
    if path.exists():
        unet_sub, scheduler_dir = _local_layout(path)
        try:
            unet = UNet2DModel.from_pretrained(path, subfolder=unet_sub, low_cpu_mem_usage=False)
        except (OSError, ValueError, RuntimeError) as err:
            raise DataError(f"generation.pretrained={source!r}: cannot load the UNet: {err}") from None
        if scheduler_dir is None:
            log.warning("%s has no %s: using the standard 1000-step linear DDPM schedule", source, SCHEDULER_CONFIG)
            scheduler = new_scheduler()
        else:
            scheduler = DDPMScheduler.from_pretrained(scheduler_dir)
    else:
        with _hub_errors(source):
            unet = UNet2DModel.from_pretrained(source, low_cpu_mem_usage=False)
            scheduler = DDPMScheduler.from_pretrained(source)
    if scheduler.config.prediction_type != "epsilon":
        raise DataError(f"generation.pretrained={source!r} predicts {scheduler.config.prediction_type!r}; "
                        f"guided fine-tuning needs an epsilon-prediction DDPM")
    return unet, scheduler
