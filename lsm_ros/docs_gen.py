"""Generate the code-derived sections of ``docs/operations.md``.

    python -m lsm_ros.docs_gen            # rewrite the generated sections in place
    python -m lsm_ros.docs_gen --check    # exit 1 (saying which sections) when the document is out of date

Each generated section sits between ``<!-- BEGIN GENERATED: <name> -->`` and ``<!-- END GENERATED: <name> -->``;
everything outside the markers is hand-written and kept. The sections come from the code:

- ``parameters``: :func:`lsm_ros.config.all_parameter_specs` (name, type, default, range/choices, read-only,
  description);
- ``topics``: the topic and service constants of :mod:`lsm_ros.ros.node` (read, not copied: a renamed or added
  topic changes the table, and one without a description here fails), the render views of
  :data:`lsm_ros.config.RENDER_VIEWS`, ``/tf`` and ``/diagnostics``;
- ``rejections``: the node's ``REJECT_*`` reasons and the synchronizer's drop reasons;
- ``encodings``: :data:`lsm_ros.ros.conversions.SUPPORTED_IMAGE_ENCODINGS` and the compressed codecs;
- ``diagnostics``: :data:`lsm_ros.ros.diagnostics.KEY_DOCS` and the :class:`DiagnosticThresholds` defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Sequence

from lsm_ros.config import RENDER_VIEWS, ParameterSpec, all_parameter_specs

_log = logging.getLogger('lsm_ros.docs_gen')

OPERATIONS_DOC = Path(__file__).resolve().parents[1] / 'docs' / 'operations.md'
MARKER = re.compile(r'<!-- BEGIN GENERATED: (?P<name>[a-z_]+) -->\n(?P<body>.*?)<!-- END GENERATED: (?P=name) -->',
                    re.DOTALL)
_ROS_TYPES = {bool: 'bool', int: 'integer', float: 'double', str: 'string', tuple: 'string array'}

# What each topic/service constant of lsm_ros.ros.node carries: (interface type, meaning). Keyed by the constant's
# name; the topic itself is read from the node module.
SUBSCRIPTION_DOCS: dict[str, tuple[str, str]] = {
    'LEFT_IMAGE_TOPIC': ('sensor_msgs/Image', 'left rectified image'),
    'RIGHT_IMAGE_TOPIC': ('sensor_msgs/Image', 'right rectified image, same size as the left'),
    'LEFT_INFO_TOPIC': ('sensor_msgs/CameraInfo', 'left calibration (with use_camera_info): intrinsics P[:3,:3], '
                                                  'K when P is all zeros'),
    'RIGHT_INFO_TOPIC': ('sensor_msgs/CameraInfo', 'right calibration; P[0,3] = -fx·B gives the metric baseline B'),
}
PUBLICATION_DOCS: dict[str, tuple[str, str]] = {
    'POINTS_TOPIC': ('sensor_msgs/PointCloud2', 'both views merged: x, y, z, rgb, confidence (and a uint32 label, '
                                                "PCL's PointXYZRGBL label, with the semantic model), left optical "
                                                'frame'),
    'LEFT_DEPTH_TOPIC': ('sensor_msgs/Image', '32FC1 depth of the left view at model resolution, NaN invalid'),
    'RIGHT_DEPTH_TOPIC': ('sensor_msgs/Image', '32FC1 depth of the right view, in the right frame'),
    'LEFT_MODEL_INFO_TOPIC': ('sensor_msgs/CameraInfo', 'intrinsics of the left depth image (model resolution)'),
    'RIGHT_MODEL_INFO_TOPIC': ('sensor_msgs/CameraInfo', 'intrinsics of the right depth image'),
    'RELATIVE_POSE_TOPIC': ('geometry_msgs/PoseStamped', 'pose of the estimated right camera in the left frame (when '
                                                         'the pose succeeds)'),
    'INFO_TOPIC': ('lsm_ros/ReconstructionInfo', 'per pair: scale flag and source, baseline, intrinsics source, '
                                                 'sizes, timings, labels'),
    'SEMANTIC_LABELS_TOPIC': ('sensor_msgs/Image', 'semantic model: mono8 label (index into labels) of each left '
                                                   'pixel'),
    'SEMANTIC_OVERLAY_TOPIC': ('sensor_msgs/Image', 'semantic model: rgb8 label colours over the left model image'),
    'SEMANTIC_LABEL_INFO_TOPIC': ('vision_msgs/LabelInfo', 'semantic model: the active labels (class_id i: labels[i]), '
                                  'transient local, republished when the label set changes'),
    'TF_TOPIC': ('tf2_msgs/TFMessage', 'left → estimated right camera (estimated_right_frame_id, default <right '
                                       'frame>_estimated; and left → midway view), only with publish_tf'),
    'DIAGNOSTICS_TOPIC': ('diagnostic_msgs/DiagnosticArray', 'node health every diagnostics_period_s (default 1 s), '
                                                             'in every lifecycle state: see Diagnostics'),
}
SERVICE_DOCS: dict[str, tuple[str, str]] = {
    'QUERY_SERVICE': ('lsm_ros/srv/TextQuery', 'semantic model: masks and scores of text phrases on the latest '
                                               'reconstruction'),
    'RENDER_SERVICE': ('lsm_ros/srv/RenderView', 'semantic model: render the latest Gaussians from any pinhole '
                                                 'camera'),
}
RENDER_VIEW_DOCS = {
    'left': 'the left camera, left frame',
    'right': 'the right camera at the estimated relative pose, right frame',
    'midway': 'halfway between the cameras, frame <left frame>_midway',
}
# Meaning of each rejection reason (keyed by the node's constant name) and synchronizer drop reason.
REJECTION_DOCS: dict[str, str] = {
    'REJECT_ENCODING': 'an image encoding other than the supported ones (raw transport)',
    'REJECT_IMAGE_DATA': 'an image whose sizes, step and data disagree, compressed data that does not decode, or an '
                         'image the model\'s pre-processing cannot take: a side under 2 pixels, or so elongated '
                         'that the resize and crop at the model resolution leave nothing',
    'REJECT_SIZE_MISMATCH': 'left and right images of different sizes',
    'REJECT_NO_CAMERA_INFO': 'no CameraInfo within camera_info_tolerance_s of the pair (use_camera_info)',
    'REJECT_BAD_CAMERA_INFO': 'a CameraInfo without a usable calibration (zero/negative/non-finite focal, no size, '
                              'malformed K or P, another image size)',
    'REJECT_STALE': 'a pair not newer than the last one (a restarted driver or bag: restart lsm_node), counted once '
                    'per pair: of a late left/right pair only the first image counts, a lone late image counts 1',
    'REJECT_TOO_OLD': 'a pair older than max_input_age_s (node clock)',
    'REJECT_RECONSTRUCTION': 'the network raised on the pair (a burst is logged once, at error level)',
    'REJECT_OUT_OF_MEMORY': 'the network ran out of (CUDA or host) memory; cached CUDA memory is released',
}
SYNC_DROP_DOCS: dict[str, str] = {
    'queue_full': 'its side kept sync_queue_size unpaired images: the partners never came within the tolerance',
    'superseded': 'still unpaired when a newer pair formed',
    'late': 'stamp not newer than the last pair\'s, counted per image (its pair is counted once as stale_stamp)',
    'duplicate_stamp': 'an image with that stamp is already waiting on its side',
}


class DocsError(RuntimeError):
    """The document cannot be generated (missing markers, undocumented topic, ...)."""


def _md(text: Any) -> str:
    """Table cell text: one line, pipes and angle brackets escaped (``<view>`` is no HTML tag)."""
    return str(text).replace('|', '\\|').replace('<', '&lt;').replace('>', '&gt;').replace('\n', ' ')


def _code(text: Any) -> str:
    """A table cell's code span: pipes escaped (entities would show literally in code)."""
    return '`' + str(text).replace('|', '\\|').replace('\n', ' ') + '`'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, tuple):
        return '[' + ', '.join(value) + ']'
    if isinstance(value, str):
        return f'"{value}"' if not value else value
    return str(value)


