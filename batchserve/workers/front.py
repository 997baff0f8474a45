"""The HTTP front of a process, as the settings ask: the API over a service, and the Site
that serves it. One process builds it over its own service; each edge process over its
service through the core (``edge.py``)."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Site

from batchserve.config import ServeSettings
from batchserve.http.auth import Tokens
from batchserve.http.pacing import RefusalPacer
from batchserve.http.responder import ApiMetrics
from batchserve.http.site import make_site
from batchserve.http.v1 import BatchserveAPI
from batchserve.serving.service import ImageService


def api_and_site(
    settings: ServeSettings,
    service: ImageService,
    metrics: ApiMetrics,
    clock: IReactorTime,
    images_per_s: Callable[[], float],
) -> tuple[BatchserveAPI, Site]:
    """The API (v1, v2, the page) over ``service``, and its Site: tokens, limits, the
    refusal pacer (at ``images_per_s``, the model's rate) and the connection limits."""
    server = settings.server
    api = BatchserveAPI(
        service,
        metrics,
        settings.limits,
        Tokens(api=server.api_token, write=server.write_token),
        metrics_here=not server.metrics_address,
        pacer=RefusalPacer(clock, images_per_s, server.refusals_per_image),
    )
    site = make_site(
        api.resource(),
        settings.limits.max_body_bytes,
        server.access_log,
        api.refuse_early,
        server.trusted_proxies(),
        guard=server.browser_guard(),
        limits=server.connection_limits(),
        clock=clock,
    )
    return api, site
