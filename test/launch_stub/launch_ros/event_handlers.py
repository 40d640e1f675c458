"""Stand-in of ``launch_ros.event_handlers`` (tests only): OnStateTransition matches as the real one does."""
from __future__ import annotations

from typing import Any, Callable, Iterable

from launch_ros.events.lifecycle import StateTransition


class OnStateTransition:
    def __init__(self, *, entities: Iterable[Any], target_lifecycle_node: Any = None, transition: str | None = None,
                 start_state: str | None = None, goal_state: str | None = None,
                 matcher: Callable[[Any], bool] | None = None, **kwargs: Any) -> None:
        if target_lifecycle_node is not None and not getattr(target_lifecycle_node, 'is_lifecycle_node', False):
            raise RuntimeError('OnStateTransition requires a "LifecycleNode" action as the target')
        self.entities = list(entities)
        self.target_lifecycle_node = target_lifecycle_node
        self.transition, self.start_state, self.goal_state = transition, start_state, goal_state
        self.kwargs = kwargs
        self.matcher = matcher or self._matches

    def _matches(self, event: Any) -> bool:
        return (isinstance(event, StateTransition)
                and (self.target_lifecycle_node is None or event.action == self.target_lifecycle_node)
                and (self.transition is None or event.transition == self.transition)
                and (self.start_state is None or event.start_state == self.start_state)
                and (self.goal_state is None or event.goal_state == self.goal_state))

    def handle(self, event: Any) -> list[Any]:
        """The entities to run for ``event`` (none when it does not match)."""
        return list(self.entities) if self.matcher(event) else []