def _allowed(spec: ParameterSpec) -> str:
    parts = []
    if spec.choices is not None:
        parts.append(', '.join(_value(c) for c in spec.choices))
    if spec.min_value is not None or spec.max_value is not None:
        low = '−∞' if spec.min_value is None else _value(spec.min_value)
        high = '∞' if spec.max_value is None else _value(spec.max_value)
        parts.append(f'[{low}, {high}]')
    if spec.constraints:
        parts.append(spec.constraints)
    return '; '.join(parts)


def parameters_section(specs: Iterable[ParameterSpec] | None = None) -> str:
    """The parameters table."""
    rows = ['| name | type | default | range / choices | read-only | description |', '|---|---|---|---|---|---|']
    for spec in specs if specs is not None else all_parameter_specs():
        rows.append(f'| `{spec.name}` | {_ROS_TYPES[spec.type]} | {_code(_value(spec.default))} | '
                    f'{_md(_allowed(spec))} | {"yes" if spec.read_only else "no"} | {_md(spec.description)} |')
    return '\n'.join(rows) + '\n'


def _node_module() -> ModuleType:
    from lsm_ros.ros import node
    return node


def _documented(module: ModuleType, docs: dict[str, Any]) -> dict[str, Any]:
    """{value of the module constant: its doc} for the constants that exist now."""
    return {getattr(module, name): doc for name, doc in docs.items() if isinstance(getattr(module, name, None), str)}


