"""The server's routes, one :class:`fastapi.APIRouter` per concern.

* :mod:`.moderation`: ``POST /v1/moderate`` (native) and ``POST /v1/moderations`` (OpenAI-compatible);
* :mod:`.review`: decisions, reviews, the review queue, kept images, the review page;
* :mod:`.admin`: policies, health, metrics.

Each route finds the shared :class:`~icm.serve.service.Service` on ``request.app.state``.
"""
