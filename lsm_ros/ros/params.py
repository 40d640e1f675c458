"""ROS parameters of ``lsm_node``: one per field of :class:`PipelineConfig` and :class:`NodeConfig`.

Field types map to parameter types: bool, int (integer), float (double), str (string), tuple (string array;
an empty one may be given as ``[]`` in a params file).

Each :class:`~lsm_ros.config.ParameterSpec` becomes a declared parameter with a ``ParameterDescriptor``
(description, type, range, choices in ``additional_constraints``, read_only). Values from
``--ros-args --params-file`` / ``-p`` override the defaults at start-up and are validated there (a bad value
stops the node with the reason). At runtime, ``ros2 param set`` (or a SetParameters call) is validated with
``ParameterSpec.validate`` and refused with the reason; read-only parameters (model files, device,
resolution) cannot change after start-up.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter

from lsm_ros.config import NodeConfig, ParameterSpec, PipelineConfig, all_parameter_specs, config_from_mapping

_PARAMETER_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
                    float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
                    tuple: ParameterType.PARAMETER_STRING_ARRAY}
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

ConfigListener = Callable[[PipelineConfig, NodeConfig], None]


def parameter_descriptor(spec: ParameterSpec) -> ParameterDescriptor:
    """The ROS descriptor of one configuration field (type, description, range, choices, other constraints in
    words, read_only)."""
    descriptor = ParameterDescriptor(name=spec.name, type=_PARAMETER_TYPES[spec.type], description=spec.description,
                                     read_only=spec.read_only)
    constraints = []
    if spec.choices is not None:
        constraints.append('one of: ' + ', '.join(repr(c) for c in spec.choices))
    if spec.min_value is not None or spec.max_value is not None:
        if spec.type is float:
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=float(spec.min_value if spec.min_value is not None else -float('inf')),
                to_value=float(spec.max_value if spec.max_value is not None else float('inf')), step=0.0)]
        elif spec.type is int:
            descriptor.integer_range = [IntegerRange(
                from_value=int(spec.min_value if spec.min_value is not None else _INT64_MIN),
                to_value=int(spec.max_value if spec.max_value is not None else _INT64_MAX), step=1)]
        constraints.append(f'range [{spec.min_value}, {spec.max_value}]')
    if spec.constraints:
        constraints.append(spec.constraints)
    if spec.read_only:
        constraints.append('read-only: set at start-up only')
    descriptor.additional_constraints = '; '.join(constraints)
    return descriptor


def _declared_default(spec: ParameterSpec, default: Any) -> Any:
    """The default to declare: the value, or for an empty string array its type (rclpy would infer a byte array
    from an empty list)."""
    if spec.type is tuple and not default:
        return Parameter.Type.STRING_ARRAY
    return default


class LsmParameters:
    """Declares the parameters on ``node``, holds the current configs and keeps them valid at runtime.

    ``pipeline_defaults``/``node_defaults``: the values declared when no override is given (e.g. the
    config of an injected reconstructor). After construction, :attr:`pipeline` and :attr:`node_config` hold
    the effective values (overrides applied, validated). ``on_change(pipeline, node_config)`` is called after
    every accepted runtime change.
    """

    def __init__(self, node: Node, *, pipeline_defaults: PipelineConfig | None = None,
                 node_defaults: NodeConfig | None = None, on_change: ConfigListener | None = None) -> None:
        self._node = node
        self._on_change = on_change
        defaults = {**dataclasses.asdict(pipeline_defaults or PipelineConfig()),
                    **dataclasses.asdict(node_defaults or NodeConfig())}
        self.specs: dict[str, ParameterSpec] = {spec.name: spec for spec in all_parameter_specs()}
        declared = node.declare_parameters('', [(name, _declared_default(spec, defaults[name]),
                                                 parameter_descriptor(spec)) for name, spec in self.specs.items()])
        # A string array without a value (an empty default, or `[]` in a params file, which rcl reads as no value)
        # is the empty array.
        node.set_parameters([Parameter(p.name, Parameter.Type.STRING_ARRAY, []) for p in declared
                             if p.type_ == Parameter.Type.NOT_SET and self.specs[p.name].type is tuple])
        values = {name: node.get_parameter(name).value for name in self.specs}
        try:
            self.pipeline: PipelineConfig = config_from_mapping(PipelineConfig, values, strict=False)
            self.node_config: NodeConfig = config_from_mapping(NodeConfig, values, strict=False)
        except ValueError as exc:
            raise ValueError(f'invalid lsm_node parameter: {exc}') from exc
        node.add_on_set_parameters_callback(self._validate)
        node.add_post_set_parameters_callback(self._apply)

    def _validate(self, parameters: list[Parameter]) -> SetParametersResult:
        """Accept a runtime change only when every value passes its spec (read-only ones are refused)."""
        reasons = []
        for parameter in parameters:
            spec = self.specs.get(parameter.name)
            if spec is None:
                continue  # e.g. use_sim_time: not ours
            if spec.read_only:
                reasons.append(f'{spec.name} is read-only: set it at start-up (params file or -p)')
                continue
            try:
                spec.validate(parameter.value)
            except ValueError as exc:
                reasons.append(str(exc))
        if reasons:
            return SetParametersResult(successful=False, reason='; '.join(reasons))
        return SetParametersResult(successful=True)

    def _apply(self, parameters: list[Parameter]) -> None:
        changes: dict[str, Any] = {p.name: self.specs[p.name].validate(p.value)
                                   for p in parameters if p.name in self.specs}
        if not changes:
            return
        pipeline_fields = {f.name for f in dataclasses.fields(PipelineConfig)}
        self.pipeline = dataclasses.replace(
            self.pipeline, **{k: v for k, v in changes.items() if k in pipeline_fields})
        self.node_config = dataclasses.replace(
            self.node_config, **{k: v for k, v in changes.items() if k not in pipeline_fields})
        self._node.get_logger().info('parameters changed: ' + ', '.join(f'{k}={v!r}' for k, v in changes.items()))
        if self._on_change is not None:
            self._on_change(self.pipeline, self.node_config)
