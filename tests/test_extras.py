"""Options that need an optional dependency say which extra to install."""

import importlib.util
import sys

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


def test_without_faiss_the_run_stops_in_one_line_naming_the_cpu_and_gpu_extras(monkeypatch):
    """The base dependencies hold no FAISS (faiss-cpu and faiss-gpu overwrite each other's module), so an
    install without either extra is told which to add, before any work and where FAISS is first used."""
    from ssat.clustering.kmeans import faiss_lib
    from ssat.config import check_faiss

    check_faiss()
    assert faiss_lib().IndexFlatL2(2).d == 2
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr("ssat.config.util.find_spec", lambda name: None if name == "faiss" else real_find_spec(name))
    with pytest.raises(ConfigError, match=r"FAISS is not installed; .* pip install -e '\.\[cpu\]', or '\.\[gpu\]'"):
        check_faiss()
    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` meets when no wheel installed it
    with pytest.raises(ConfigError, match="FAISS is not installed"):
        faiss_lib()
