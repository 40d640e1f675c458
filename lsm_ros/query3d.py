"""3-D answers to text queries: the phrase's points, its objects with oriented boxes, and masks on the input images.

Framework-free (numpy and scipy; no ROS, no torch). From a :class:`~lsm_ros.pipeline.Reconstruction` and the
:class:`~lsm_ros.semantics.QueryResult` of phrases on some of its views:

- :func:`phrase_points`: per phrase, the points of the answered views whose pixel is in the phrase's mask (label
  = the phrase and probability >= threshold) and whose point is finite and confident (DUSt3R confidence >=
  the reconstruction's ``min_confidence``): xyz in the left (view 1) optical frame, metres when the
  reconstruction is metric, else model units (the point maps themselves, as ``~/points``), their colour and
  probability;
- :func:`euclidean_clusters`: exact single-linkage clustering at a distance: two points are in one cluster when
  a chain of points joins them with every step at most ``distance`` long (deterministic);
- :func:`oriented_box`: an oriented 3-D box of points: PCA axes (right-handed), robust extent;
- :func:`detect_objects`: a phrase's points split into objects (clusters), scored, best first;
- :func:`camera_masks`: the masks mapped back onto the input images (the pre-processing resize and crop undone
  by nearest neighbour; pixels the model did not see are outside every mask) and the region the model saw;
- :func:`answer_3d`: all of it for a query (:class:`Query3D`).

Score of an object (:func:`detect_objects`): ``mean probability of its points x its share of the phrase's
points``, in [0, 1]: a large object the model is sure of ranks first; the share counts every point of the phrase,
those of dropped small clusters included.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from lsm_ros.semantics import QueryResult

if TYPE_CHECKING:      # the pipeline imports torch; this module does not need it
    from lsm_ros.pipeline import Reconstruction

_log = logging.getLogger(__name__)

DEFAULT_EXTENT_PERCENTILE = 2.0      # box extent: 2nd to 98th percentile of the points along each axis
_BRUTE_FORCE_PAIRS = 1 << 16         # cell pairs with more point pairs than this are tested with a k-d tree
_BRUTE_FORCE_CHUNK = 1 << 21         # point pairs tested at once (memory bound of the vectorised test)
_MAX_CELL_INDEX = float(1 << 50)     # |coordinate / cell side| beyond this cannot be a cell index


@dataclass(frozen=True, eq=False)
class PhrasePoints:
    """The points of one phrase (N of them), view 1's (left) points first, each view's row-major.

    ``xyz`` (N, 3) float32 in the left optical frame (metres when metric, else model units); ``rgb`` (N, 3)
    uint8 model-image colour; ``probability`` (N,) float32 the phrase's probability at the point's pixel;
    ``view`` (N,) uint8 (0 left, 1 right); ``pixel`` (N,) int64 flat pixel index ``view*H*W + row*W + column``
    (the row of its Gaussian and ``Reconstruction.points()['index']``).
    """

    phrase: str
    xyz: np.ndarray
    rgb: np.ndarray
    probability: np.ndarray
    view: np.ndarray
    pixel: np.ndarray

    def __len__(self) -> int:
        return len(self.xyz)

    def subset(self, index: np.ndarray) -> 'PhrasePoints':
        """The points at ``index`` (an integer or boolean index)."""
        return PhrasePoints(self.phrase, self.xyz[index], self.rgb[index], self.probability[index],
                            self.view[index], self.pixel[index])


@dataclass(frozen=True, eq=False)
class OrientedBox:
    """A box of points in their frame: ``center`` (3,), ``size`` (3,) edge lengths along the box axes,
    ``rotation`` (3, 3) box-to-frame rotation (columns: the box axes, the longest spread first; det +1),
    ``quaternion`` (4,) the same rotation as (x, y, z, w), w >= 0."""

    center: np.ndarray
    size: np.ndarray
    rotation: np.ndarray
    quaternion: np.ndarray

    def contains(self, xyz: np.ndarray, tolerance: float = 0.0) -> np.ndarray:
        """(N,) bool: which points of ``xyz`` (N, 3) lie inside the box grown by ``tolerance`` on every side."""
        local = (np.asarray(xyz, dtype=np.float64) - self.center) @ self.rotation
        return np.all(np.abs(local) <= self.size / 2 + tolerance, axis=-1)


@dataclass(frozen=True, eq=False)
class ObjectDetection:
    """One object of a phrase: its box, score (see the module), number of points, mean probability and the
    indices of its points in the phrase's :class:`PhrasePoints`."""

    phrase: str
    box: OrientedBox
    score: float
    num_points: int
    mean_probability: float
    point_indices: np.ndarray


