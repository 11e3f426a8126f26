"""The typed run configuration (torchtitan's ``config/`` layout):

- :mod:`.schema`: one dataclass per section, a docstring under every field (what every key means);
- :mod:`.loader`: YAML files, ``_base_`` chains, dotted ``key=value`` overrides (:func:`load_config`);
- :mod:`.coerce`: the YAML tree -> typed dataclasses, every unknown key reported with a suggestion;
- :mod:`.validation`: each section's rules, then the rules between sections, each checked once;
- :mod:`.errors`: the user-error types every entry point reports in one ``error:`` line;
- :mod:`.foreign` and :mod:`.importer`: other trainers' names for the settings, and the SimPO-repo / TRL YAML
  converter (``simpo-import-config``, docs/migrating.md).

The names other modules use are importable from the package itself.
"""

from simpo_mcore.config.errors import USER_ERRORS, ConfigError, UserError
from simpo_mcore.config.loader import BASE_KEY, load_config, parse_overrides, read_yaml_tree
from simpo_mcore.config.schema import (
    DATA_COLUMNS,
    SECTIONS,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    WandbConfig,
    config_fields,
)
from simpo_mcore.config.validation import validate

__all__ = [
    "BASE_KEY", "DATA_COLUMNS", "SECTIONS", "USER_ERRORS", "CheckpointConfig", "ConfigError", "DataConfig",
    "LoggingConfig", "LossConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "RunConfig", "TrainConfig",
    "UserError", "WandbConfig", "config_fields", "load_config", "parse_overrides", "read_yaml_tree", "validate",
]
