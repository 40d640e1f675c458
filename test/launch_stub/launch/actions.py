"""Stand-in of ``launch.actions`` (tests only)."""
from __future__ import annotations

from typing import Any, Callable, Iterable


class DeclareLaunchArgument:
    def __init__(self, name: str, *, default_value: Any = None, description: str | None = None,
                 choices: Iterable[str] | None = None, **kwargs: Any) -> None:
        self.name = name
        self.default_value = default_value
        self.description = description
        self.choices = list(choices) if choices is not None else None
        self.kwargs = kwargs


class OpaqueFunction:
    def __init__(self, *, function: Callable[..., Any], args: Iterable[Any] | None = None,
                 kwargs: dict[str, Any] | None = None) -> None:
        self.function = function
        self.args = list(args or [])
        self.kwargs = dict(kwargs or {})

    def execute(self, context: Any) -> Any:
        return self.function(context, *self.args, **self.kwargs)


class EmitEvent:
    """Records the event it emits."""

    def __init__(self, *, event: Any, **kwargs: Any) -> None:
        self.event = event
        self.kwargs = kwargs


class RegisterEventHandler:
    """Records the handler it registers."""

    def __init__(self, event_handler: Any, **kwargs: Any) -> None:
        self.event_handler = event_handler
        self.kwargs = kwargs
