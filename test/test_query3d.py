"""lsm_ros.query3d alone: a phrase's points, exact single-linkage clustering, oriented boxes, detections and the
masks mapped back onto the input images, on synthetic scenes with known geometry (no network, no ROS)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial.transform import Rotation

from lsm_ros import cameras, query3d
from lsm_ros.pipeline import Reconstruction
from lsm_ros.preprocess import ImageCrop, plan_crop
from lsm_ros.semantics import QueryResult

# ----------------------------------------------------------------------------------------------- a synthetic scene
BASELINE = 0.12                       # the right camera sits at x = +BASELINE in the left frame (a rectified rig)
INPUT_SIZE = (320, 240)               # (width, height) of the input images: 224 crops a 299x224 resize to 224x224
# Two fronto-parallel rectangles of the phrase 'box' in front of a background wall: (x0, x1, y0, y1, z), metres.
RECTANGLES = ((-0.32, -0.12, -0.10, 0.00, 1.0), (0.05, 0.35, 0.00, 0.20, 1.5))
WALL_Z = 3.0


def _input_K(size: tuple[int, int] = INPUT_SIZE) -> np.ndarray:
    return np.array([[260.0, 0, size[0] / 2 - 0.5], [0, 260.0, size[1] / 2 - 0.5], [0, 0, 1]])


def _rays(K: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) ray directions (z = 1) of the pixel centres of a camera."""
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    return np.stack([u, v, np.ones_like(u)], axis=-1) @ np.linalg.inv(K).T


def _cast(rays: np.ndarray, origin_x: float) -> tuple[np.ndarray, np.ndarray]:
    """Points hit by rays from (origin_x, 0, 0) in the left frame: (H, W, 3) points, (H, W) index of the rectangle
    hit (-1: the wall)."""
    hit = np.full(rays.shape[:2], -1)
    depth = np.full(rays.shape[:2], WALL_Z)
    for index, (x0, x1, y0, y1, z) in sorted(enumerate(RECTANGLES), key=lambda item: -item[1][4]):
        x, y = origin_x + rays[..., 0] * z, rays[..., 1] * z
        inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        hit[inside], depth[inside] = index, z
    points = rays * depth[..., None]
    points[..., 0] += origin_x
    return points, hit


def synthetic_scene(input_size: tuple[int, int] = INPUT_SIZE, resolution: int = 224
                    ) -> tuple[Reconstruction, QueryResult, np.ndarray]:
    """A reconstruction of the rectangles seen by a rectified rig (point maps exactly on the pixel rays, in the
    left frame, metres) and the answer of the phrases ('box', 'wall'): 'box' wins on the rectangles' pixels with a
    probability that varies across the image. Returns (reconstruction, answer, the input camera matrix)."""
    K_input = _input_K(input_size)
    crop = plan_crop(input_size, resolution)
    K = crop.intrinsics_to_model(K_input)
    width, height = crop.model_size
    rays = _rays(K, width, height)
    pts1, hit1 = _cast(rays, 0.0)
    pts2, hit2 = _cast(rays, BASELINE)
    column = np.linspace(0.5, 2.5, width)[None, :]
    logits = np.stack([np.stack([np.where(hit >= 0, column, -column), np.zeros(hit.shape)])
                       for hit in (hit1, hit2)]).astype(np.float32)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(2)]
    T_1_2 = np.eye(4)
    T_1_2[0, 3] = BASELINE
    pose = cameras.RelativePose(T_1_2=T_1_2, focal_2=float(K[0, 0]), K_2=K, num_inliers=0, num_candidates=0,
                                reprojection_rmse_px=float('nan'), success=True, message='synthetic')
    ones = np.ones((height, width), np.float32)
    result = Reconstruction(
        pts3d_1=pts1.astype(np.float32), pts3d_2=pts2.astype(np.float32), conf_1=ones * 2, conf_2=ones * 2,
        depth_1=pts1[..., 2].astype(np.float32), depth_2=pts2[..., 2].astype(np.float32), K_1=K, K_2=K.copy(),
        T_1_2=T_1_2, image_1=images[0], image_2=images[1], crop_1=crop, crop_2=crop, metric_scale=True,
        scale_factor=1.0, scale_source='stereo_baseline', intrinsics_source='given', pose=pose,
        network_outputs={}, weights='synthetic', trained_weights=False)
    answer = QueryResult(phrases=('box', 'wall'), views=(0, 1), logits=logits, point_logits=None, logit_scale=10.0)
    return result, answer, K_input


