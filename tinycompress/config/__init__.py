"""The typed config: defaults < YAML file (``--config``) < command-line flags.

Every stage takes a :class:`Config`. Unknown keys and wrong types are refused with one
:class:`~tinycompress.errors.TinycompressError` that lists every problem, and the resolved
config is saved in each checkpoint's manifest so that any result can be traced and rerun.

``schema`` holds the settings and their defaults, ``yaml_reader`` reads config files (UTF-8
YAML, whose floats may also be written without a dot, as in YAML 1.2), and ``loading`` merges
and validates them.
"""

from tinycompress.config.loading import UNSET, config_from_dict, load_config
from tinycompress.config.schema import (
    Config,
    DataSettings,
    ExportSettings,
    FinetuneSettings,
    ModelSettings,
    PruneSettings,
    QuantizeSettings,
    ReportSettings,
    SearchSettings,
)
from tinycompress.config.yaml_reader import MAX_DEPTH, parse_yaml, read_yaml

__all__ = [
    "MAX_DEPTH",
    "UNSET",
    "Config",
    "DataSettings",
    "ExportSettings",
    "FinetuneSettings",
    "ModelSettings",
    "PruneSettings",
    "QuantizeSettings",
    "ReportSettings",
    "SearchSettings",
    "config_from_dict",
    "load_config",
    "parse_yaml",
    "read_yaml",
]
