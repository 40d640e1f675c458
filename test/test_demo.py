"""The ROS demo (player -> lsm_node -> recorder in one process) and the synthetic bag it falls back to."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from lsm_ros.io import read_ply
from lsm_ros.ros.bag_player import detect_stereo_topics, read_stereo_frames
from lsm_ros.ros.demo import ProductRecorder, run_demo
from lsm_ros.ros.synthetic import StereoRig, render_stereo_frame, write_synthetic_stereo_bag
from lsm_ros.semantics import DEFAULT_LABELS, label_palette, unique_slugs

pytestmark = pytest.mark.timeout(240)


def test_demo_writes_every_file_for_two_pairs(tmp_path: Path, tiny_reconstructor: Any, stereo_bag: Path) -> None:
    summary = run_demo(tmp_path, bag=stereo_bag, max_pairs=2, reconstructor=tiny_reconstructor, pair_timeout_s=90)
    assert summary['pairs_played'] == 2 and summary['pairs_reconstructed'] == 2
    assert summary['trained_weights'] is False and summary['mode'] == 'one_by_one'
    for index in range(2):
        for name in (f'points_{index:04d}.ply', f'left_depth_{index:04d}.png', f'left_depth_{index:04d}.npy'):
            assert (tmp_path / name).is_file(), name
        cloud = read_ply(tmp_path / f'points_{index:04d}.ply')
        assert {'x', 'y', 'z', 'red', 'green', 'blue', 'confidence'} <= set(cloud)
        assert 0 < len(cloud['x']) <= 2 * 224 * 224
        assert np.load(tmp_path / f'left_depth_{index:04d}.npy').shape == (224, 224)
    rows = list(csv.DictReader((tmp_path / 'relative_pose.csv').open()))
    assert len(rows) == 2 and rows[0]['metric_scale'] in ('0', '1')   # metric when the rig's point map fits
    infos_by_pair = [json.loads(line) for line in (tmp_path / 'info.jsonl').read_text().splitlines()]
    baseline_m = infos_by_pair[0]['baseline_m']
    assert baseline_m > 0
    # a rectified rig: the right camera at (B, 0, 0) from the calibration
    np.testing.assert_allclose([float(rows[0][k]) for k in ('x', 'y', 'z')], [baseline_m, 0, 0], atol=1e-6)
    assert np.linalg.norm([float(rows[0][k]) for k in ('qx', 'qy', 'qz', 'qw')]) == pytest.approx(1.0)
    infos = [json.loads(line) for line in (tmp_path / 'info.jsonl').read_text().splitlines()]
    assert [i['pair_index'] for i in infos] == [0, 1] and all(i['width'] == 224 for i in infos)
    saved = json.loads((tmp_path / 'summary.json').read_text())
    assert saved['pairs_reconstructed'] == 2 and saved['products_received']['~/points'] == 2
    assert saved['products_received'].get('/tf', 0) == 2
    readme = (tmp_path / 'README.txt').read_text()
    assert 'UNTRAINED WEIGHTS' in readme and 'Played 2 stereo pairs' in readme
    assert set(summary['files']) <= {p.name for p in tmp_path.iterdir()}
    # geometry only: no semantic product, no query
    assert summary['labels'] is None and summary['query'] is None and 'label' not in cloud
    assert not list(tmp_path.glob('labels*')) and not (tmp_path / 'query.json').exists()
    assert 'labels_XXXX.png' not in readme


def _read_png(path: Path) -> np.ndarray:
    """A PNG as written: (H, W) grey or (H, W, 3) RGB."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image if image.ndim == 2 else image[..., ::-1]


