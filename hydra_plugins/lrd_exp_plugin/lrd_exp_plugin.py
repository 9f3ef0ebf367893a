"""Registers lrd-exp's config schemas whenever Hydra starts, so a bare ``compose(config_name="config")`` of
``conf/`` works (Hydra imports every module under ``hydra_plugins`` before it composes); ``run.py`` registers
them itself as well."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from lrd_exp.cli import register

register()


class LrdExpSearchPathPlugin(SearchPathPlugin):
    """Adds nothing to the search path: its module's import is what registers the schemas."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        return None