def _lookup(table: dict[str, Any], topic: str, kind: str) -> Any:
    if topic not in table:
        raise DocsError(f'{kind} {topic!r} of lsm_ros.ros.node has no description: add its constant to '
                        f'lsm_ros.docs_gen')
    return table[topic]


def topics_section(node: ModuleType | None = None) -> str:
    """Subscriptions, publications and services of lsm_node."""
    from lsm_ros.ros import conversions, diagnostics
    node = node or _node_module()
    subscriptions = _documented(node, SUBSCRIPTION_DOCS)
    publications = _documented(node, PUBLICATION_DOCS)
    publications.setdefault(diagnostics.DIAGNOSTICS_TOPIC, PUBLICATION_DOCS['DIAGNOSTICS_TOPIC'])
    services = _documented(node, SERVICE_DOCS)
    encodings = ', '.join(conversions.SUPPORTED_IMAGE_ENCODINGS)
    suffix = getattr(node, 'COMPRESSED_SUFFIX', '/compressed')
    rows = ['| direction | name | type | content |', '|---|---|---|---|']
    for topic in getattr(node, 'INPUT_TOPICS', ()):
        interface, meaning = _lookup(subscriptions, topic, 'input topic')
        meaning = _md(meaning)
        if interface == 'sensor_msgs/Image':
            meaning += (f' ({encodings}); with `image_transport:=compressed`: sensor_msgs/CompressedImage on '
                        f'{_code(f"<remapped {topic}>{suffix}")}')
        rows.append(f'| subscribes | `{topic}` | {interface} | {meaning} |')
    outputs = list(getattr(node, 'OUTPUT_TOPICS', ())) + list(getattr(node, 'SEMANTIC_TOPICS', ()))
    for topic in outputs:
        interface, meaning = _lookup(publications, topic, 'output topic')
        rows.append(f'| publishes | `{topic}` | {interface} | {_md(meaning)} |')
    render_view_topics: Callable[[str], tuple[str, str]] | None = getattr(node, 'render_view_topics', None)
    if render_view_topics is not None:
        for view in RENDER_VIEWS:
            image_topic, info_topic = render_view_topics(view)
            what = RENDER_VIEW_DOCS.get(view)
            if what is None:
                raise DocsError(f'render view {view!r} has no description: add it to lsm_ros.docs_gen')
            rows.append(f'| publishes | `{image_topic}` | sensor_msgs/Image | with `render_views` containing {view}: '
                        f'rgb8 render of {_md(what)} |')
            rows.append(f'| publishes | `{info_topic}` | sensor_msgs/CameraInfo | its intrinsics |')
    for topic in (getattr(node, 'TF_TOPIC', '/tf'), getattr(node, 'DIAGNOSTICS_TOPIC', diagnostics.DIAGNOSTICS_TOPIC)):
        interface, meaning = _lookup(publications, topic, 'topic')
        rows.append(f'| publishes | `{topic}` | {interface} | {_md(meaning)} |')
    for name in ('QUERY_SERVICE', 'RENDER_SERVICE'):
        service = getattr(node, name, None)
        if isinstance(service, str):
            interface, meaning = _lookup(services, service, 'service')
            rows.append(f'| serves | `{service}` | {interface} | {_md(meaning)} |')
    return '\n'.join(rows) + '\n'


def rejections_section(node: ModuleType | None = None) -> str:
    """Rejection reasons of the node (every REJECT_* constant) and drop reasons of the synchronizer."""
    from lsm_ros.ros.sync import SYNC_DROP_REASONS
    node = node or _node_module()
    rows = ['| counter | reason | meaning |', '|---|---|---|']
    for name in [n for n in vars(node) if n.startswith('REJECT_') and isinstance(getattr(node, n), str)]:
        if name not in REJECTION_DOCS:
            raise DocsError(f'rejection reason {name} of lsm_ros.ros.node has no description: add it to '
                            'lsm_ros.docs_gen.REJECTION_DOCS')
        rows.append(f'| rejected | `{getattr(node, name)}` | {_md(REJECTION_DOCS[name])} |')
    for reason in SYNC_DROP_REASONS:
        if reason not in SYNC_DROP_DOCS:
            raise DocsError(f'sync drop reason {reason!r} has no description: add it to lsm_ros.docs_gen')
        rows.append(f'| sync drops | `{reason}` | {_md(SYNC_DROP_DOCS[reason])} |')
    return '\n'.join(rows) + '\n'