def test_demo_records_semantic_products(tmp_path: Path, tiny_lsm_reconstructor: Any, stereo_bag: Path) -> None:
    phrases = ['floor', 'wall', 'chair']
    summary = run_demo(tmp_path, bag=stereo_bag, max_pairs=1, reconstructor=tiny_lsm_reconstructor,
                       pair_timeout_s=90, query_phrases=phrases)
    assert summary['pairs_reconstructed'] == 1 and summary['model_resolution'] == [224, 224]
    received = summary['products_received']
    assert received['~/semantic/labels'] == received['~/semantic/overlay'] == received['~/points'] == 1

    legend = json.loads((tmp_path / 'labels.json').read_text())['labels']
    labels = [entry['phrase'] for entry in legend]
    assert labels == list(DEFAULT_LABELS) == summary['labels'] and [e['index'] for e in legend] == list(range(8))
    colours = np.array([entry['rgb'] for entry in legend], np.uint8)
    np.testing.assert_array_equal(colours, label_palette(len(labels)))      # the node's overlay colours
    label_image = _read_png(tmp_path / 'labels_0000.png')
    assert label_image.shape == (224, 224, 3)
    assert (label_image[:, :, None] == colours).all(axis=-1).any(axis=-1).all()   # every pixel: a legend colour
    assert _read_png(tmp_path / 'overlay_0000.png').shape == (224, 224, 3)
    cloud = read_ply(tmp_path / 'points_0000.ply')
    assert len(cloud['label']) == len(cloud['x']) > 0
    assert cloud['label'].dtype == np.uint8  # a uchar ply property
    assert cloud['label'].max() < len(labels)

    query = json.loads((tmp_path / 'query.json').read_text())
    assert query['success'] is True and query['phrases'] == phrases and query['views'] == ['left', 'right']
    assert len(query['scores']) == len(query['max_probabilities']) == len(phrases) and query['pair_index'] == 0
    assert sum(query['scores']) == pytest.approx(1.0, abs=1e-5)        # threshold 0: every pixel in one mask
    for view in ('left', 'right'):
        masks = np.stack([_read_png(tmp_path / 'query_masks' / f'{view}_{slug}.png') for slug in unique_slugs(phrases)])
        assert masks.shape == (len(phrases), 224, 224) and set(np.unique(masks)) <= {0, 255}
        assert ((masks == 255).sum(axis=0) == 1).all()                  # the masks of a view partition its pixels
    assert query['masks']['chair'] == {'left': 'query_masks/left_chair.png', 'right': 'query_masks/right_chair.png'}
    assert summary['query'] == {'phrases': phrases, 'success': True, 'message': query['message']}
    readme = (tmp_path / 'README.txt').read_text()
    assert 'labels_XXXX.png' in readme and 'query.json' in readme and 'meaningless' in readme
    assert set(summary['files']) <= {str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*')}


def test_a_failed_query_is_recorded_not_raised(tmp_path: Path, ros_context: Any) -> None:
    recorder = ProductRecorder(tmp_path, {}, record_tf=False, context=ros_context)
    try:
        record = recorder.record_query('/no_such_node/query', ['chair'], timeout_s=0.5)
    finally:
        recorder.destroy_node()
    saved = json.loads((tmp_path / 'query.json').read_text())
    assert saved == record == {'phrases': ['chair'], 'success': False,
                               'message': 'service /no_such_node/query not available'}


def test_synthetic_bag_is_deterministic_and_has_the_euroc_layout(tmp_path: Path) -> None:
    rig = StereoRig(width=96, height=64, focal_px=80.0)
    first = write_synthetic_stereo_bag(tmp_path / 'a', frames=2, rig=rig)
    second = write_synthetic_stereo_bag(tmp_path / 'b', frames=2, rig=rig)
    topics = detect_stereo_topics(first)
    assert (topics.left_image, topics.right_info, topics.rectified) == \
        ('/stereo/left/image_raw', '/stereo/right/camera_info', False)
    frames_a, frames_b = read_stereo_frames(first), read_stereo_frames(second, rectify=False)
    assert len(frames_a) == 2
    for a, b in zip(frames_a, frames_b):
        assert bytes(a.left_image.data) == bytes(b.left_image.data)       # rectification is the identity
        assert a.left_image.encoding == 'rgb8' and a.left_image.header.frame_id == 'cam0'
    assert frames_a[0].right_info.p[3] == pytest.approx(-80.0 * rig.baseline_m)
    with pytest.raises(FileExistsError):
        write_synthetic_stereo_bag(first)


def test_synthetic_views_agree_with_the_stereo_geometry() -> None:
    rig = StereoRig(width=160, height=120, focal_px=130.0)
    views = render_stereo_frame(rig, 0)
    depth_left = views['left_depth']
    assert np.isfinite(depth_left).all() and depth_left.min() > 0.5
    # a pixel of the left view reappears in the right view shifted by the disparity f * B / z
    row, column = 60, 100
    disparity = rig.focal_px * rig.baseline_m / depth_left[row, column]
    right_column = int(round(column - disparity))
    assert depth_left[row, column] == pytest.approx(views['right_depth'][row, right_column], rel=0.05)
    assert np.abs(views['left_rgb'][row, column].astype(int) - views['right_rgb'][row, right_column]).max() < 60


def test_bag_player_loops_with_increasing_stamps_and_keeps_the_timing(tmp_path: Path, ros_context: Any) -> None:
    from lsm_ros.ros.bag_player import BagPlayer, stereo_playback_tables
    bag = write_synthetic_stereo_bag(tmp_path / 'bag', frames=2, rig=StereoRig(width=64, height=48, focal_px=50.0),
                                     rate_hz=20.0)
    remap, rectify = stereo_playback_tables(detect_stereo_topics(bag), '/player_test')
    player = BagPlayer(bag, remap=remap, rectify=rectify, rate=0.0, loop=True, max_pairs=5, context=ros_context)
    try:
        looped = player.play()
        assert (looped.pairs, looped.passes) == (5, 3) and not looped.skipped           # 2 + 2 + 1
        steps = np.diff(looped.pair_stamps_ns)
        assert (steps == 50_000_000).all()                               # stamps go on across passes
        assert looped.per_topic['/player_test/left/image_rect'] == 5
        player.rate, player.loop, player.max_pairs = 0.5, False, None     # half speed: 50 ms -> 100 ms
        timed = player.play()
        assert timed.pairs == 2 and 0.095 < timed.wall_time_s < 5.0
        gated: list[int] = []
        assert player.play(before_pair=gated.append).pairs == 2 and gated == [1]
    finally:
        player.destroy_node()
