"""The config loader refuses every malformed or mistyped config with one TinycompressError.

Non-UTF-8 files, non-string keys, deep nesting (which used to overflow Python's recursion
limit), lax type coercion (``epochs: true`` -> 1) and non-finite numbers; plus property-based
tests (hypothesis) that nothing but a Config or a TinycompressError ever comes out.
"""

from __future__ import annotations

import math
import sys
import tempfile
import types
import typing
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner

from tinycompress.cli.app import app
from tinycompress.config import MAX_DEPTH, Config, config_from_dict, load_config, parse_yaml
from tinycompress.errors import TinycompressError

runner = CliRunner()


def short_id(value: object) -> str:
    return repr(value)[:40]


def write(tmp_path: Path, text: str | bytes, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, overrides: dict | None = None) -> str:
    with pytest.raises(TinycompressError) as info:
        load_config(path, overrides)
    message = info.value.one_line()
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------ encodings


@pytest.mark.parametrize(
    "data, needle",
    [
        ("task: sst2\n".encode("utf-16"), "UTF-16"),  # with its byte-order mark
        (b"\xff\xfe" + b"task: sst2\n", "UTF-16"),
        ("model: {name: caf\xe9}\n".encode("latin-1"), "not UTF-8"),
    ],
    ids=["utf16-bom", "fffe-prefix", "latin1"],
)
def test_non_utf8_config_is_one_error_naming_the_file(tmp_path, data, needle):
    message = error_of(write(tmp_path, data, "odd.yaml"))
    assert needle in message and "odd.yaml" in message


