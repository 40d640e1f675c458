"""lsm_node's ~/query and ~/render wiring alone (lsm_ros.ros.service_host.ServiceHost) with a fake node: the
services it creates, the one wrapper (counted, refused with the reason, failures caught), the model access the life
cycle closes, the latest reconstruction."""
from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest

from conftest import LogRecords
from lsm_ros.ros import names
from lsm_ros.ros.counters import NodeCounters
from lsm_ros.ros.service_host import QUERY, RENDER, ServiceHost
from lsm_ros.ros.services import LatestReconstruction, QueryRefused
from lsm_ros.srv import RenderView, TextQuery

pytestmark = pytest.mark.timeout(60)


class FakeNode:
    def __init__(self) -> None:
        self.services: list[tuple[Any, str, Callable[..., Any]]] = []
        self.destroyed: list[Any] = []

    def create_service(self, srv_type: Any, name: str, callback: Callable[..., Any], **kwargs: Any) -> Any:
        assert kwargs['callback_group'] is not None       # each service in a group of its own
        self.services.append((srv_type, name, callback))
        return name

    def destroy_service(self, service: Any) -> None:
        self.destroyed.append(service)


@pytest.fixture
def host() -> tuple[ServiceHost, NodeCounters, FakeNode, dict[str, Any], LogRecords]:
    logs = LogRecords()
    logger = logging.getLogger(f'test_node_service_host.{id(logs)}')
    logger.addHandler(logs)
    logger.propagate = False
    counters = NodeCounters(lambda: logger, 0.0)
    state: dict[str, Any] = {'model': SimpleNamespace(semantic=False)}
    node = FakeNode()
    return (ServiceHost(node, counters, reconstructor=lambda: state['model'], default_labels=lambda: ('chair',)),
            counters, node, state, logs)


def test_create_and_destroy_both_services(host: Any) -> None:
    service_host, _, node, _, _ = host
    service_host.create()
    assert [(t, n) for t, n, _ in node.services] == [(TextQuery, names.QUERY_SERVICE), (RenderView,
                                                                                        names.RENDER_SERVICE)]
    service_host.destroy()
    assert node.destroyed == [names.QUERY_SERVICE, names.RENDER_SERVICE]


def test_calls_are_refused_with_the_reason_until_the_life_cycle_opens_the_model(host: Any) -> None:
    service_host, counters, _, state, logs = host
    response = service_host.answer(QUERY, TextQuery.Response(), lambda model: 'never')
    assert not response.success and 'not configured yet' in response.message
    service_host.access.open()
    state['model'] = None
    response = service_host.answer(RENDER, RenderView.Response(), lambda model: 'never')
    assert (response.success, response.message) == (False, 'lsm_node is not configured')
    counts = counters.snapshot()[0]
    assert counts == {'queries': 1, 'queries_refused': 1, 'renders': 1, 'renders_refused': 1}
    assert [level for level, m in logs.records if 'refused' in m] == ['WARNING', 'WARNING']


def test_an_answer_fills_the_response_a_failure_is_caught_counted_and_logged(host: Any) -> None:
    service_host, counters, _, state, logs = host
    service_host.access.open()

    def good(model: Any) -> str:
        assert model is state['model']
        return '2 phrase(s)'

    response = service_host.answer(QUERY, TextQuery.Response(success=True), good)
    assert response.success and response.message.startswith('2 phrase(s) in ') and response.message.endswith(' s')
    response = service_host.answer(QUERY, TextQuery.Response(), lambda model: 1 / 0)
    assert not response.success and response.message == 'query failed: ZeroDivisionError: division by zero'
    assert counters.snapshot()[0] == {'queries': 2, 'queries_failed': 1}
    assert [m for level, m in logs.records if level == 'ERROR'] == [
        '~/query failed: ZeroDivisionError: division by zero']


def test_the_latest_reconstruction_is_kept_until_destroyed(host: Any) -> None:
    service_host, _, _, _, _ = host
    with pytest.raises(QueryRefused, match='no reconstruction yet'):
        service_host.latest(QueryRefused)
    latest = LatestReconstruction(result=None, stamp_ns=5, left_frame='l', right_frame='r', labelled=None)
    service_host.keep(latest)
    assert service_host.latest(QueryRefused) is latest
    service_host.destroy()
    with pytest.raises(QueryRefused):
        service_host.latest(QueryRefused)


def test_close_refuses_new_calls_and_waits_for_a_running_one(host: Any) -> None:
    service_host, _, _, _, logs = host
    service_host.access.open()
    inside, leave = threading.Event(), threading.Event()
    answers: list[Any] = []

    def slow(model: Any) -> str:
        inside.set()
        leave.wait(10.0)
        return 'slow'

    thread = threading.Thread(target=lambda: answers.append(service_host.answer(QUERY, TextQuery.Response(), slow)))
    thread.start()
    assert inside.wait(10.0)
    threading.Timer(0.3, leave.set).start()
    started = time.monotonic()
    service_host.close('inactive: activate first', timeout_s=10.0)
    assert time.monotonic() - started >= 0.2          # it waited for the call using the model
    thread.join(10.0)
    assert answers[0].message.startswith('slow in ')
    refused = service_host.answer(QUERY, TextQuery.Response(), slow)
    assert (refused.success, refused.message) == (False, 'inactive: activate first')
    service_host.access.open()
    inside.clear()
    leave.clear()
    thread = threading.Thread(target=lambda: service_host.answer(QUERY, TextQuery.Response(), slow))
    thread.start()
    assert inside.wait(10.0)
    service_host.close('gone', timeout_s=0.1)         # a call still running: warned, freed anyway
    leave.set()
    thread.join(10.0)
    assert any('still use the model after 0.1 s' in m for _, m in logs.records)


def test_the_feature_pca_is_fitted_once_per_reconstruction(host: Any) -> None:
    service_host = host[0]
    rng = np.random.default_rng(0)
    gaussians = SimpleNamespace(features=rng.normal(size=(64, 8)).astype(np.float32))
    first = service_host.feature_pca(gaussians)
    assert service_host.feature_pca(gaussians) is first
    assert service_host.feature_pca(SimpleNamespace(features=gaussians.features.copy())) is not first