def _single_linkage(xyz: np.ndarray, distance: float) -> np.ndarray:
    """Reference: components of the graph of every point pair within ``distance`` (all pairs, brute force)."""
    squared = np.sum((xyz[:, None] - xyz[None]) ** 2, axis=-1)
    rows, columns = np.nonzero(squared <= distance * distance)
    return connected_components(coo_matrix((np.ones(len(rows)), (rows, columns)), shape=(len(xyz),) * 2))[1]


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ----------------------------------------------------------------------------------------------- clustering
@pytest.mark.parametrize('seed', range(6))
def test_clusters_are_exact_single_linkage(seed: int) -> None:
    rng = np.random.default_rng(seed)
    count = int(rng.integers(2, 700))
    xyz = rng.uniform(0, 1, size=(count, 3)) * rng.uniform(0.05, 2.0, size=3)
    distance = float(rng.uniform(0.02, 0.2))
    labels = query3d.euclidean_clusters(xyz, distance)
    assert labels.dtype == np.int64 and labels.shape == (count,)
    assert _same_partition(labels, _single_linkage(xyz, distance))
    first = [int(np.flatnonzero(labels == k)[0]) for k in range(labels.max() + 1)]
    assert first == sorted(first) and labels[0] == 0            # numbered by first point
    np.testing.assert_array_equal(query3d.euclidean_clusters(xyz[::-1].copy(), distance)[::-1] >= 0, True)


def test_clusters_split_exactly_at_the_distance_and_large_cells_use_the_tree(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    line = np.zeros((10, 3))
    line[:, 0] = np.arange(10) * 0.1
    line[5:, 0] += 0.05                                         # one gap of 0.15 between points 4 and 5
    assert query3d.euclidean_clusters(line, 0.149).tolist() == [0] * 5 + [1] * 5
    assert query3d.euclidean_clusters(line, 0.151).tolist() == [0] * 10
    rng = np.random.default_rng(3)
    xyz = rng.normal(size=(400, 3)) * 0.2
    monkeypatch.setattr(query3d, '_BRUTE_FORCE_PAIRS', 0)        # every undecided cell pair through a k-d tree
    for distance in (0.05, 0.1, 0.3):
        assert _same_partition(query3d.euclidean_clusters(xyz, distance), _single_linkage(xyz, distance))


def test_clustering_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match='positive finite'):
        query3d.euclidean_clusters(np.zeros((3, 3)), 0.0)
    with pytest.raises(ValueError, match='finite'):
        query3d.euclidean_clusters(np.array([[0.0, np.nan, 0.0]]), 0.1)
    with pytest.raises(ValueError, match=r'\(N, 3\)'):
        query3d.euclidean_clusters(np.zeros((3, 2)), 0.1)
    with pytest.raises(ValueError, match='too far'):
        query3d.euclidean_clusters(np.array([[1e30, 0, 0], [0, 0, 0]]), 1e-6)
    assert query3d.euclidean_clusters(np.zeros((0, 3)), 0.1).shape == (0,)


# ----------------------------------------------------------------------------------------------- boxes
def _box_points(center: np.ndarray, size: np.ndarray, rotation: np.ndarray, count: int, seed: int) -> np.ndarray:
    local = (np.random.default_rng(seed).uniform(-0.5, 0.5, size=(count, 3))) * size
    return local @ rotation.T + center


