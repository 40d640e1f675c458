"""Stand-in of ``launch_ros.actions`` (tests only): Node records its arguments."""
from __future__ import annotations

from typing import Any, Iterable


class Node:
    def __init__(self, *, executable: str, package: str | None = None, name: str | None = None,
                 namespace: str | None = None, exec_name: str | None = None,
                 parameters: Iterable[Any] | None = None, remappings: Iterable[tuple[str, str]] | None = None,
                 ros_arguments: Iterable[str] | None = None, arguments: Iterable[str] | None = None,
                 **kwargs: Any) -> None:
        self.package = package
        self.executable = executable
        self.name = name
        self.namespace = namespace
        self.parameters = list(parameters or [])
        self.remappings = list(remappings or [])
        self.arguments = list(arguments or [])
        self.ros_arguments = list(ros_arguments or [])
        self.kwargs = kwargs


class LifecycleNode(Node):
    """Stand-in of the managed-node action: name and namespace are required, as in the real one."""

    def __init__(self, *, name: str, namespace: str, **kwargs: Any) -> None:
        super().__init__(name=name, namespace=namespace, **kwargs)

    @property
    def is_lifecycle_node(self) -> bool:
        return True
