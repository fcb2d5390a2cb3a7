"""The LLaMA-Factory launcher's config handling, without LLaMA-Factory: which keys are flatpeft's, what is checked
before LLaMA-Factory starts, and the messages (the runs themselves: tests/test_llamafactory.py, -m llamafactory)."""
from __future__ import annotations

import importlib.util

import pytest
import yaml

pytest.importorskip("transformers")

from flatpeft.integrations import llamafactory as lf

BASE = {"model_name_or_path": "m", "stage": "sft", "do_train": True, "learning_rate": 1e-4, "output_dir": "out"}


def test_flatpeft_keys_are_split_off():
    """``flatpeft_*`` keys leave the config LLaMA-Factory sees; flat keywords and ``flatpeft_kwargs`` merge."""
    config = {**BASE, "flatpeft_method": "flatpo", "flatpeft_rho": 0.1, "flatpeft_kwargs": {"fraction": 0.2, "betas": [0.9, 0.95]},
              "flatpeft_sync_ascent_grad": True}
    rest, settings = lf.split_config(config, "cfg.yaml")
    assert rest == BASE
    assert settings == lf.FlatpeftSettings("flatpo", {"rho": 0.1, "fraction": 0.2, "betas": [0.9, 0.95]}, True)


@pytest.mark.parametrize("extra,match", [
    ({}, "cfg.yaml: flatpeft_method is required"),
    ({"flatpeft_method": "nosuch"}, "cfg.yaml: flatpeft_method: Unknown method 'nosuch'"),
    ({"flatpeft_method": "sam", "flatpeft_fraction": 0.1}, "cfg.yaml: flatpeft_fraction is not a keyword of method 'sam'"),
    ({"flatpeft_method": "sam", "flatpeft_kwargs": [1]}, "cfg.yaml: flatpeft_kwargs must be a mapping"),
    ({"flatpeft_method": "sam", "flatpeft_rho": 0.1, "flatpeft_kwargs": {"rho": 0.2}}, "flatpeft_rho given both"),
    ({"flatpeft_method": "sam", "flatpeft_sync_ascent_grad": "yes"}, "flatpeft_sync_ascent_grad must be true or false"),
    ({"flatpeft_method": "sam", "stage": "ppo"}, "cfg.yaml: stage: 'ppo' is not supported"),
])
def test_bad_flatpeft_keys_name_the_file_and_key(tmp_path, extra, match):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, **extra}))
    with pytest.raises(ValueError, match=match.replace("cfg.yaml", str(path)).replace("(", r"\(")):
        lf.prepare(path)


def test_overrides_are_read_as_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, "flatpeft_method": "sam"}))
    rest, settings = lf.prepare(path, ["flatpeft_rho=0.1", "max_steps=2", "output_dir=runs/x", "flatpeft_method=flatpo"])
    assert rest["max_steps"] == 2 and rest["output_dir"] == "runs/x"
    assert settings.method == "flatpo" and settings.kwargs == {"rho": 0.1}
    with pytest.raises(ValueError, match="override 'max_steps': expected key=value"):
        lf.prepare(path, ["max_steps"])
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping of LLaMA-Factory keys, got list"):
        lf.prepare(path)


def test_command_line_checks_before_llamafactory_runs(tmp_path, capsys):
    """A bad key exits with status 2 and one line naming it; nothing is written."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "out"), "flatpeft_method": "sam",
                                    "flatpeft_fraction": 0.1}))
    assert lf.main(["train", str(path)]) == 2
    assert f"error: {path}: flatpeft_fraction is not a keyword of method 'sam'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("llamafactory") is not None, reason="LLaMA-Factory is installed")
def test_without_llamafactory_the_extra_is_named(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, "flatpeft_method": "sam"}))
    assert lf.main(["train", str(path)]) == 2
    assert "pip install 'flatpeft[llamafactory]'" in capsys.readouterr().err
    with pytest.raises(ImportError, match="flatpeft\\[llamafactory\\]"):
        lf.train(path)