@dataclass(frozen=True, eq=False)
class Query3D:
    """The 3-D answer of a query: per phrase (request order) its points and its objects (best first); per
    answered view (``views`` order) its camera masks (P, H_in, W_in) bool at the input image size and the region
    ``(x_offset, y_offset, width, height)`` of the input image the model saw. ``metric``: lengths in metres."""

    phrases: tuple[str, ...]
    views: tuple[int, ...]
    points: tuple[PhrasePoints, ...]
    detections: tuple[tuple[ObjectDetection, ...], ...]
    camera_masks: tuple[np.ndarray, ...]
    camera_regions: tuple[tuple[int, int, int, int], ...]
    metric: bool
    cluster_distance: float


# ----------------------------------------------------------------------------------------------- points
def _check_sizes(result: 'Reconstruction', answer: QueryResult) -> None:
    if answer.image_size != result.size:
        raise ValueError(f'the answer is of size {answer.image_size} (width, height), the reconstruction of size '
                         f'{result.size}: answer a query on this reconstruction')


def phrase_points(result: 'Reconstruction', answer: QueryResult, threshold: float = 0.0) -> tuple[PhrasePoints, ...]:
    """Per phrase of ``answer``, its points on the answered views (see :class:`PhrasePoints`): pixels in the
    phrase's mask at ``threshold`` (:meth:`QueryResult.masks`) with a finite point of confidence >=
    ``result.min_confidence``."""
    _check_sizes(result, answer)
    masks = answer.masks(threshold)
    probabilities = answer.probabilities
    width, height = result.size
    parts: list[list[tuple[np.ndarray, ...]]] = [[] for _ in answer.phrases]
    for position, view in enumerate(answer.views):
        pts, conf, image = ((result.pts3d_1, result.conf_1, result.image_1) if view == 0
                            else (result.pts3d_2, result.conf_2, result.image_2))
        valid = np.isfinite(pts).all(axis=-1) & (conf >= result.min_confidence)
        for p in range(len(answer.phrases)):
            rows, columns = np.nonzero(masks[position, p] & valid)
            parts[p].append((pts[rows, columns].astype(np.float32), image[rows, columns].astype(np.uint8),
                             probabilities[position, p, rows, columns].astype(np.float32),
                             np.full(len(rows), view, np.uint8),
                             view * height * width + rows.astype(np.int64) * width + columns))
    return tuple(PhrasePoints(phrase, *(np.concatenate([part[i] for part in parts[p]]) for i in range(5)))
                 for p, phrase in enumerate(answer.phrases))


# ----------------------------------------------------------------------------------------------- clustering
def _squared_norms(vectors: np.ndarray) -> np.ndarray:
    """(K,) squared lengths of (K, 3) vectors."""
    return np.einsum('ij,ij->i', vectors, vectors)


