"""The configuration: typed schemas (the one list of allowed values) and the checks that run before any work.

Imports nothing else of the package, so every other module may use it.
"""

from lrd_exp.config.schema import LrdConfig, enum_value, register_configs
from lrd_exp.config.validate import ConfigError, validate

__all__ = ["ConfigError", "LrdConfig", "enum_value", "register_configs", "validate"]
