"""``mapjax explore``: a live palette explorer served to the browser from this process.

:class:`ExploreSession` (:mod:`mapjax.explore.session`) holds one pool, warm, and answers the page's requests
(solve, nearest reachable palette, samples, histograms, prompts) as JSON-ready dicts; it needs nothing beyond
mapjax itself. :func:`mapjax.explore.server.create_app` puts it behind HTTP with Starlette and
:func:`mapjax.explore.server.serve` runs that with uvicorn: both come with the optional extra,
``pip install 'mapjax[explore]'``, and are imported only when a server is asked for.
"""

from __future__ import annotations

from mapjax.explore.session import ExploreSession, MissingDependencyError, RequestError

__all__ = ["ExploreSession", "MissingDependencyError", "RequestError"]