def _segments(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments ``[starts[i], starts[i] + counts[i])``: (the segment of each element, the element)."""
    segment = np.repeat(np.arange(len(counts)), counts)
    offsets = np.cumsum(counts) - counts
    return segment, starts[segment] + np.arange(int(counts.sum())) - offsets[segment]


def _pairs_within(points: np.ndarray, starts: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray,
                  distance: float) -> np.ndarray:
    """(K,) bool: whether cells ``a[k]`` and ``b[k]`` (of sorted ``points``, cell i = ``points[starts[i]:
    starts[i] + counts[i]]``) hold two points at most ``distance`` apart (exact)."""
    linked = np.zeros(len(a), bool)
    work = counts[a] * counts[b]
    small = np.flatnonzero(work <= _BRUTE_FORCE_PAIRS)
    limit = distance * distance
    cumulative = np.cumsum(work[small])
    begin = 0
    while begin < len(small):     # vectorised: every point pair of a chunk of cell pairs
        done = cumulative[begin - 1] if begin else 0
        end = max(begin + 1, int(np.searchsorted(cumulative, done + _BRUTE_FORCE_CHUNK, 'right')))
        chunk = small[begin:end]
        ka, kb = counts[a[chunk]], counts[b[chunk]]
        pair_of, local = _segments(np.zeros(len(chunk), np.int64), ka * kb)
        ia = starts[a[chunk]][pair_of] + local // kb[pair_of]
        ib = starts[b[chunk]][pair_of] + local % kb[pair_of]
        squared = _squared_norms(points[ia] - points[ib])
        first = np.cumsum(ka * kb) - ka * kb
        linked[chunk] = np.minimum.reduceat(squared, first) <= limit
        begin = end
    for k in np.flatnonzero(work > _BRUTE_FORCE_PAIRS):   # large cells: a k-d tree of one of them
        cell_a = points[starts[a[k]]:starts[a[k]] + counts[a[k]]]
        cell_b = points[starts[b[k]]:starts[b[k]] + counts[b[k]]]
        nearest, _ = cKDTree(cell_b).query(cell_a, k=1, distance_upper_bound=distance * (1 + 1e-12))
        linked[k] = bool(np.any(nearest <= distance))
    return linked


def _unique_cells(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(cells, axis=0, return_inverse=True)`` of (N, 3) int64 cell coordinates, through one int64 key
    per cell (the dense rank of each coordinate along its axis: at most N**3 < 2**63 keys for N < 2**21 points)."""
    ranks, sizes = [], []
    for axis in range(3):
        values, rank = np.unique(cells[:, axis], return_inverse=True)
        ranks.append(rank.reshape(-1).astype(np.int64))
        sizes.append(len(values))
    if float(sizes[0]) * sizes[1] * sizes[2] >= 2.0 ** 62:
        unique, inverse = np.unique(cells, axis=0, return_inverse=True)
        return unique, inverse.reshape(-1)
    keys = (ranks[0] * sizes[1] + ranks[1]) * sizes[2] + ranks[2]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return cells[first], inverse.reshape(-1)


def euclidean_clusters(xyz: np.ndarray, distance: float) -> np.ndarray:
    """(N,) int64 cluster of each point of ``xyz`` (N, 3): exact single-linkage at ``distance``, i.e. the
    connected components of the graph joining every two points at most ``distance`` apart. Clusters are numbered
    0, 1, ... in the order of their first point (deterministic).

    Method: a grid of cells of side ``distance / sqrt(3)`` (the points of one cell are within ``distance`` of each
    other, so a cell is connected); two cells at most 2 apart along every axis are joined when their closest points
    are within ``distance``: accepted at once when the points nearest the cells' centroids are, refused when the
    cells' bounding boxes are farther apart, and otherwise tested exactly, only between cells not yet connected.
    Memory and time grow with the number of occupied cells, not with the number of point pairs.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f'xyz must be (N, 3), got {xyz.shape}')
    distance = float(distance)
    if not (np.isfinite(distance) and distance > 0):
        raise ValueError(f'the clustering distance must be a positive finite length, got {distance!r}')
    if not np.isfinite(xyz).all():
        raise ValueError('xyz must be finite')
    n = len(xyz)
    if n == 0:
        return np.zeros(0, np.int64)
    side = distance / np.sqrt(3.0)
    scaled = np.floor(xyz / side)
    if np.abs(scaled).max() > _MAX_CELL_INDEX:
        raise ValueError(f'points up to {np.abs(xyz).max():.3g} from the origin are too far for a clustering '
                         f'distance of {distance:.3g}')
    cells, cell_of_point = _unique_cells(scaled.astype(np.int64))
    m = len(cells)
    order = np.argsort(cell_of_point, kind='stable')
    points = xyz[order]
    counts = np.bincount(cell_of_point, minlength=m)
    starts = np.cumsum(counts) - counts
    edges_a, edges_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if m > 1:
        # candidate cell pairs: at most 2 cells apart along each axis (points within distance are)
        pairs = cKDTree(cells.astype(np.float64)).query_pairs(2.5, p=np.inf, output_type='ndarray')
        a, b = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
        gap_squared = np.zeros(len(a))
        for axis in range(3):      # per axis: fewer and smaller temporaries than on (K, 3) arrays
            coordinate = np.ascontiguousarray(points[:, axis])
            low, high = np.minimum.reduceat(coordinate, starts), np.maximum.reduceat(coordinate, starts)
            gap_squared += np.maximum(0.0, np.maximum(low[a] - high[b], low[b] - high[a])) ** 2
        near = gap_squared <= distance * distance
        a, b = a[near], b[near]
        # quick acceptance: the point of each cell nearest to its centroid
        centroid = np.add.reduceat(points, starts, axis=0) / counts[:, None]
        cell_of_sorted = np.repeat(np.arange(m), counts)
        offset = _squared_norms(points - centroid[cell_of_sorted])
        nearest = offset == np.minimum.reduceat(offset, starts)[cell_of_sorted]
        representative = points[np.minimum.reduceat(np.where(nearest, np.arange(n), n), starts)]
        quick = _squared_norms(representative[a] - representative[b]) <= distance * distance
        edges_a.append(a[quick])
        edges_b.append(b[quick])
        a, b = a[~quick], b[~quick]
        if len(a):
            graph = coo_matrix((np.ones(len(edges_a[-1]), bool), (edges_a[-1], edges_b[-1])), shape=(m, m))
            _, component = connected_components(graph, directed=False)
            apart = component[a] != component[b]
            a, b = a[apart], b[apart]
            linked = _pairs_within(points, starts, counts, a, b, distance)
            edges_a.append(a[linked])
            edges_b.append(b[linked])
    rows, columns = np.concatenate(edges_a), np.concatenate(edges_b)
    graph = coo_matrix((np.ones(len(rows), bool), (rows, columns)), shape=(m, m))
    _, component = connected_components(graph, directed=False)
    labels = component[cell_of_point]
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind='stable')] = np.arange(len(first))
    return rank[labels]


# ----------------------------------------------------------------------------------------------- boxes
def oriented_box(xyz: np.ndarray, extent_percentile: float = DEFAULT_EXTENT_PERCENTILE) -> OrientedBox:
    """The oriented box of points ``xyz`` (N >= 1, 3): axes by PCA (eigenvectors of the covariance, the largest
    spread first; each of the first two axes points where its largest coordinate is positive, the third is their
    cross product, so the rotation is right-handed), extent along each axis from the ``extent_percentile``-th to
    the ``(100 - extent_percentile)``-th percentile of the points (0: min to max; a few stray points do not
    stretch the box), centre in the middle of that extent."""
    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or not len(xyz):
        raise ValueError(f'xyz must be (N >= 1, 3), got {xyz.shape}')
    if not 0.0 <= extent_percentile < 50.0:
        raise ValueError(f'extent_percentile must be in [0, 50), got {extent_percentile!r}')
    mean = xyz.mean(axis=0)
    centred = xyz - mean
    _, vectors = np.linalg.eigh(centred.T @ centred / len(xyz))
    axes = vectors[:, ::-1].copy()
    for i in (0, 1):
        axes[:, i] *= np.sign(axes[np.argmax(np.abs(axes[:, i])), i])
    axes[:, 2] = np.cross(axes[:, 0], axes[:, 1])
    local = centred @ axes
    low = np.percentile(local, extent_percentile, axis=0)
    high = np.percentile(local, 100.0 - extent_percentile, axis=0)
    quaternion = Rotation.from_matrix(axes).as_quat()
    if quaternion[3] < 0:
        quaternion = -quaternion
    return OrientedBox(center=mean + axes @ ((low + high) / 2), size=high - low, rotation=axes,
                       quaternion=quaternion)


def detect_objects(points: PhrasePoints, distance: float, min_points: int = 1,
                   extent_percentile: float = DEFAULT_EXTENT_PERCENTILE) -> tuple[ObjectDetection, ...]:
    """The objects of a phrase: its points split by :func:`euclidean_clusters` at ``distance``, clusters of fewer
    than ``min_points`` points dropped, each with its :func:`oriented_box` and score (mean probability x share of
    the phrase's points), best first (ties: more points, then the cluster of the earlier point)."""
    if int(min_points) < 1:
        raise ValueError(f'min_points must be >= 1, got {min_points!r}')
    total = len(points)
    if total == 0:
        return ()
    labels = euclidean_clusters(points.xyz, distance)
    sizes = np.bincount(labels)
    sums = np.bincount(labels, weights=points.probability.astype(np.float64))
    kept = np.flatnonzero(sizes >= int(min_points))
    scores = sums[kept] / sizes[kept] * (sizes[kept] / total)
    ranked = kept[np.lexsort((kept, -sizes[kept], -scores))]
    order = np.argsort(labels, kind='stable')
    starts = np.cumsum(sizes) - sizes
    detections = []
    for cluster in ranked:
        index = order[starts[cluster]:starts[cluster] + sizes[cluster]]
        mean_probability = float(sums[cluster] / sizes[cluster])
        detections.append(ObjectDetection(
            phrase=points.phrase, box=oriented_box(points.xyz[index], extent_percentile),
            score=mean_probability * float(sizes[cluster]) / total, num_points=int(sizes[cluster]),
            mean_probability=mean_probability, point_indices=index))
    return tuple(detections)


# ----------------------------------------------------------------------------------------------- camera masks
def camera_masks(result: 'Reconstruction', answer: QueryResult, threshold: float = 0.0
                 ) -> tuple[tuple[np.ndarray, ...], tuple[tuple[int, int, int, int], ...]]:
    """Per answered view: its masks (P, H_in, W_in) bool on the input image (:meth:`ImageCrop.image_to_input`:
    nearest neighbour; False where the model did not see the image) and the region (x_offset, y_offset, width,
    height) of the input image the model saw (:meth:`ImageCrop.input_region`)."""
    _check_sizes(result, answer)
    masks = answer.masks(threshold)
    out_masks, regions = [], []
    for position, view in enumerate(answer.views):
        crop = result.crop_1 if view == 0 else result.crop_2
        out_masks.append(np.moveaxis(crop.image_to_input(np.moveaxis(masks[position], 0, -1), fill=False), -1, 0))
        regions.append(crop.input_region())
    return tuple(out_masks), tuple(regions)


def answer_3d(result: 'Reconstruction', answer: QueryResult, threshold: float, cluster_distance: float,
              min_cluster_points: int = 1, extent_percentile: float = DEFAULT_EXTENT_PERCENTILE) -> Query3D:
    """The 3-D answer (:class:`Query3D`) of ``answer`` on ``result``: :func:`phrase_points`,
    :func:`detect_objects` per phrase (``cluster_distance`` in the reconstruction's units: metres when metric) and
    :func:`camera_masks`."""
    points = phrase_points(result, answer, threshold)
    detections = tuple(detect_objects(p, cluster_distance, min_cluster_points, extent_percentile) for p in points)
    masks, regions = camera_masks(result, answer, threshold)
    _log.debug('3-D answer: %s', ', '.join(f'{p.phrase!r} {len(p)} points, {len(d)} objects'
                                           for p, d in zip(points, detections)))
    return Query3D(phrases=answer.phrases, views=answer.views, points=points, detections=detections,
                   camera_masks=masks, camera_regions=regions, metric=bool(result.metric_scale),
                   cluster_distance=float(cluster_distance))
