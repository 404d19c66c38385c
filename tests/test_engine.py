"""pab.engine.EngineOptions: one definition of the engine's switches for the pipeline, serving and the CLIs."""

import argparse

import pytest
from pydantic import ValidationError

from pab.engine import EngineOptions


def test_flags_come_from_the_fields():
    """`add_arguments` makes a --flag / --no-flag per field, described as the field is, defaulting as it does;
    `from_args` reads them back."""
    p = argparse.ArgumentParser()
    EngineOptions.add_arguments(p)
    flags = {a.dest: a for a in p._actions if a.dest != "help"}
    assert set(flags) == set(EngineOptions.model_fields)
    assert flags["cuda_graphs"].option_strings == ["--cuda-graphs", "--no-cuda-graphs"]
    assert all(a.help.startswith(EngineOptions.model_fields[name].description) for name, a in flags.items())
    assert EngineOptions.from_args(p.parse_args([])) == EngineOptions()
    assert EngineOptions().vae_kernels and not EngineOptions().cuda_graphs  # measured to pay / not yet
    opts = EngineOptions.from_args(p.parse_args(["--cuda-graphs", "--no-vae-kernels"]))
    assert opts.changed() == {"cuda_graphs": True, "vae_kernels": False} and not opts.compile


def test_unknown_switches_are_refused_by_name():
    """A misspelt switch (a worker's engine_options, a config's engine block) names itself."""
    with pytest.raises(ValidationError, match="cuda_graph"):
        EngineOptions(cuda_graph=True)
    assert EngineOptions().changed() == {}
