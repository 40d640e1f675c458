"""docs/operations.md: its generated tables match the code, and the names its prose uses exist."""
from __future__ import annotations

import dataclasses
import inspect
import re
import types
from pathlib import Path

import pytest

from lsm_ros import docs_gen
from lsm_ros.config import all_parameter_specs
from lsm_ros.ros import conversions, diagnostics
from lsm_ros.ros import node as lsm
from lsm_ros.ros.sync import SYNC_DROP_REASONS

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
DOC = docs_gen.OPERATIONS_DOC
# Words in backticks in the prose that look like parameters but are other things.
OTHER_IDENTIFIERS = {'lsm_node', 'image_proc', 'rqt_robot_monitor', 'hardware_id', 'image_rect', 'demo_e200.ckpt'}


def _prose(text: str) -> str:
    """The hand-written part of the document (generated sections removed)."""
    return docs_gen.MARKER.sub('', text)


def _launch_arguments() -> set[str]:
    source = (REPO / 'launch' / 'lsm.launch.py').read_text(encoding='utf-8')
    remaps = re.search(r'INPUT_REMAPS = \((.*?)\n\)', source, re.DOTALL)
    return set(re.findall(r"DeclareLaunchArgument\('(\w+)'", source)) | set(
        re.findall(r"\('[^']*', '(\w+)', '[^']*'\)", remaps.group(1) if remaps else ''))


def test_operations_doc_is_up_to_date() -> None:
    stale = docs_gen.stale_sections(DOC.read_text(encoding='utf-8'))
    assert not stale, f'docs/operations.md is out of date in {stale}: run `python -m lsm_ros.docs_gen`'


def test_check_flags_a_stale_copy_and_rewriting_restores_it(tmp_path: Path) -> None:
    text = DOC.read_text(encoding='utf-8')
    stale = text.replace('| `sync_tolerance_s` | double | `0.02` |', '| `sync_tolerance_s` | double | `0.05` |')
    assert stale != text
    copy = tmp_path / 'operations.md'
    copy.write_text(stale, encoding='utf-8')
    assert docs_gen.stale_sections(stale) == ['parameters']
    assert docs_gen.main(['--check', '--doc', str(copy)]) == 1
    assert docs_gen.main(['--doc', str(copy)]) == 0
    assert copy.read_text(encoding='utf-8') == text          # prose untouched, tables regenerated
    assert docs_gen.main(['--check', '--doc', str(copy)]) == 0
    assert docs_gen.main(['--check', '--doc', str(tmp_path / 'missing.md')]) == 2


def test_markers_are_required_once_each() -> None:
    with pytest.raises(docs_gen.DocsError, match='missing'):
        docs_gen.render('no generated sections here')
    text = DOC.read_text(encoding='utf-8')
    twice = text + '\n<!-- BEGIN GENERATED: encodings -->\n<!-- END GENERATED: encodings -->\n'
    with pytest.raises(docs_gen.DocsError):
        docs_gen.render(twice)


def test_every_parameter_topic_reason_encoding_and_key_is_in_the_document() -> None:
    text = DOC.read_text(encoding='utf-8')
    for spec in all_parameter_specs():
        assert f'| `{spec.name}` |' in text, spec.name
    topics = (lsm.INPUT_TOPICS + lsm.OUTPUT_TOPICS + lsm.SEMANTIC_TOPICS
              + (lsm.QUERY_SERVICE, lsm.RENDER_SERVICE, lsm.TF_TOPIC, diagnostics.DIAGNOSTICS_TOPIC))
    for topic in topics:
        assert f'| `{topic}` |' in text, topic
    for view in ('left', 'right', 'midway'):
        assert all(f'| `{t}` |' in text for t in lsm.render_view_topics(view)), view
    for reason in [getattr(lsm, n) for n in vars(lsm) if n.startswith('REJECT_')] + list(SYNC_DROP_REASONS):
        assert f'| `{reason}` |' in text, reason
    for encoding in conversions.SUPPORTED_IMAGE_ENCODINGS + conversions.COMPRESSED_CODECS:
        assert f'`{encoding}`' in text, encoding
    for doc in diagnostics.KEY_DOCS:
        assert f'| `{doc.key}` |' in text, doc.key
    for threshold in dataclasses.fields(diagnostics.DiagnosticThresholds):
        assert f'| `{threshold.name}` | {threshold.default} |' in text, threshold.name


