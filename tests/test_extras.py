"""Options that need an optional dependency say which extra to install."""

import pytest

from ssat.config import check_extras
from ssat.errors import ConfigError


def test_an_option_whose_extra_is_missing_fails_in_one_line(monkeypatch):
    monkeypatch.setattr("ssat.config.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"logger=wandb needs the extra 'wandb': pip install -e '\.\[wandb\]'"):
        check_extras([("selector", "random"), ("logger", "wandb")])
    with pytest.raises(ConfigError, match=r"hydra/launcher=slurm needs the extra 'slurm'"):
        check_extras([("hydra/launcher", "slurm"), ("budget", "0.1")])
    check_extras([("logger", "csv"), ("hydra/launcher", "basic")])  # the defaults need nothing extra