def encodings_section() -> str:
    """The image formats lsm_node reads."""
    from lsm_ros.ros import conversions
    raw = ', '.join(f'`{e}`' for e in conversions.SUPPORTED_IMAGE_ENCODINGS)
    codecs = ', '.join(f'`{c}`' for c in conversions.COMPRESSED_CODECS)
    side = int(conversions.MAX_DECODED_PIXELS ** 0.5)
    return (f'- raw (`image_transport:=raw`): {raw} (8 bits per channel; mono is replicated to RGB, alpha dropped, '
            'row padding allowed);\n'
            f'- compressed (`image_transport:=compressed`): {codecs}, at most {side}x{side} pixels and '
            f'{conversions.MAX_COMPRESSED_BYTES // (1024 * 1024)} MiB of data; grey is replicated, alpha dropped, '
            '16-bit PNG keeps its high byte; `compressedDepth` is refused.\n')


def diagnostics_section() -> str:
    """The statuses, their KeyValues and the thresholds."""
    from lsm_ros.ros import diagnostics
    rows = ['| status | key | meaning |', '|---|---|---|']
    for doc in diagnostics.KEY_DOCS:
        rows.append(f'| `{diagnostics.status_name(diagnostics.NODE_NAME, doc.status)}` | {_code(doc.key)} | '
                    f'{_md(doc.meaning)} |')
    rows += ['', '| threshold | default | effect |', '|---|---|---|']
    for f in dataclasses.fields(diagnostics.DiagnosticThresholds):
        rows.append(f'| `{f.name}` | {_value(f.default)} | {_md(f.metadata["doc"])} |')
    return '\n'.join(rows) + '\n'


SECTIONS: dict[str, Callable[[], str]] = {
    'parameters': parameters_section,
    'topics': topics_section,
    'rejections': rejections_section,
    'encodings': encodings_section,
    'diagnostics': diagnostics_section,
}


def render(text: str, sections: dict[str, Callable[[], str]] | None = None) -> str:
    """``text`` with every generated section rewritten; raises :class:`DocsError` for a missing or unknown one."""
    sections = SECTIONS if sections is None else sections
    found = [m.group('name') for m in MARKER.finditer(text)]
    unknown = sorted(set(found) - set(sections))
    missing = sorted(set(sections) - set(found))
    if unknown or missing or len(found) != len(set(found)):
        raise DocsError(f'generated sections: unknown {unknown}, missing {missing}, found {found} (each once, between '
                        '"<!-- BEGIN GENERATED: name -->" and "<!-- END GENERATED: name -->" lines)')
    bodies = {name: generate() for name, generate in sections.items()}
    return MARKER.sub(lambda m: f'<!-- BEGIN GENERATED: {m.group("name")} -->\n{bodies[m.group("name")]}'
                                f'<!-- END GENERATED: {m.group("name")} -->', text)


def stale_sections(text: str, fresh: str | None = None) -> list[str]:
    """Names of the generated sections of ``text`` that differ from what the code gives. ``fresh``: ``text``
    already rendered (:func:`render`), rendered here when None."""
    fresh = render(text) if fresh is None else fresh
    current = {m.group('name'): m.group('body') for m in MARKER.finditer(text)}
    generated = {m.group('name'): m.group('body') for m in MARKER.finditer(fresh)}
    return [name for name in generated if current.get(name) != generated[name]]


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or with --check, verify) the generated sections of docs/operations.md."""
    parser = argparse.ArgumentParser(prog='python -m lsm_ros.docs_gen', description=__doc__.split('\n\n')[0])
    parser.add_argument('--check', action='store_true', help='only check: exit 1 when the document is out of date')
    parser.add_argument('--doc', type=Path, default=OPERATIONS_DOC, help=f'document (default {OPERATIONS_DOC})')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        text = args.doc.read_text(encoding='utf-8')
        fresh = render(text)
        stale = stale_sections(text, fresh)
    except (OSError, DocsError) as exc:
        _log.error('%s: %s', args.doc, exc)
        return 2
    if args.check:
        if stale:
            _log.error('%s is out of date (sections %s): run python -m lsm_ros.docs_gen', args.doc, ', '.join(stale))
            return 1
        _log.info('%s is up to date', args.doc)
        return 0
    if stale:
        args.doc.write_text(fresh, encoding='utf-8')
        _log.info('%s: rewrote %s', args.doc, ', '.join(stale))
    else:
        _log.info('%s is up to date', args.doc)
    return 0


if __name__ == '__main__':
    sys.exit(main())
