"""Stand-in of ``launch.substitutions`` (tests only)."""
from __future__ import annotations

from typing import Any


class LaunchConfiguration:
    def __init__(self, variable_name: str, *, default: Any = None) -> None:
        self.variable_name = variable_name
        self.default = default

    def perform(self, context: Any) -> str:
        if self.variable_name in context.launch_configurations:
            return context.launch_configurations[self.variable_name]
        if self.default is None:
            raise KeyError(f'launch configuration {self.variable_name!r} does not exist')
        return str(self.default)