def test_oriented_box_of_a_rotated_box() -> None:
    rotation = Rotation.from_euler('zyx', [35.0, -20.0, 50.0], degrees=True).as_matrix()
    center, size = np.array([0.3, -0.2, 1.4]), np.array([0.4, 0.2, 0.08])   # distinct sides: PCA axes are defined
    xyz = _box_points(center, size, rotation, 20000, seed=1)
    box = query3d.oriented_box(xyz, extent_percentile=0.0)
    np.testing.assert_allclose(box.center, center, atol=0.005)
    np.testing.assert_allclose(box.size, size, atol=0.005)
    # the box axes are the rotation's columns up to sign; right-handed; the quaternion is the same rotation
    np.testing.assert_allclose(np.abs(np.sum(box.rotation * rotation, axis=0)), 1.0, atol=1e-3)
    assert np.linalg.det(box.rotation) == pytest.approx(1.0)
    np.testing.assert_allclose(Rotation.from_quat(box.quaternion).as_matrix(), box.rotation, atol=1e-9)
    assert box.quaternion[3] >= 0 and np.linalg.norm(box.quaternion) == pytest.approx(1.0)
    assert box.contains(xyz, tolerance=1e-9).all()
    # robust extent: 2nd to 98th percentile, so a uniform box is 4 % smaller and stray points do not stretch it
    robust = query3d.oriented_box(np.concatenate([xyz, (center + rotation @ np.array([3.0, 0, 0]))[None]]))
    np.testing.assert_allclose(robust.size, size * 0.96, rtol=0.02)
    with pytest.raises(ValueError, match='extent_percentile'):
        query3d.oriented_box(xyz, extent_percentile=50.0)


def test_two_separated_boxes_give_two_detections_best_first() -> None:
    rot_b = Rotation.from_euler('z', 30.0, degrees=True).as_matrix()
    box_a = _box_points(np.array([-0.5, 0.0, 2.0]), np.array([0.3, 0.2, 0.1]), np.eye(3), 3000, seed=2)
    box_b = _box_points(np.array([0.6, 0.1, 2.5]), np.array([0.5, 0.25, 0.1]), rot_b, 6000, seed=3)
    strays = np.array([[0.0, 2.0, 4.0], [0.01, 2.0, 4.0]])          # a 2-point cluster: dropped by min_points
    xyz = np.concatenate([box_a, box_b, strays]).astype(np.float32)
    probability = np.concatenate([np.full(3000, 0.9), np.full(6000, 0.6), np.full(2, 1.0)]).astype(np.float32)
    count = len(xyz)
    points = query3d.PhrasePoints('box', xyz, np.zeros((count, 3), np.uint8), probability,
                                  np.zeros(count, np.uint8), np.arange(count))
    detections = query3d.detect_objects(points, distance=0.05, min_points=10, extent_percentile=0.0)
    assert len(detections) == 2
    best, second = detections
    # score = mean probability x share of the phrase's points: 0.6 * 6000/9002 > 0.9 * 3000/9002
    assert best.score == pytest.approx(0.6 * 6000 / count, rel=1e-6)
    assert second.score == pytest.approx(0.9 * 3000 / count, rel=1e-6)
    assert (best.num_points, second.num_points) == (6000, 3000)
    assert best.mean_probability == pytest.approx(0.6) and second.mean_probability == pytest.approx(0.9)
    np.testing.assert_array_equal(np.sort(best.point_indices), np.arange(3000, 9000))
    np.testing.assert_allclose(best.box.center, [0.6, 0.1, 2.5], atol=0.01)
    np.testing.assert_allclose(best.box.size, [0.5, 0.25, 0.1], atol=0.01)
    assert abs(best.box.rotation[:, 0] @ rot_b[:, 0]) > 0.999            # long axis along the rotated x
    np.testing.assert_allclose(second.box.center, [-0.5, 0.0, 2.0], atol=0.01)
    np.testing.assert_allclose(second.box.size, [0.3, 0.2, 0.1], atol=0.01)
    np.testing.assert_allclose(np.abs(second.box.rotation), np.eye(3), atol=0.02)
    assert [d.num_points for d in query3d.detect_objects(points, 0.05, min_points=1)] == [6000, 3000, 2]
    assert query3d.detect_objects(points.subset(np.zeros(count, bool)), 0.05) == ()
    with pytest.raises(ValueError, match='min_points'):
        query3d.detect_objects(points, 0.05, min_points=0)


