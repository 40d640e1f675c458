"""Stand-in of ``launch.events`` (tests only): the ``matches_action`` matcher, as the real one."""
from __future__ import annotations

from typing import Any, Callable


def matches_action(target_action: Any) -> Callable[[Any], bool]:
    """A matcher that is true for ``target_action`` only."""
    return lambda action: action == target_action