def test_the_tables_follow_the_code() -> None:
    """A changed parameter or topic changes the tables; an undocumented topic or reason stops the generator."""
    spec = next(iter(all_parameter_specs()))
    changed = dataclasses.replace(spec, default='/weights/x.pth', description='Renamed | piped <thing>.')
    assert '| `dust3r_checkpoint` | string | `/weights/x.pth` |  | yes | Renamed \\| piped &lt;thing&gt;. |' in \
        docs_gen.parameters_section([changed])
    fake = types.ModuleType('fake_node')
    fake.__dict__.update({name: getattr(lsm, name) for name in dir(lsm) if name.isupper()})
    fake.render_view_topics = lsm.render_view_topics
    fake.POINTS_TOPIC = '~/cloud'
    fake.OUTPUT_TOPICS = (fake.POINTS_TOPIC,) + lsm.OUTPUT_TOPICS[1:]
    table = docs_gen.topics_section(fake)
    assert '| publishes | `~/cloud` | sensor_msgs/PointCloud2 |' in table and '`~/points`' not in table
    fake.OUTPUT_TOPICS += ('~/brand_new',)
    with pytest.raises(docs_gen.DocsError, match="'~/brand_new'"):
        docs_gen.topics_section(fake)
    fake.REJECT_SOMETHING_NEW = 'something_new'
    with pytest.raises(docs_gen.DocsError, match='REJECT_SOMETHING_NEW'):
        docs_gen.rejections_section(fake)


def test_names_used_in_the_prose_exist() -> None:
    """Parameters set with name:=value, parameter-like names in backticks and lsm-ros commands of the hand-written
    text are real parameters, launch arguments, LsmNode constructor arguments, reasons, thresholds or commands."""
    prose = _prose(DOC.read_text(encoding='utf-8'))
    parameters = {spec.name for spec in all_parameter_specs()}
    launch_arguments = _launch_arguments()
    assert {'namespace', 'managed', 'autostart', 'left_image'} <= launch_arguments
    for name in re.findall(r'(\w+):=', prose):
        assert name in parameters | launch_arguments, name
    constructor_arguments = set(inspect.signature(lsm.LsmNode.__init__).parameters) - {'self', 'node_kwargs'}
    assert 'diagnostic_thresholds' in constructor_arguments
    known = (parameters | launch_arguments | OTHER_IDENTIFIERS | set(SYNC_DROP_REASONS) | constructor_arguments
             | {getattr(lsm, n) for n in vars(lsm) if n.startswith('REJECT_')}
             | {f.name for f in dataclasses.fields(diagnostics.DiagnosticThresholds)})
    for word in re.findall(r'`([^`]+)`', prose):
        if re.fullmatch(r'[a-z][a-z0-9.]*_[a-z0-9_.]*', word):
            assert word in known, word
    # diagnostics keys quoted in the prose ('name (unit)' or 'family: name'; quoted log messages aside)
    spans = re.findall(r'`([^`]+)`', prose)
    quoted_keys = [k for k in spans if re.search(r' \(|: ', k) and not re.search(r"['=.]|^ros2 ", k) and len(k) < 40]
    assert 'dropped pairs (busy)' in quoted_keys
    statuses = {diagnostics.status_name(diagnostics.NODE_NAME, part) for part in diagnostics.STATUS_PARTS}
    for key in quoted_keys:
        assert key in statuses or any(doc.matches(key) for doc in diagnostics.KEY_DOCS), key
    from lsm_ros.cli import build_parser
    parser = build_parser()
    commands = re.findall(r'`lsm-ros ([a-z ]+?)`', prose)
    assert commands
    for command in commands:
        parser.parse_args(command.split())     # SystemExit for an unknown command
