"""ROS parameters of ``lsm_node``: one per field of :class:`PipelineConfig` and :class:`NodeConfig`.

Field types map to parameter types: bool, int (integer), float (double), str (string), tuple (string array;
an empty one may be given as ``[]`` in a params file).

Each :class:`~lsm_ros.config.ParameterSpec` becomes a declared parameter with a ``ParameterDescriptor``
(description, type, range, choices in ``additional_constraints``, read_only). Values from
``--ros-args --params-file`` / ``-p`` override the defaults at start-up and are validated there (a bad value
stops the node with the reason). At runtime, ``ros2 param set`` (or a SetParameters call) is validated with
``ParameterSpec.validate`` and refused with the reason; read-only parameters (model files, device,
resolution) cannot change after start-up.

Atomicity: the effective values are one immutable :class:`ParameterSnapshot` (pipeline and node config together),
replaced by a single assignment after every accepted change; a reader that takes :attr:`LsmParameters.snapshot`
once never sees half of a change. Several parameters set in one ``set_parameters_atomically`` call are validated
together and applied together, or none is (``LsmNode`` routes ``set_parameters`` and the SetParameters service
through it).
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Callable

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType, SetParametersResult
from rcl_interfaces.srv import SetParameters
from rclpy.exceptions import ParameterNotDeclaredException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.parameter_service import ParameterService

from lsm_ros.config import (PARAMETER_ALIASES, NodeConfig, ParameterSpec, PipelineConfig, all_parameter_specs,
                            config_from_mapping)

_PARAMETER_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
                    float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
                    tuple: ParameterType.PARAMETER_STRING_ARRAY}
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

ConfigListener = Callable[[PipelineConfig, NodeConfig], None]


@dataclass(frozen=True)
class ParameterSnapshot:
    """The effective values of every parameter at one moment: the pipeline's and the node's config, and a
    generation number that grows by one with each accepted change."""

    pipeline: PipelineConfig
    node: NodeConfig
    generation: int = 0


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
    config of an injected reconstructor). After construction, :attr:`snapshot` (and its parts :attr:`pipeline` and
    :attr:`node_config`) holds the effective values (overrides applied, validated). ``on_change(pipeline,
    node_config)`` is called after every accepted runtime change, with the new snapshot already in place.
    """

    def __init__(self, node: Node, *, pipeline_defaults: PipelineConfig | None = None,
                 node_defaults: NodeConfig | None = None, on_change: ConfigListener | None = None) -> None:
        self._node = node
        self._on_change = on_change
        self._apply_lock = threading.RLock()   # concurrent set calls become consecutive snapshots
        defaults = {**dataclasses.asdict(pipeline_defaults or PipelineConfig()),
                    **dataclasses.asdict(node_defaults or NodeConfig())}
        defaults.update({alias: defaults[target] for alias, target in PARAMETER_ALIASES.items()})
        self.specs: dict[str, ParameterSpec] = {spec.name: spec for spec in all_parameter_specs()}
        declared = node.declare_parameters('', [(name, _declared_default(spec, defaults[name]),
                                                 parameter_descriptor(spec)) for name, spec in self.specs.items()])
        # A string array without a value (an empty default, or `[]` in a params file, which rcl reads as no value)
        # is the empty array.
        node.set_parameters([Parameter(p.name, Parameter.Type.STRING_ARRAY, []) for p in declared
                             if p.type_ == Parameter.Type.NOT_SET and self.specs[p.name].type is tuple])
        self._settle_aliases(node, defaults)
        values = {name: node.get_parameter(name).value for name in self.specs}
        try:
            self.snapshot = ParameterSnapshot(pipeline=config_from_mapping(PipelineConfig, values, strict=False),
                                              node=config_from_mapping(NodeConfig, values, strict=False))
        except ValueError as exc:
            raise ValueError(f'invalid lsm_node parameter: {exc}') from exc
        node.add_pre_set_parameters_callback(self._mirror_aliases)
        node.add_on_set_parameters_callback(self.check)
        node.add_post_set_parameters_callback(self._apply)

    @staticmethod
    def _settle_aliases(node: Node, defaults: dict[str, Any]) -> None:
        """At start-up, a parameter and its alias (:data:`~lsm_ros.config.PARAMETER_ALIASES`) get the one value given
        (the other kept its default); ValueError when both were given different values."""
        for alias, target in PARAMETER_ALIASES.items():
            alias_value, target_value = node.get_parameter(alias).value, node.get_parameter(target).value
            if alias_value == target_value:
                continue
            if target_value == defaults[target]:
                node.set_parameters([Parameter(target, value=alias_value)])
            elif alias_value == defaults[alias]:
                node.set_parameters([Parameter(alias, value=target_value)])
            else:
                raise ValueError(f'invalid lsm_node parameter: {alias} ({alias_value!r}) and {target} '
                                 f'({target_value!r}) name the same setting: give one of them')

    @staticmethod
    def _mirror_aliases(parameters: list[Parameter]) -> list[Parameter]:
        """Pre-set callback: a parameter set without its alias (or an alias without its parameter) sets the other
        too, with the same value."""
        names = {p.name for p in parameters}
        pairs = {**PARAMETER_ALIASES, **{target: alias for alias, target in PARAMETER_ALIASES.items()}}
        return list(parameters) + [Parameter(pairs[p.name], p.type_, p.value) for p in parameters
                                   if p.name in pairs and pairs[p.name] not in names]

    @property
    def pipeline(self) -> PipelineConfig:
        """The effective pipeline config (part of :attr:`snapshot`)."""
        return self.snapshot.pipeline

    @property
    def node_config(self) -> NodeConfig:
        """The effective node config (part of :attr:`snapshot`)."""
        return self.snapshot.node

    def check(self, parameters: list[Parameter]) -> SetParametersResult:
        """Accept a runtime change only when every value passes its spec (read-only ones are refused); the reason
        names each refused parameter. Parameters that are not lsm_node's (e.g. use_sim_time) are left to rclpy."""
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
        given = {p.name: p.value for p in parameters}
        for alias, target in PARAMETER_ALIASES.items():
            if alias in given and target in given and given[alias] != given[target]:
                reasons.append(f'{alias} ({given[alias]!r}) and {target} ({given[target]!r}) name the same setting: '
                               'give one of them, or both with the same value')
        if reasons:
            return SetParametersResult(successful=False, reason='; '.join(reasons))
        return SetParametersResult(successful=True)

    def _apply(self, parameters: list[Parameter]) -> None:
        """Post-set callback: every parameter of one (atomic) set call becomes part of one new snapshot."""
        changes: dict[str, Any] = {PARAMETER_ALIASES.get(p.name, p.name): self.specs[p.name].validate(p.value)
                                   for p in parameters if p.name in self.specs}   # an alias changes its parameter
        if not changes:
            return
        pipeline_fields = {f.name for f in dataclasses.fields(PipelineConfig)}
        with self._apply_lock:
            old = self.snapshot
            new = ParameterSnapshot(
                pipeline=dataclasses.replace(old.pipeline,
                                             **{k: v for k, v in changes.items() if k in pipeline_fields}),
                node=dataclasses.replace(old.node, **{k: v for k, v in changes.items() if k not in pipeline_fields}),
                generation=old.generation + 1)
            self.snapshot = new
            self._node.get_logger().info('parameters changed: ' + ', '.join(f'{k}={v!r}'
                                                                            for k, v in changes.items()))
            if self._on_change is not None:
                self._on_change(new.pipeline, new.node)


