"""Typed experiment configs: round trip, unknown keys, overrides, validation messages, task registry."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from flatpeft.experiments import config as C
from flatpeft.experiments import tasks as T

REPO = Path(__file__).resolve().parents[1]


def test_round_trip_through_yaml(tmp_path):
    cfg = C.config_from_dict({"model": "some/model", "data": {"shots": 4, "train": "a.csv", "test": "b.jsonl"},
                              "method": {"name": "flatpo", "rho": 0.1, "fraction": 0.2},
                              "train": {"steps": 7, "lr": 3e-4, "val_eval_steps": [2, 7]},
                              "peft": {"type": "prompt", "num_virtual_tokens": 4}, "task_args": {"x": 1}})
    path = C.save_config(cfg, tmp_path / "c.yaml")
    back = C.load_config(path)
    assert back == cfg
    assert back.train.lr == 3e-4 and isinstance(back.train.lr, float)
    assert back.method == {"name": "flatpo", "rho": 0.1, "fraction": 0.2}
    # and the written file is plain YAML with the documented top-level keys
    assert list(yaml.safe_load(path.read_text())) == ["task", "model", "data", "peft", "method", "train",
                                                       "task_args", "output_dir"]


def test_shipped_config_loads_and_round_trips(tmp_path):
    cfg = C.load_config(REPO / "configs" / "finefoods_fewshot.yaml")
    assert cfg.model == "builtin:minilm" and cfg.data.train == "builtin:finefoods/train"
    assert (cfg.data.shots, cfg.data.max_length, cfg.data.val_size) == (16, 128, 400)
    assert (cfg.peft.type, cfg.peft.r, cfg.peft.alpha, cfg.peft.dropout) == ("lora", 8, 16, 0.0)
    assert cfg.peft.target_modules == ["query", "value"] and cfg.train.batch_size == 16
    assert C.load_config(C.save_config(cfg, tmp_path / "x.yaml")) == cfg


def test_every_field_has_default_and_help():
    for cls in (C.ExperimentConfig, C.DataConfig, C.PeftSettings, C.TrainConfig):
        cls()  # all defaults
        for f in dataclasses.fields(cls):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
            assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name} has no help text"


@pytest.mark.parametrize("raw, names", [
    ({"modle": "x"}, ["modle", "model", "task", "output_dir"]),
    ({"data": {"shot": 3}}, ["data.shot", "shots", "label_column"]),
    ({"train": {"step": 3}}, ["train.step", "steps", "batch_size"]),
    ({"peft": {"rank": 3}}, ["peft.rank", "target_modules"]),
])
def test_unknown_keys_are_named_with_the_valid_ones(raw, names):
    with pytest.raises(ValueError) as err:
        C.config_from_dict(raw)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("raw, needle", [
    ({"peft": {"type": "adalora"}}, "peft.type"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"lr": -1.0}}, "train.lr"),
    ({"train": {"eval_splits": ["dev"]}}, "train.eval_splits"),
    ({"train": {"steps": 5, "val_eval_steps": [6]}}, "train.val_eval_steps"),
    ({"data": {"shots": 0}}, "data.shots"),
    ({"method": {"rho": 0.1}}, "method"),
    ({"data": "x.csv"}, "data must be a mapping"),
])
def test_bad_values_name_the_field(raw, needle):
    with pytest.raises(ValueError, match=needle):
        C.config_from_dict(raw)


def test_overrides_parse_yaml_and_reach_nested_fields(tmp_path):
    path = C.save_config(C.ExperimentConfig(), tmp_path / "c.yaml")
    cfg = C.load_config(path, ["train.lr=1e-3", "train.steps=12", "peft.target_modules=[query, key]",
                               "method.name=sam", "method.rho=0.2", "task_args.anything=true", "task_args.word=yes", "data.shots=null"])
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 12
    assert cfg.peft.target_modules == ["query", "key"]
    assert cfg.method == {"name": "sam", "rho": 0.2}
    assert cfg.task_args == {"anything": True, "word": "yes"}  # YAML 1.2: only true / false are booleans
    assert cfg.data.shots is None


def test_overrides_are_validated_like_file_keys(tmp_path):
    path = C.save_config(C.ExperimentConfig(), tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="train.stepz"):
        C.load_config(path, ["train.stepz=3"])
    with pytest.raises(ValueError, match="key.sub=value"):
        C.load_config(path, ["train.steps"])
    with pytest.raises(ValueError, match="train.steps"):
        C.load_config(path, ["train.steps=-4"])
    with pytest.raises(ValueError, match="not a section"):
        C.load_config(path, ["model.x=1"])


def test_missing_config_and_data_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="nope.yaml"):
        C.load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match=r"data\.train.*missing\.csv"):
        C.resolve_data_path(str(tmp_path / "missing.csv"), "data.train")
    with pytest.raises(ValueError, match="builtin:finefoods/train"):
        C.resolve_data_path("builtin:nosuch/train", "data.train")
    with pytest.raises(ValueError, match="builtin:minilm"):
        C.resolve_model_path("builtin:gpt5")


def test_absolutize_paths_is_idempotent(tmp_path, monkeypatch):
    (tmp_path / "d.csv").write_text("text,label\na,0\n")
    monkeypatch.chdir(tmp_path)
    cfg = C.config_from_dict({"data": {"train": "d.csv", "test": "builtin:finefoods/test"}, "model": "org/name"})
    a = C.absolutize_paths(cfg)
    assert a.data.train == str(tmp_path / "d.csv") and a.data.test == "builtin:finefoods/test"
    assert a.model == "org/name"
    assert C.absolutize_paths(a) == a


def test_yaml_floats_without_dot():
    assert C.safe_load_yaml("a: 5e-4\nb: 1E3\nc: 7\nd: .5") == {"a": 5e-4, "b": 1000.0, "c": 7, "d": 0.5}


def test_task_registry_lists_valid_names():
    with pytest.raises(ValueError) as err:
        T.get_task("no_such_task")
    assert "text_classification" in str(err.value) and "no_such_task" in str(err.value)
    assert T.get_task("text_classification").name == "text_classification"
    assert "text_classification" in T.available_tasks()


def test_register_task_rejects_duplicates_and_non_tasks():
    @T.register_task("_test_dummy_task")
    class Dummy(T.Task):
        def train_batches(self):
            yield None

        def loss(self, model, batch):
            return None

        def evaluate(self, model, split="test"):
            return {"accuracy": 0.0}

    try:
        assert T.get_task("_test_dummy_task") is Dummy
        with pytest.raises(ValueError, match="already registered"):
            T.register_task("_test_dummy_task")(type("Other", (Dummy,), {}))
        with pytest.raises(ValueError, match="not a Task subclass"):
            T.register_task("_test_other")(object)
    finally:
        T.TASKS.pop("_test_dummy_task", None)


def test_task_args_unknown_key_rejected():
    @dataclasses.dataclass
    class Args:
        alpha: float = 1.0

    with pytest.raises(ValueError, match=r"task_args\.beta.*alpha"):
        C.parse_dataclass(Args, {"beta": 2}, "task_args.")
    assert C.parse_dataclass(Args, {"alpha": 3.0}, "task_args.") == Args(3.0)


def test_docs_config_key_table_is_the_config_fields_help():
    """docs/cli.md's key table is generated from the config fields (defaults and help), so it cannot drift."""
    from pathlib import Path

    from flatpeft.experiments.config import config_key_table

    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    begin, end = "<!-- config-keys: begin -->", "<!-- config-keys: end -->"
    assert text.split(begin, 1)[1].split(end, 1)[0].strip() == config_key_table().strip(), (
        "docs/cli.md is out of date: run python scripts/methods_table.py")
