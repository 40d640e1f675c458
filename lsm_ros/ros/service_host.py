"""The ``~/query`` and ``~/render`` services of ``lsm_node``, wired to the node: :class:`ServiceHost` creates them
(each in its own callback group: a call never waits for image callbacks, nor they for it, and runs while the worker
computes the next pair), keeps the latest reconstruction they answer from, admits calls while the model is usable
(:class:`~lsm_ros.ros.services.ModelAccess`) and turns a refusal or a failure into ``success: false`` with the
reason, counted and logged. What a request means and how its response is filled is :mod:`lsm_ros.ros.services`'.

- ``~/query`` (lsm_ros/TextQuery): text phrases answered with masks, label images and scores on the latest
  reconstruction (semantic model);
- ``~/render`` (lsm_ros/RenderView): the latest reconstruction's Gaussians rendered from any pinhole camera posed in
  the left optical frame (RGB, depth, alpha, PCA colours of the features, labels of phrases).

The node is anything with ``create_service`` and ``destroy_service``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Protocol

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup

from lsm_ros.pipeline import GaussianCloud, Reconstructor
from lsm_ros.ros.counters import NodeCounters
from lsm_ros.ros.names import QUERY_SERVICE, RENDER_SERVICE
from lsm_ros.ros.services import (LatestReconstruction, ModelAccess, QueryRefused, RenderRefused, ServiceKind,
                                  ServiceRefused, fill_query_response, fill_render_response, parse_query_request,
                                  parse_render_request, query_answer, query_cluster_distance, render_request)
from lsm_ros.ros.services import DEFAULT_QUERY_CLUSTER_DISTANCE, DEFAULT_QUERY_MIN_CLUSTER_POINTS
from lsm_ros.srv import RenderView, TextQuery
from lsm_ros.visualization import FeaturePca

QUERY = ServiceKind(QUERY_SERVICE, 'queries', 'query')
RENDER = ServiceKind(RENDER_SERVICE, 'renders', 'render')
NOT_CONFIGURED_YET = ('lsm_node is not configured yet: configure and activate it (ros2 lifecycle set <node> '
                      'configure)')


class ServiceNode(Protocol):
    """What :class:`ServiceHost` needs of a node."""

    def create_service(self, srv_type: Any, name: str, callback: Callable[[Any, Any], Any], **kwargs: Any) -> Any: ...

    def destroy_service(self, service: Any) -> Any: ...


class ServiceHost:
    """~/query and ~/render of one node (see the module docstring).

    ``reconstructor()``: the model (None: not configured); ``default_labels()``: the ``labels`` parameter (phrases of
    a query without phrases); ``use_threads()``: gives the calling thread the configuration's torch thread count;
    ``query_clustering()``: (``query_cluster_distance``, ``query_min_cluster_points``) parameters of the 3-D answer.
    :attr:`access` admits the calls; the node opens and closes it through its life cycle."""

    def __init__(self, node: ServiceNode, counters: NodeCounters, *,
                 reconstructor: Callable[[], Reconstructor | None], default_labels: Callable[[], tuple[str, ...]],
                 use_threads: Callable[[], None] = lambda: None,
                 query_clustering: Callable[[], tuple[float, int]] = lambda: (DEFAULT_QUERY_CLUSTER_DISTANCE,
                                                                               DEFAULT_QUERY_MIN_CLUSTER_POINTS)
                 ) -> None:
        self._node, self._counters = node, counters
        self._query_clustering = query_clustering
        self._reconstructor, self._default_labels, self._use_threads = reconstructor, default_labels, use_threads
        self.access = ModelAccess(NOT_CONFIGURED_YET)
        self._services: list[Any] = []
        self._latest: LatestReconstruction | None = None
        self._feature_pca_cache: tuple[GaussianCloud, FeaturePca] | None = None

    def create(self) -> None:
        """Configure: both services, each in a callback group of its own."""
        self._services = [
            self._node.create_service(TextQuery, QUERY_SERVICE, self.on_query,
                                      callback_group=MutuallyExclusiveCallbackGroup()),
            self._node.create_service(RenderView, RENDER_SERVICE, self.on_render,
                                      callback_group=MutuallyExclusiveCallbackGroup())]

    def close(self, reason: str, timeout_s: float) -> None:
        """Refuse new calls with ``reason`` and wait up to ``timeout_s`` for those using the model (warned when some
        still do: the model is moved or freed anyway)."""
        if not self.access.close(reason, timeout_s):
            self._counters.get_logger().warning(f'~/query or ~/render calls still use the model after {timeout_s:g} '
                                                's: freeing it anyway')

    def destroy(self) -> None:
        """Cleanup: both services destroyed, the latest reconstruction dropped."""
        for service in self._services:
            self._node.destroy_service(service)
        self._services = []
        with self._counters.lock:
            self._latest, self._feature_pca_cache = None, None

    def keep(self, latest: LatestReconstruction) -> None:
        """The reconstruction the services answer from from now on."""
        with self._counters.lock:
            self._latest = latest

    def latest(self, refused: type[ServiceRefused]) -> LatestReconstruction:
        """The latest reconstruction; raises ``refused`` before the first."""
        with self._counters.lock:
            latest = self._latest
        if latest is None:
            raise refused('no reconstruction yet: the first stereo pair is still awaited or being processed')
        return latest

    def answer(self, kind: ServiceKind, response: Any, answer: Callable[[Reconstructor], str]) -> Any:
        """The one wrapper of ~/query and ~/render: count the call, hold the model while ``answer(reconstructor)``
        fills ``response`` (it returns a summary for the message), and turn a refusal (:class:`ServiceRefused`:
        bad request, no reconstruction yet, model unavailable) or a failure into ``success: false`` with the reason,
        counted (``<counter>_refused``, ``<counter>_failed``) and logged; the node goes on."""
        self._counters.count(kind.counter)
        started = time.perf_counter()
        self._use_threads()
        try:
            with self.access.use(ServiceRefused):
                reconstructor = self._reconstructor()
                if reconstructor is None:
                    raise ServiceRefused('lsm_node is not configured')
                summary = answer(reconstructor)
        except ServiceRefused as exc:
            self._counters.count(f'{kind.counter}_refused')
            self._counters.warnings.warning(f'{kind.noun}_refused', f'{kind.service} refused: {exc}')
            return type(response)(success=False, message=str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed call must not stop the executor
            self._counters.count(f'{kind.counter}_failed')
            self._counters.get_logger().error(f'{kind.service} failed: {type(exc).__name__}: {exc}')
            return type(response)(success=False, message=f'{kind.noun} failed: {type(exc).__name__}: {exc}')
        response.message = f'{summary} in {time.perf_counter() - started:.2f} s'
        return response

    def on_query(self, request: TextQuery.Request, response: TextQuery.Response) -> TextQuery.Response:
        """~/query: answer phrases on the latest reconstruction; refusals set success=false and say why."""
        def answer(reconstructor: Reconstructor) -> str:
            phrases, views, threshold = parse_query_request(request, reconstructor, self._default_labels())
            latest = self.latest(QueryRefused)
            result = query_answer(reconstructor, latest, phrases, views)
            distance, min_points = self._query_clustering()
            fill_query_response(response, latest, result, threshold, request.label_images,
                                cluster_distance=query_cluster_distance(request, distance),
                                min_cluster_points=min_points)
            return (f'{len(result.phrases)} phrase(s) on the {" and ".join(response.views)} view(s) of the '
                    f'reconstruction at {latest.stamp_ns * 1e-9:.6f} s, threshold {threshold:g},')
        return self.answer(QUERY, response, answer)

    def on_render(self, request: RenderView.Request, response: RenderView.Response) -> RenderView.Response:
        """~/render: render the latest reconstruction from the requested camera; refusals set success=false."""
        def answer(reconstructor: Reconstructor) -> str:
            checked = parse_render_request(request, reconstructor, self._default_labels())
            latest = self.latest(RenderRefused)
            camera, rendered = render_request(reconstructor, latest, checked)
            fill_render_response(response, latest, rendered, checked.channels, self.feature_pca)
            return (f'{", ".join(checked.channels)} at {camera.width}x{camera.height} of the reconstruction at '
                    f'{latest.stamp_ns * 1e-9:.6f} s')
        return self.answer(RENDER, response, answer)

    def feature_pca(self, gaussians: GaussianCloud) -> FeaturePca:
        """The PCA colouring of a reconstruction's features, fitted once on its Gaussians' features."""
        with self._counters.lock:
            cached = self._feature_pca_cache
        if cached is not None and cached[0] is gaussians:
            return cached[1]
        pca = FeaturePca.fit(gaussians.features)
        with self._counters.lock:
            self._feature_pca_cache = (gaussians, pca)
        return pca