def set_parameters_all_or_nothing(node: Node, parameters: list[Parameter]) -> list[SetParametersResult]:
    """Set ``parameters`` in one ``node.set_parameters_atomically`` call: one result per parameter, all successful
    or all refused (the reason says why and that none was set). Raises ParameterNotDeclaredException as rclpy
    does."""
    if not parameters:
        return []
    result = node.set_parameters_atomically(parameters)
    if not result.successful and len(parameters) > 1:
        result = SetParametersResult(successful=False, reason=(
            f'{result.reason} (all or nothing: none of the {len(parameters)} parameters of this request was set)'))
    return [result for _ in parameters]


class AllOrNothingParameterService(ParameterService):
    """rclpy's parameter services, except that a SetParameters request (``ros2 param set``, a parameter client, a
    params file loaded at runtime) is applied all or nothing: rclpy sets its parameters one by one, so one refused
    value would leave the others applied. It calls ``node.set_parameters_atomically`` (see
    :func:`set_parameters_all_or_nothing`), which the node may extend."""

    def _set_parameters_callback(self, request: SetParameters.Request,
                                 response: SetParameters.Response) -> SetParameters.Response:
        parameters = [Parameter.from_parameter_msg(p) for p in request.parameters]
        try:
            response.results = set_parameters_all_or_nothing(self._get_node(), parameters)
        except ParameterNotDeclaredException as exc:
            response.results = [SetParametersResult(successful=False, reason=str(exc)) for _ in parameters]
        return response


class AllOrNothingParameters:
    """Mixin of an rclpy ``Node`` (put it first among the bases) whose parameters an :class:`LsmParameters` holds at
    ``self._lsm_params``: :meth:`set_parameters` sets several parameters all or nothing (rclpy would set them one by
    one), :meth:`set_parameters_atomically` checks them with :meth:`LsmParameters.check` first, so that a refusal
    names each bad parameter and says why (rclpy's own type check only says 'Wrong parameter type')."""

    def set_parameters(self, parameter_list: list[Parameter]) -> list[SetParametersResult]:
        """One result per parameter: all successful, or all refused with the reason."""
        return set_parameters_all_or_nothing(self, list(parameter_list))  # type: ignore[arg-type]

    def set_parameters_atomically(self, parameter_list: list[Parameter]) -> SetParametersResult:
        parameters = getattr(self, '_lsm_params', None)   # None while the parameters are being declared
        if parameters is not None:
            checked = parameters.check(list(parameter_list))
            if not checked.successful:
                return checked
        return super().set_parameters_atomically(parameter_list)  # type: ignore[misc]
