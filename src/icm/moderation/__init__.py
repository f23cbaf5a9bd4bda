"""Moderation: backends, the engine, the per-image record and the batch job."""

from icm.moderation.bundle import BundleModerator, BundleOverview, moderate_bundle, overview, overviews
from icm.moderation.engine import Moderator, build_queries, moderate
from icm.moderation.record import ModerationRecord

__all__ = [
    "BundleModerator", "BundleOverview", "ModerationRecord", "Moderator", "build_queries", "moderate", "moderate_bundle",
    "overview", "overviews",
]
