"""Config values mean one thing (issue 20, round two): YAML 1.2 scalars, duplicate keys, bounded aliases, short
values in errors, one validation for ``config`` / ``train`` / ``compare``, and data / model checks that refuse
before anything trains. Each case: the error names the key (or file and line), exit status 2, nothing written."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import _fixtures as F
from flatpeft import cli, create_optimizer
from flatpeft.experiments import config as C
from flatpeft.experiments.runner import compare

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return F.tiny_config(tmp_path_factory.mktemp("tiny"), train={"steps": 2, "log_every": 1})


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    return C.save_config(tiny, tmp_path_factory.mktemp("cfg") / "tiny.yaml")


def run(argv, capsys):
    code = cli.main(["--quiet", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return code, out, err


def sets(*overrides):
    return sum((["--set", o] for o in overrides), [])


# ------------------------------------------------------------------ 13. YAML 1.2 core scalars
@pytest.mark.parametrize("text, value", [
    ("010", 10), ("1:30", "1:30"), ("0o17", 15), ("0x1f", 31), ("5e-4", 5e-4), ("1.5", 1.5), ("-3", -3),
    ("yes", "yes"), ("off", "off"), ("true", True), ("False", False), ("null", None), ("~", None),
    ("2024-01-01", "2024-01-01"), ("1_000", "1_000"), (".inf", float("inf")),
])
def test_scalars_are_read_as_yaml_1_2_core(text, value):
    assert C.safe_load_yaml(f"a: {text}") == {"a": value}
    assert C.parse_override(f"x.y={text}")[1] == value


def test_set_seed_010_is_ten_and_steps_1_30_is_a_type_error(tiny_file):
    assert C.load_config(tiny_file, ["train.seed=010"]).train.seed == 10
    with pytest.raises(ValueError, match=r"train.steps: expected an integer, got '1:30' \(str\)"):
        C.load_config(tiny_file, ["train.steps=1:30"])


def test_strings_that_look_like_other_types_round_trip(tmp_path):
    cfg = C.config_from_dict({"data": {"text_column": "0o17", "label_column": "1e5"},
                              "task_args": {"a": "010", "b": "yes", "c": "1:30", "d": "TRUE"}})
    back = C.load_config(C.save_config(cfg, tmp_path / "c.yaml"))
    assert back == cfg and back.data.text_column == "0o17" and back.task_args["d"] == "TRUE"


# ------------------------------------------------------------------ 12. duplicated mapping keys
@pytest.mark.parametrize("text, needles", [
    ("train: {steps: 3}\ndata: {shots: 4}\npeft: {r: 2}\ndata: {val_size: 3}\n",
     ["line 4: duplicate key 'data' (also on line 2)"]),
    ("train:\n  steps: 3\n  lr: 0.1\n  steps: 5\n", ["line 4: duplicate key 'steps' (also on line 2)"]),
])
def test_duplicate_keys_are_refused_naming_key_and_lines(tmp_path, text, needles):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        C.load_config(path)
    for needle in needles:
        assert needle in str(err.value)
    with pytest.raises(ValueError, match="--set task_args: line 1: duplicate key 'a'"):
        C.parse_override("task_args={a: 1, a: 2}")


def test_merge_keys_are_no_duplicates():
    text = "base: &b {steps: 3, lr: 0.1}\ntrain: {<<: *b, steps: 5}\n"
    assert C.safe_load_yaml(text)["train"] == {"steps": 5, "lr": 0.1}


# ------------------------------------------------------------------ hang: nested aliases, whole values in errors
def _laughs(levels: int, tail: str) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n" + tail + "\n"


def test_billion_laughs_is_refused_at_once(tmp_path, capsys):
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs(9, "train: {seed: *a8}"))
    assert path.stat().st_size < 500
    start = time.perf_counter()
    code, out, err = run(["config", path], capsys)
    assert time.perf_counter() - start < 20  # was 28 s and 522 MB of error text
    assert code == 2 and out == "" and len(err) < 500
    assert "laughs.yaml" in err and "aliases" in err and f"more than {C.MAX_CONFIG_VALUES}" in err


def test_recursive_alias_is_refused():
    with pytest.raises(C.yaml.YAMLError, match="recursive alias"):
        C.safe_load_yaml("a: &x [1, *x]")


@pytest.mark.parametrize("command", ["config", "train"])
def test_errors_show_at_most_a_short_value(command, tiny_file, tmp_path, capsys):
    big = "[" + ",".join(["[" + ",".join(['"lol"'] * 9) + "]"] * 800) + "]"  # 7200 values where an integer belongs
    code, _, err = run([command, tiny_file, "--set", f"train.seed={big}", "--output-dir", tmp_path / "o"], capsys)
    assert code == 2 and "train.seed: expected an integer" in err and len(err) < 600
    assert not (tmp_path / "o").exists()


def test_short_repr_is_bounded_and_cheap():
    from flatpeft._checks import short_repr

    huge = [["x" * 1000] * 1000] * 1000
    start = time.perf_counter()
    text = short_repr(huge)
    assert len(text) <= 200 and time.perf_counter() - start < 1
    assert short_repr("abc") == "'abc'"


# ------------------------------------------------------------------ 14 (+10, keywords, seeds): one validation
BAD = [
    (["train.seed=-1"], ["train.seed", "-1", "0 .. 2**32 - 1"]),
    (["train.seed=100000000000000000000"], ["train.seed", "100000000000000000000"]),
    (["train.seed=1e20"], ["train.seed", "expected an integer"]),
    (["train.seed=abc"], ["train.seed", "'abc'"]),
    (["data.val_seed=-5"], ["data.val_seed", "-5"]),
    (["train.device=meta"], ["train.device", "'meta'"]),
    (["model=builtin:foo"], ["model", "builtin:foo", "builtin:minilm"]),
    (["train.steps=1:30"], ["train.steps", "'1:30'"]),
    (["method.lr=0.5"], ["method.lr", "train.lr"]),
    (["method.base_optimizer=sgd"], ["method.base_optimizer", "train.base_optimizer"]),
    (["method.total_steps=3"], ["method.total_steps", "train.steps"]),
    (["method.weight_decay=0.1"], ["method.weight_decay", "train.weight_decay"]),
    (["train.weight_decay=abc"], ["train.weight_decay", "'abc'"]),
    (["method.betas=[0.9]"], ["betas", "[0.9]", "list of 2 numbers"]),
    (["method.betas=abc"], ["betas", "'abc'"]),
    (["method.eps=[1]"], ["eps", "[1]", "a number"]),
    (["method.amsgrad=3"], ["amsgrad", "true or false"]),
    (["method.seed=abc"], ["method.seed", "'abc'"]),
    (["method.seed=-2"], ["method.seed", "-2"]),
    (["method.name=sam", "method.replay_rng=abc"], ["replay_rng", "'abc'"]),
    (["method.name=flatpo", "method.selection=[1]"], ["selection", "[1]", "a string"]),
    (["data.test=null", "train.eval_splits=[val]", "task_args.shift=drinks"], ["task_args.shift", "data.test"]),
    (["data.val_size=0", "train.eval_splits=[test, val]"], ["data.val_size is 0", "no validation split"]),
    (["data.val_size=0", "train.val_eval_steps=[1]"], ["data.val_size is 0", "train.val_eval_steps"]),
]


@pytest.mark.parametrize("overrides, needles", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) and "=" in v[0]
                         else None)
@pytest.mark.parametrize("command", ["config", "train"])
def test_config_and_train_refuse_alike(command, overrides, needles, tiny_file, tmp_path, capsys):
    code, out, err = run([command, tiny_file, *sets(*overrides), "--output-dir", tmp_path / "o"], capsys)
    assert code == 2 and out == "" and err.startswith("flatpeft: error:"), err
    for needle in needles:
        assert needle in err, err
    assert list(tmp_path.iterdir()) == []  # no run, no lock: refused before anything was written


@pytest.mark.parametrize("command", ["config", "train", "compare"])
def test_empty_output_dir_is_refused(command, tiny_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--quiet", command, str(tiny_file), "--output-dir", ""])
    assert exc.value.code == 2 and "--output-dir: must not be empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_config_prints_what_train_would_run(tiny_file, capsys):
    code, out, _ = run(["config", tiny_file, "--set", "train.seed=010", "--set", "data.label_column='0o17'"], capsys)
    assert code == 0
    printed = C.safe_load_yaml(out)
    assert printed["train"]["seed"] == 10 and printed["data"]["label_column"] == "0o17"


@pytest.mark.parametrize("seeds, needle", [("2", "seed 4294967296"), ("4294967295,4294967296", "seed 4294967296")])
def test_compare_checks_every_seed_before_training(tiny, tmp_path, seeds, needle, capsys):
    cfg = C.config_from_dict({**C.config_to_dict(tiny), "train": {**C.config_to_dict(tiny)["train"],
                                                                   "seed": 4294967295}})
    with pytest.raises(ValueError, match=needle):
        compare(cfg, ["base"], cli._parse_seeds(seeds), out_dir=tmp_path / "cmp", progress=False)
    assert not (tmp_path / "cmp").exists()


def test_optimizer_keywords_of_the_wrong_type_are_named():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"Invalid betas: \[0.9\] \(must be a list of 2 numbers"):
        create_optimizer(model, "base", betas=[0.9])
    with pytest.raises(ValueError, match="Invalid weight_decay: 'abc'"):
        create_optimizer(model, "base", weight_decay="abc")
    with pytest.raises(ValueError, match="Invalid seed: 'abc'"):
        create_optimizer(model, "sam", seed="abc")
    opt = create_optimizer(model, "base", betas=(0.8, 0.9), lr=torch.tensor(0.01), amsgrad=True)
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["amsgrad"] is True


# ------------------------------------------------------------------ 9, 11, positions, empty files: before training
def _train(argv, capsys, tiny_file, tmp_path):
    code, out, err = run(["train", tiny_file, *argv, "--output-dir", tmp_path / "o"], capsys)
    assert code == 2 and out == "", err
    assert not (tmp_path / "o").exists()  # refused before training: no run directory
    return err


@pytest.mark.parametrize("labels, needles", [
    ([1, "1"], ["train.jsonl:3", "label '1'", "a string", "train.jsonl:2 has label 1, a number"]),
    (["great", 1], ["train.jsonl:3", "label 1", "a number", "'great', a string"]),
    ([True, 1], ["a boolean"]),
])
def test_mixed_label_types_are_refused_naming_file_and_line(tiny_file, tmp_path, capsys, labels, needles):
    path = tmp_path / "train.jsonl"
    rows = [{"text": "good tea", "label": labels[i % 2]} for i in range(40)]
    path.write_text("\n" + "\n".join(json.dumps(r) for r in rows) + "\n")  # line 1 blank: lines, not rows, are named
    err = _train(["--set", f"data.train={path}", "--set", "data.val_size=0", "--set", "data.shots=2"], capsys,
                 tiny_file, tmp_path)
    assert "data.train" in err
    for needle in needles:
        assert needle in err, err


def test_labels_of_one_kind_pass():
    from flatpeft.experiments.text_classification import check_label_types

    df = pd.DataFrame({"label": [0, 1, 1, None]})
    check_label_types(df, "label", Path("x.jsonl"), "data.train")  # numbers and a missing label: fine


def test_module_names_match_the_way_peft_matches_them():
    from collections import OrderedDict

    from flatpeft.experiments.tasks import check_module_names

    model = torch.nn.Sequential(OrderedDict(body=torch.nn.Sequential(OrderedDict(head=torch.nn.Linear(2, 2)))))
    check_module_names(model, ["head", "body.head"], "peft.modules_to_save", "m")  # suffixes of module names
    with pytest.raises(ValueError, match="peft.modules_to_save: no module of 'm' is named 'tail'"):
        check_module_names(model, ["head", "tail"], "peft.modules_to_save", "m")


def test_unknown_modules_to_save_is_refused(tiny_file, tmp_path, capsys):
    err = _train(["--set", "peft.modules_to_save=[classifier, nosuch]"], capsys, tiny_file, tmp_path)
    assert "peft.modules_to_save" in err and "'nosuch'" in err and "classifier" in err


@pytest.mark.parametrize("overrides, needles", [
    (["data.max_length=65"], ["data.max_length=65", "64 positions"]),
    (["peft.type=prompt", "peft.num_virtual_tokens=60"],
     ["data.max_length=16 + peft.num_virtual_tokens=60 = 76", "64 positions"]),
])
def test_sequences_longer_than_the_positions_are_refused(tiny_file, tmp_path, capsys, overrides, needles):
    err = _train(sets(*overrides), capsys, tiny_file, tmp_path)
    for needle in needles:
        assert needle in err, err


def test_header_only_test_file_is_refused_before_training(tiny_file, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    err = _train(["--set", f"data.test={empty}"], capsys, tiny_file, tmp_path)
    assert "data.test" in err and "empty.csv holds no examples" in err


def test_too_few_examples_names_the_label_and_file(tiny_file, tmp_path, capsys):
    err = _train(["--set", "data.shots=100"], capsys, tiny_file, tmp_path)
    assert "class 'great' has only" in err and "train.csv" in err and "data.shots=100" in err


def test_negative_threads_is_refused(tmp_path, capsys):
    code, _, err = run(["suite", tmp_path / "plan.yaml", "--threads", "-1"], capsys)
    assert code == 2 and "--threads" in err and "-1" in err
