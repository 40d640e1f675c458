"""Stand-in of ``launch_ros.events.lifecycle`` (tests only): ChangeState and StateTransition with the real
signatures (ChangeState checks its transition id against lifecycle_msgs, as the real one does)."""
from __future__ import annotations

from typing import Any, Callable

import lifecycle_msgs.msg

# The transitions a ChangeState may request (the real event's valid_transitions).
_TRANSITIONS = {getattr(lifecycle_msgs.msg.Transition, f'TRANSITION_{name}') for name in (
    'CREATE', 'CONFIGURE', 'CLEANUP', 'ACTIVATE', 'DEACTIVATE', 'UNCONFIGURED_SHUTDOWN', 'INACTIVE_SHUTDOWN',
    'ACTIVE_SHUTDOWN', 'DESTROY')}


class ChangeState:
    """A request for a lifecycle transition of the nodes ``lifecycle_node_matcher`` accepts."""

    def __init__(self, *, lifecycle_node_matcher: Callable[[Any], bool], transition_id: int) -> None:
        if transition_id not in _TRANSITIONS:
            raise ValueError(f"given transition_id of '{transition_id}' is not a lifecycle transition")
        self.lifecycle_node_matcher = lifecycle_node_matcher
        self.transition_id = transition_id


class StateTransition:
    """A lifecycle node's transition, as launch_ros emits it from the node's transition_event topic."""

    def __init__(self, *, action: Any, msg: lifecycle_msgs.msg.TransitionEvent) -> None:
        self.action = action
        self.msg = msg
        self.transition = msg.transition.label
        self.start_state = msg.start_state.label
        self.goal_state = msg.goal_state.label
