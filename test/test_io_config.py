"""Writers (PLY, false-colour depth, JSON) and the typed configuration."""
import json

import numpy as np
import pytest

from lsm_ros import io
from lsm_ros.config import (NodeConfig, PipelineConfig, all_parameter_specs, config_from_mapping,
                            parameter_specs)


def test_ply_round_trip_keeps_every_property(tmp_path):
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(1000, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, size=(1000, 3), dtype=np.uint8)
    conf = rng.uniform(1, 5, size=1000).astype(np.float32)
    path = io.write_ply(tmp_path / 'cloud.ply', xyz, rgb, {'confidence': conf})
    header = path.read_bytes().split(b'end_header\n')[0].decode()
    assert 'element vertex 1000' in header and 'property uchar red' in header
    back = io.read_ply(path)
    np.testing.assert_array_equal(np.stack([back['x'], back['y'], back['z']], 1), xyz)
    np.testing.assert_array_equal(np.stack([back['red'], back['green'], back['blue']], 1), rgb)
    np.testing.assert_array_equal(back['confidence'], conf)


def test_ply_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match='rgb has 2 rows for 3 points'):
        io.write_ply(tmp_path / 'bad.ply', np.zeros((3, 3)), np.zeros((2, 3)))


def test_depth_colour_is_black_where_invalid_and_orders_near_far():
    depth = np.array([[1.0, 2.0, 4.0], [np.nan, 0.0, -1.0]], np.float32)
    rgb = io.depth_to_color(depth, vmin=1.0, vmax=4.0)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert (rgb[1] == 0).all()
    assert rgb[0, 0].tolist() != rgb[0, 2].tolist()
    assert (io.depth_to_color(np.full((4, 4), np.nan)) == 0).all()


def test_json_writes_numpy_and_replaces_non_finite(tmp_path):
    path = io.write_json(tmp_path / 'a.json', {'K': np.eye(3), 'x': np.float32(1.5), 'bad': float('nan'),
                                                'nested': {'inf': float('inf')}})
    data = json.loads(path.read_text())
    assert data == {'K': np.eye(3).tolist(), 'x': 1.5, 'bad': None, 'nested': {'inf': None}}


def test_every_config_field_has_a_description_and_a_typed_default():
    specs = list(all_parameter_specs())
    names = [s.name for s in specs]
    assert len(names) == len(set(names)), 'parameter names must be unique across sections'
    for required in ('dust3r_checkpoint', 'lseg_checkpoint', 'lsm_checkpoint', 'device', 'resolution',
                     'approximate_sync', 'sync_tolerance_s', 'publish_tf'):
        assert required in names
    for spec in specs:
        assert spec.description.strip(), spec.name
        assert spec.type in (bool, int, float, str, tuple), spec.name   # tuple: a string array
        assert spec.validate(spec.default) == spec.default


@pytest.mark.parametrize('name,value,reason', [
    ('resolution', 300, 'not one of'),
    ('resolution', '256', 'expected an integer'),
    ('min_confidence', 0.5, 'below the minimum'),
    ('min_confidence', float('nan'), 'finite'),
    ('pose_ransac_iterations', True, 'expected an integer'),
])
def test_pipeline_values_are_validated(name, value, reason):
    with pytest.raises(ValueError, match=reason):
        config_from_mapping(PipelineConfig, {name: value})


def test_node_values_are_validated_and_unknown_keys_refused():
    spec = {s.name: s for s in parameter_specs(NodeConfig)}
    with pytest.raises(ValueError, match='above the maximum'):
        spec['sync_tolerance_s'].validate(11.0)
    with pytest.raises(ValueError, match='unknown NodeConfig fields'):
        config_from_mapping(NodeConfig, {'sync_tolerance': 0.1})
    cfg = config_from_mapping(NodeConfig, {'sync_tolerance_s': 1, 'publish_tf': True})
    assert cfg.sync_tolerance_s == 1.0 and isinstance(cfg.sync_tolerance_s, float) and cfg.publish_tf


def test_diagnostics_period_is_a_runtime_parameter_within_its_range():
    spec = {s.name: s for s in parameter_specs(NodeConfig)}['diagnostics_period_s']
    assert spec.default == 1.0 and spec.type is float and not spec.read_only and '/diagnostics' in spec.description
    assert spec.validate(0.1) == 0.1 and spec.validate(60) == 60.0
    for bad, reason in ((0.05, 'below the minimum'), (61.0, 'above the maximum'), (float('inf'), 'finite')):
        with pytest.raises(ValueError, match=reason):
            spec.validate(bad)
