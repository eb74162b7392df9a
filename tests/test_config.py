from pathlib import Path

import pytest
import yaml

from tinycompress.config import Config, load_config
from tinycompress.errors import TinycompressError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_then_yaml_then_flags(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("task: cola\nfinetune:\n  epochs: 7\n  batch_size: 8\n")
    config = load_config(file, {"finetune.epochs": 2, "seed": None})
    assert config.task == "cola"
    assert config.finetune.epochs == 2  # flag beats YAML
    assert config.finetune.batch_size == 8  # YAML beats default
    assert config.finetune.learning_rate == Config().finetune.learning_rate  # default
    assert config.seed == 42  # a flag left unset (None) does not override


def test_round_trip_through_yaml(tmp_path):
    config = load_config(None, {"task": "mrpc", "prune.ratio": 0.25, "quantize.backend": "torch"})
    file = tmp_path / "resolved.yaml"
    file.write_text(yaml.safe_dump(config.to_dict()))
    assert load_config(file) == config


def test_every_problem_listed_once(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("finetune:\n  epochs: three\n  lr: 0.1\nprune:\n  ratio: 1.5\ncolour: red\n")
    with pytest.raises(TinycompressError) as info:
        load_config(file)
    message = info.value.one_line()
    assert "\n" not in message
    for problem in ("finetune.epochs", "finetune.lr: unknown key", "prune.ratio", "colour: unknown key"):
        assert problem in message


def test_malformed_yaml_names_file_and_line(tmp_path):
    file = tmp_path / "broken.yaml"
    file.write_text("task: sst2\nfinetune: [epochs: 3\n")
    with pytest.raises(TinycompressError, match=r"broken.yaml:\d+"):
        load_config(file)


def test_missing_config_file():
    with pytest.raises(TinycompressError, match="config file not found"):
        load_config("/nonexistent/x.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid_and_documented(path):
    config = load_config(path)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# tinycompress ") and f"configs/{path.name}" in first_line
    from tinycompress.data.tasks import get_task

    get_task(config.task)


def test_one_config_per_task_and_hub_models():
    names = {p.stem for p in (REPO / "configs").glob("*.yaml")}
    from tinycompress.data.tasks import TASKS

    assert set(TASKS) | {"tinybert-sst2", "distilbert-sst2"} <= names
    assert load_config(REPO / "configs/tinybert-sst2.yaml").model.name == "huawei-noah/TinyBERT_General_4L_312D"
    assert load_config(REPO / "configs/distilbert-sst2.yaml").model.name == "distilbert-base-uncased"