def test_utf8_bom_and_non_ascii_text_are_fine(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbf" + "model: {name: café}\n".encode())
    assert load_config(path).model.name == "café"


def test_missing_config_file_keeps_its_message_and_hint(tmp_path):
    message = error_of(tmp_path / "nope.yaml")
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in message
    assert "pass an existing YAML file to --config (see configs/)" in message


def test_a_folder_as_config_file(tmp_path):
    assert "is a folder" in error_of(tmp_path)


# ------------------------------------------------------------------------------ keys and nesting


@pytest.mark.parametrize(
    "text, where",
    [
        ("1: 2\n", "key 1 (int)"),
        ("null: 1\n", "key null (null)"),
        ("true: x\n", "key true (bool)"),
        ("prune: {1: 2}\n", "prune: key 1 (int)"),
        ("prune:\n  ratio: 0.2\n  2.5: x\n", "prune: key 2.5 (float)"),
        ("finetune:\n  ~: 3\n", "finetune: key null (null)"),
    ],
    ids=short_id,
)
def test_non_string_key_names_file_and_key_path(tmp_path, text, where):
    message = error_of(write(tmp_path, text))
    assert "cfg.yaml" in message and where in message and "not a setting name" in message


@pytest.mark.parametrize("depth", [500, 10_000])
@pytest.mark.parametrize("opening", ["[", "{a: ", "- "], ids=["flow-list", "flow-map", "block-list"])
def test_deep_nesting_is_refused_without_recursion_error(tmp_path, depth, opening):
    text = opening * depth + ("x\n" if opening == "- " else "")  # "- - - x": compact nested block lists
    message = error_of(write(tmp_path, text))
    assert "nested too deeply" in message and "cfg.yaml" in message


def test_nesting_through_aliases_is_refused(tmp_path):
    for text in ("a: &a [*a]\n", "finetune: &f {x: *f}\n"):
        assert "nested too deeply" in error_of(write(tmp_path, text))
    # Exponentially many paths through shared aliases ("billion laughs") are walked quickly.
    lines = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    assert "unknown key" in error_of(write(tmp_path, "\n".join(lines) + "\n"))


def test_nesting_up_to_the_limit_is_only_an_unknown_key(tmp_path):
    # The file's mapping is one level, each list one more.
    text = "extra: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"
    assert "extra: unknown key" in error_of(write(tmp_path, text))
    text = "extra: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n"
    assert "nested too deeply" in error_of(write(tmp_path, text))


def test_deep_base_and_manifest_are_refused_too():
    deep: list = []
    node = deep
    for _ in range(10_000):
        node.append([])
        node = node[0]
    with pytest.raises(TinycompressError, match="nested too deeply"):
        load_config(None, base={"finetune": {"x": deep}})
    with pytest.raises(TinycompressError, match="nested too deeply"):
        config_from_dict({"extra": deep})
    with pytest.raises(TinycompressError, match="not a setting name"):
        config_from_dict({"prune": {1: 2}})


@pytest.mark.parametrize(
    "text, needle",
    [
        ("seed: 2024-13-45\n", "cfg.yaml:1: cannot read 2024-13-45 as a timestamp"),
        ("seed: !!float abc\n", "cfg.yaml:1: cannot read abc as a number"),
        ("seed: " + "1" * 5000 + "\n", "cfg.yaml:1: cannot read 1111"),
        ("task: sst2\nseed: 1\x1b\n", "cfg.yaml:2: unacceptable character #x001b"),
        ("finetune: {epochs: 3\n", "malformed YAML at"),
    ],
    ids=short_id,
)
def test_unreadable_yaml_values_are_malformed_yaml(tmp_path, text, needle):
    message = error_of(write(tmp_path, text))
    assert needle in message, message


# ------------------------------------------------------------------------------ strict types


@pytest.mark.parametrize(
    "text, expected",
    [
        ("finetune:\n  epochs: true\n", "finetune.epochs: expected an integer, got true (bool)"),
        ('prune:\n  vocab: "yes"\n', 'prune.vocab: expected true or false, got "yes" (string)'),
        ('seed: "7"\n', 'seed: expected an integer, got "7" (string)'),
        ("finetune:\n  epochs: 2.0\n", "finetune.epochs: expected an integer, got 2.0 (float)"),
        ("finetune:\n  learning_rate: true\n", "finetune.learning_rate: expected a number, got true (bool)"),
        ('finetune:\n  learning_rate: "0.1"\n', 'finetune.learning_rate: expected a number, got "0.1" (string)'),
        ("finetune:\n  learning_rate: .inf\n", "finetune.learning_rate: expected a finite number, got .inf (float)"),
        ("finetune:\n  learning_rate: .nan\n", "finetune.learning_rate: expected a finite number, got .nan (float)"),
        ("finetune:\n  weight_decay: -.inf\n", "finetune.weight_decay: expected a finite number, got -.inf (float)"),
        ("finetune:\n  learning_rate: 1e400\n", "finetune.learning_rate: expected a finite number, got .inf (float)"),
        ("prune:\n  distill_temperature: .inf\n", "prune.distill_temperature: expected a finite number"),
        ("prune:\n  ratio: .nan\n", "prune.ratio: expected a finite number"),
        ("quantize:\n  tolerance: .inf\n", "quantize.tolerance: expected a finite number"),
        ("export:\n  atol: .inf\n", "export.atol: expected a finite number"),
        ("export:\n  int8_atol: .nan\n", "export.int8_atol: expected a finite number"),
        ("prune:\n  target_batch_size: true\n", "prune.target_batch_size: expected 1 or 32, got true (bool)"),
        ("prune:\n  target_batch_size: 32.0\n", "prune.target_batch_size: expected 1 or 32, got 32.0 (float)"),
        ('prune:\n  target_batch_size: "1"\n', 'prune.target_batch_size: expected 1 or 32, got "1" (string)'),
        ("task: 123\n", "task: expected a string, got 123 (int)"),
        ("model:\n  name: no\n", "model.name: expected a string, got false (bool)"),
        ("device: gpu\n", "device: expected 'auto', 'cpu', 'cuda' or 'mps', got \"gpu\" (string)"),
        ("seed: 2024-01-01\n", "seed: expected an integer, got 2024-01-01 (timestamp)"),
        ("seed: -1\n", "seed: should be greater than or equal to 0, got -1 (int)"),
        ("seed: 0x" + "f" * 100 + "\n", "seed: should be less than or equal to 4294967295, got a 121-digit integer"),
        ("prune:\n  speedup: " + "9" * 400 + "\n", "prune.speedup: too large a number, got a 400-digit integer"),
        ("prune: 3\n", "prune: expected a section (a mapping of settings), got 3 (int)"),
        ("finetune:\n  epochs: [1, 2]\n", "finetune.epochs: expected an integer, got a list of 2 items"),
    ],
    ids=short_id,
)
def test_lax_coercion_is_refused_with_value_and_yaml_type(tmp_path, text, expected):
    message = error_of(write(tmp_path, text))
    assert message.startswith("invalid config (") and "cfg.yaml + command-line flags" in message
    assert expected in message, message


def test_all_problems_listed_in_one_line(tmp_path):
    message = error_of(write(tmp_path, 'seed: "7"\nfinetune: {epochs: true, learning_rate: .nan}\ncolour: red\n'))
    for needle in ("seed: expected an integer", "finetune.epochs:", "finetune.learning_rate:", "colour: unknown key"):
        assert needle in message


@pytest.mark.parametrize(
    "text, attribute, value",
    [
        ("finetune:\n  learning_rate: 5e-5\n", "finetune.learning_rate", 5e-05),
        ("finetune:\n  learning_rate: 1E-3\n", "finetune.learning_rate", 1e-3),
        ("finetune:\n  learning_rate: 1.5e-3\n", "finetune.learning_rate", 1.5e-3),
        ("finetune:\n  learning_rate: .5e-3\n", "finetune.learning_rate", 5e-4),
        ("prune:\n  target_latency_ms: 2e+4\n", "prune.target_latency_ms", 2e4),
        ("prune:\n  speedup: 2\n", "prune.speedup", 2.0),
        ("finetune:\n  weight_decay: 0\n", "finetune.weight_decay", 0.0),
        ("prune:\n  vocab: yes\n", "prune.vocab", True),  # YAML 1.1 booleans are booleans
        ("prune:\n  target_batch_size: 1\n", "prune.target_batch_size", 1),
        ("data:\n  data_dir: null\n", "data.data_dir", None),
        ("prune.ratio: 0.25\n", "prune.ratio", 0.25),  # dotted keys still address sections
    ],
    ids=short_id,
)
def test_natural_values_load_with_their_type(tmp_path, text, attribute, value):
    config = load_config(write(tmp_path, text))
    section, _, leaf = attribute.rpartition(".")
    loaded = getattr(getattr(config, section) if section else config, leaf)
    assert loaded == value and type(loaded) is type(value)


def test_exponent_floats_do_not_change_other_strings():
    assert parse_yaml("a: 089\nb: 1e\nc: e5\nd: 1.2.3e4\ne: .inf\nf: 0x1f\n", "t.yaml") == {
        "a": "089",
        "b": "1e",
        "c": "e5",
        "d": "1.2.3e4",
        "e": math.inf,
        "f": 31,
    }


def test_typed_command_line_flags_still_load():
    flags = {
        "task": "sst2",
        "data.data_dir": "/data/glue",  # a Path, made a string by cli.options.config_flags
        "workdir": "runs",
        "device": "cpu",
        "seed": 3,
        "threads": 1,
        "model.max_length": 32,
        "finetune.epochs": 1,
        "finetune.learning_rate": 2e-3,
        "prune.speedup": 3,  # an int where a float is expected
        "prune.target_batch_size": 1,
        "prune.mask_tuning": False,
        "prune.criterion": "taylor",
        "prune.distill_layer_weight": 0.0,
        "quantize.backend": "torch",
        "quantize.tolerance": 0.3,
        "export.format": "all",
        "report.baselines": False,
        "finetune.batch_size": None,  # not given
    }
    config = load_config(None, flags)
    assert config.prune.speedup == 3.0 and isinstance(config.prune.speedup, float)
    assert config.prune.target_batch_size == 1 and config.finetune.batch_size == 32
    with pytest.raises(TinycompressError, match=r"finetune.learning_rate: expected a finite number, got \.inf"):
        load_config(None, {"finetune.learning_rate": math.inf})


def test_manifest_round_trip():
    for config in (Config(), load_config(None, {"finetune.learning_rate": 5e-5, "prune.ratio": 0.25, "seed": 0})):
        text = yaml.safe_dump(config.to_dict())
        assert config_from_dict(yaml.safe_load(text)) == config
        assert config_from_dict(parse_yaml(text, "tinycompress.yaml")) == config


def test_flags_still_beat_yaml_and_unset_values(tmp_path):
    path = write(tmp_path, "finetune:\n  epochs: 7\nprune:\n  ratio: 0.3\n")
    config = load_config(path, {"finetune.epochs": 2, "seed": None})
    assert config.finetune.epochs == 2 and config.prune.ratio == 0.3 and config.seed == 42


# ------------------------------------------------------------------------------ command line


def test_cli_bad_config_is_one_line_before_any_model(tmp_path, monkeypatch):
    # The stage module is replaced: loading the config must fail before the stage is called.
    calls = []
    fake = types.ModuleType("tinycompress.stages.finetune")
    fake.finetune = fake.search_and_finetune = lambda config: calls.append(config)
    monkeypatch.setitem(sys.modules, "tinycompress.stages.finetune", fake)
    workdir = tmp_path / "ws"
    for text, needles in (
        ("finetune:\n  epochs: true\n", ["finetune.epochs: expected an integer, got true (bool)", "bad.yaml"]),
        ("finetune:\n  learning_rate: .inf\n", ["finetune.learning_rate: expected a finite number"]),
        ("1: 2\n", ["key 1 (int) is not a setting name"]),
        ("[" * 10_000, ["nested too deeply"]),
        ("task: sst2\n".encode("utf-16"), ["UTF-16", "bad.yaml"]),
    ):
        bad = write(tmp_path, text, "bad.yaml")
        result = runner.invoke(app, ["finetune", "--config", str(bad), "--workdir", str(workdir)])
        assert_one_line_error(result, *needles)
        assert result.exit_code == 1
    assert calls == [] and not workdir.exists()


def test_cli_typed_flags_pass_the_strict_schema(tmp_path):
    # prune validates its flags before it looks for the parent, so a good set reaches "not found".
    args = ["prune", str(tmp_path / "nothing"), "--speedup", "2", "--target-batch-size", "1", "--no-mask-tuning"]
    args += ["--criterion", "taylor", "--distill-layer-weight", "0", "--recover-epochs", "0", "--seed", "3"]
    args += ["--threads", "1", "--data-dir", str(tmp_path), "--workdir", str(tmp_path)]
    assert_one_line_error(runner.invoke(app, args), "not found")
    bad = ["prune", str(tmp_path / "nothing"), "--speedup", "inf", "--workdir", str(tmp_path)]
    assert_one_line_error(runner.invoke(app, bad), "prune.speedup: expected a finite number")


# ------------------------------------------------------------------------------ properties


def _field_kinds(model: type = Config, prefix: str = "") -> dict[str, tuple[str, tuple]]:
    """Dotted field name -> ("int" / "float" / "bool" / "str" / "list" / "section", its Literal choices)."""
    kinds = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        members = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        if typing.get_origin(annotation) is typing.Literal:
            members = [annotation]
        if typing.get_origin(members[0]) is typing.Annotated:
            members[0] = typing.get_args(members[0])[0]
        if typing.get_origin(members[0]) is list:  # a list of numbers (prune.head_weights)
            kinds[f"{prefix}{name}"] = ("list", ())
            continue
        choices = typing.get_args(members[0]) if typing.get_origin(members[0]) is typing.Literal else ()
        kind = type(choices[0]) if choices else members[0]
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            kinds.update(_field_kinds(kind, f"{prefix}{name}."))
            kinds[f"{prefix}{name}"] = ("section", ())
        else:
            kinds[f"{prefix}{name}"] = (kind.__name__, choices)
    return kinds


FIELDS = {name: kind for name, (kind, _) in _field_kinds().items()}
CHOICES = {name: choices for name, (_, choices) in _field_kinds().items()}


def assert_well_typed(config: Config) -> None:
    data = config.model_dump()
    for dotted, kind in FIELDS.items():
        value: object = data
        for part in dotted.split("."):
            value = value[part]  # type: ignore[index]
        if value is None or kind == "section":
            continue
        if kind == "float":
            assert type(value) is float and math.isfinite(value), (dotted, value)
        elif kind == "list":
            assert type(value) is list and value, (dotted, value)
            assert all(type(item) is float and math.isfinite(item) and item > 0 for item in value), (dotted, value)
        else:
            assert type(value).__name__ == kind, (dotted, value)  # an int field never holds a bool


def load_from_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yaml"
        path.write_bytes(data)
        try:
            config = load_config(path)
        except TinycompressError as exc:
            assert "\n" not in exc.one_line()
            return
        assert_well_typed(config)


def test_field_kinds_cover_every_type():
    assert FIELDS["finetune.epochs"] == "int" and FIELDS["prune.ratio"] == "float"
    assert FIELDS["prune.target_batch_size"] == "int" and FIELDS["prune.criterion"] == "str"
    assert FIELDS["prune.vocab"] == "bool" and FIELDS["prune"] == "section"
    assert FIELDS["prune.head_weights"] == "list"
    assert set(FIELDS.values()) == {"int", "float", "bool", "str", "list", "section"}
    assert CHOICES["prune.target_batch_size"] == (1, 32) and "taylor" in CHOICES["prune.criterion"]


@given(st.one_of(st.binary(), st.text().map(str.encode)))
def test_any_bytes_load_or_fail_cleanly(data):
    load_from_bytes(data)


SECTIONS = [name for name, kind in FIELDS.items() if kind == "section"]
LEAVES = sorted({name.rpartition(".")[2] for name, kind in FIELDS.items() if kind != "section"})
KEYS = st.one_of(
    st.sampled_from(SECTIONS + LEAVES + [n for n, k in FIELDS.items() if "." in n]),
    st.text(max_size=8),
    st.integers(-3, 3),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
)
SCALARS = st.one_of(
    st.booleans(),
    st.none(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.sampled_from([2**64, 10**400, -(2**100), 0, 1, 32]),
    st.floats(),  # inf and nan included
    st.text(max_size=12),
    st.sampled_from(["yes", "no", "5e-5", "1e400", ".inf", "-.nan", "0x1f", "2024-01-01", "taylor", "onnx", "cpu"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(KEYS, children, max_size=5)),
    max_leaves=25,
)
JUNK_DOCUMENTS = st.dictionaries(
    KEYS,
    st.one_of(VALUES, st.dictionaries(st.one_of(st.sampled_from(LEAVES), KEYS), SCALARS, max_size=8)),
    max_size=8,
)


def plausible_value(dotted: str):
    """Mostly a value of the field's type (often a valid one), sometimes any scalar."""
    kind, choices = FIELDS[dotted], CHOICES[dotted]
    typed = {
        "int": st.integers(0, 64) | st.integers(),
        "float": st.floats(0, 1) | st.floats() | st.integers(0, 8),
        "bool": st.booleans(),
        "str": st.text(max_size=8),
        "list": st.lists(st.floats(0.1, 8) | st.integers(1, 4), max_size=4) | st.lists(SCALARS, max_size=3),
    }[kind]
    if choices:
        typed = st.sampled_from(choices)
    return st.one_of(typed, typed, typed, SCALARS)


def plausible_section(section: str):
    leaves = {name.rpartition(".")[2]: plausible_value(name) for name in FIELDS if name.startswith(section + ".")}
    return st.fixed_dictionaries({}, optional=leaves)


# Real sections and fields with values mostly of the right type, so that many documents load
# and the well-typed property is exercised, not only the error paths.
PLAUSIBLE_DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        name: plausible_section(name) if kind == "section" else plausible_value(name)
        for name, kind in FIELDS.items()
        if "." not in name
    },
)
DOCUMENTS = st.one_of(JUNK_DOCUMENTS, PLAUSIBLE_DOCUMENTS)


@given(DOCUMENTS, st.booleans())
def test_structured_yaml_loads_well_typed_or_fails_cleanly(document, flow_style):
    text = yaml.safe_dump(document, default_flow_style=flow_style, allow_unicode=True)
    load_from_bytes(text.encode("utf-8"))