# ----------------------------------------------------------------------------------------------- crop inverse
@pytest.mark.parametrize('input_size,resolution', [((320, 240), 224), ((640, 480), 512), ((500, 500), 512),
                                                   ((1241, 376), 256), ((100, 80), 224)])
def test_crop_inverse(input_size: tuple[int, int], resolution: int) -> None:
    crop = plan_crop(input_size, resolution)
    width, height = crop.model_size
    model = np.arange(width * height, dtype=np.int64).reshape(height, width)
    restored = crop.image_to_input(model, fill=-1)
    assert restored.shape == (input_size[1], input_size[0])
    x, y, region_width, region_height = crop.input_region()
    seen = restored >= 0
    assert seen[y:y + region_height, x:x + region_width].all() and seen.sum() == region_width * region_height
    # each input pixel takes the model pixel that holds its centre (pixels_to_model of the centre, floor of +0.5)
    rows, columns = np.nonzero(seen)
    centre_in_model = crop.pixels_to_model(np.stack([columns, rows], axis=-1))
    for got, centre in ((restored[rows, columns] % width, centre_in_model[:, 0]),
                        (restored[rows, columns] // width, centre_in_model[:, 1])):
        edge = np.abs(centre + 0.5 - np.round(centre + 0.5)) < 1e-9         # centre on a pixel edge: the next one
        np.testing.assert_array_equal(got, np.where(edge, np.round(centre + 0.5), np.floor(centre + 0.5)))
    # continuous round trip, and every model pixel comes back when the input is at least the model's resolution
    model_pixels = np.random.default_rng(0).uniform(-1, 300, size=(50, 2))
    np.testing.assert_allclose(crop.pixels_to_model(crop.pixels_to_input(model_pixels)), model_pixels, atol=1e-9)
    if min(crop.scale) <= 1.0:
        picked_x = np.round(crop.pixels_to_input(np.stack([np.arange(width), np.zeros(width)], -1))[:, 0])
        picked_y = np.round(crop.pixels_to_input(np.stack([np.zeros(height), np.arange(height)], -1))[:, 1])
        np.testing.assert_array_equal(restored[picked_y.astype(int)][:, picked_x.astype(int)], model)
    with pytest.raises(ValueError, match='model size'):
        crop.image_to_input(np.zeros((height + 1, width)))


def test_crop_region_of_a_hand_made_crop() -> None:
    crop = ImageCrop(input_size=(200, 100), resized_size=(100, 50), crop_box=(25, 0, 75, 50))
    assert crop.input_region() == (50, 0, 100, 100)
    columns, rows = crop.model_index_maps()
    assert columns[49] == -1 and columns[50] == 0 and columns[51] == 0 and columns[149] == 49 and columns[150] == -1
    np.testing.assert_array_equal(rows, np.arange(100) // 2)


# ----------------------------------------------------------------------------------------------- a whole answer
def test_answer_3d_of_a_synthetic_scene() -> None:
    result, answer, K_input = synthetic_scene()
    threshold = 0.6
    answer3d = query3d.answer_3d(result, answer, threshold, cluster_distance=0.05, min_cluster_points=5,
                                 extent_percentile=0.0)
    assert answer3d.phrases == ('box', 'wall') and answer3d.views == (0, 1) and answer3d.metric
    box_points, wall_points = answer3d.points
    masks = answer.masks(threshold)
    assert len(box_points) == masks[:, 0].sum() and len(wall_points) == masks[:, 1].sum()
    np.testing.assert_array_equal(box_points.view, np.repeat([0, 1], masks[:, 0].sum(axis=(1, 2))))
    assert (box_points.probability >= threshold).all()
    np.testing.assert_array_equal(box_points.rgb[box_points.view == 0],
                                  result.image_1[masks[0, 0]])                 # colours of the model image
    # the two rectangles, each seen by both views, are two objects; the larger one (more points) ranks first
    detections = answer3d.detections[0]
    assert len(detections) == 2
    expected = sorted(RECTANGLES, key=lambda r: -(r[1] - r[0]) * (r[3] - r[2]) / r[4] ** 2)
    for detection, (x0, x1, y0, y1, z) in zip(detections, expected):
        np.testing.assert_allclose(detection.box.center, [(x0 + x1) / 2, (y0 + y1) / 2, z], atol=0.01)
        np.testing.assert_allclose(np.sort(detection.box.size), np.sort([x1 - x0, y1 - y0, 0.0]), atol=0.02)
        np.testing.assert_allclose(np.abs(detection.box.rotation[:, 0]), [1, 0, 0], atol=1e-3)  # longer side: x
        assert detection.box.contains(box_points.xyz[detection.point_indices], 1e-6).all()
    assert detections[0].score > detections[1].score
    # camera masks: input size, nothing outside the region the model saw, and every point of the phrase projects
    # (input camera K, each view's own camera) into its view's camera mask
    assert answer3d.camera_regions[0] == result.crop_1.input_region() == (answer3d.camera_regions[1])
    x, y, w, h = answer3d.camera_regions[0]
    for view, camera_masks in enumerate(answer3d.camera_masks):
        assert camera_masks.shape == (2, INPUT_SIZE[1], INPUT_SIZE[0]) and camera_masks.dtype == bool
        outside = np.ones(camera_masks.shape[1:], bool)
        outside[y:y + h, x:x + w] = False
        assert not camera_masks[:, outside].any() and camera_masks[0].any()
        camera_xyz = box_points.xyz[box_points.view == view].astype(np.float64) - [BASELINE * view, 0, 0]
        uvw = camera_xyz @ K_input.T
        u, v = np.round(uvw[:, 0] / uvw[:, 2]).astype(int), np.round(uvw[:, 1] / uvw[:, 2]).astype(int)
        assert camera_masks[0, v, u].all()
        assert not camera_masks[1, v, u].any()          # a pixel is in one phrase's mask only


def test_answer_3d_of_one_view_with_unconfident_points() -> None:
    result, answer, _ = synthetic_scene()
    conf_1 = result.conf_1.copy()
    conf_1[:, : conf_1.shape[1] // 2] = 1.0                       # left half below min_confidence
    pts3d_1 = result.pts3d_1.copy()
    pts3d_1[0, :] = np.nan
    result = replace(result, conf_1=conf_1, pts3d_1=pts3d_1, min_confidence=1.5)
    left = answer.select_views([0])
    points = query3d.phrase_points(result, left, 0.0)
    mask = left.masks(0.0)[0]
    valid = np.isfinite(pts3d_1).all(-1) & (conf_1 >= 1.5)
    for p, phrase_points in enumerate(points):
        assert len(phrase_points) == (mask[p] & valid).sum() and np.isfinite(phrase_points.xyz).all()
        assert (phrase_points.view == 0).all()
        rows, columns = np.divmod(phrase_points.pixel, result.size[0])
        assert valid[rows, columns].all() and mask[p, rows, columns].all()
    masks, regions = query3d.camera_masks(result, left, 0.0)
    assert len(masks) == len(regions) == 1
    small = QueryResult(phrases=('a',), views=(0,), logits=np.zeros((1, 1, 4, 4), np.float32), point_logits=None,
                        logit_scale=1.0)
    with pytest.raises(ValueError, match='size'):
        query3d.phrase_points(result, small)
