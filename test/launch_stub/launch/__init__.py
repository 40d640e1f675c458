"""Stand-in of ``launch`` (tests only): LaunchDescription and LaunchContext."""
from __future__ import annotations

from typing import Any, Iterable


class LaunchDescription:
    def __init__(self, initial_entities: Iterable[Any] | None = None) -> None:
        self.entities = list(initial_entities or [])

    def add_action(self, action: Any) -> None:
        self.entities.append(action)


class LaunchContext:
    """Holds the launch configurations (argument name -> string value), as the real context does."""

    def __init__(self, launch_configurations: dict[str, str] | None = None) -> None:
        self.launch_configurations = dict(launch_configurations or {})
