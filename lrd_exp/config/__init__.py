"""The configuration: the allowed values and the checks of single values (values: plain Python, what the library
imports), the rank node as one typed, checked object with every rank default (rank_settings), typed schemas built
from them (schema), the checks that run before any work (validate) and the advise grid (grid).

Imports nothing else of the package, so every other module may use it; Hydra only to register the schemas.
"""

from lrd_exp.config.schema import LrdConfig, enum_value, register_configs
from lrd_exp.config.validate import ConfigError, validate

__all__ = ["ConfigError", "LrdConfig", "enum_value", "register_configs", "validate"]
