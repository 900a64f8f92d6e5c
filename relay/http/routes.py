"""Imports every module that registers HTTP routes (see server.route_installer).

Each area adds one import line here for its module.
"""

from __future__ import annotations

from relay.http import (
    api,  # noqa: F401  (/api/v1)
    metrics,  # noqa: F401  (GET /metrics)
    tracking,  # noqa: F401  (open pixel)
    unsubscribe,  # noqa: F401  (/u/TOKEN, RFC 8058 one-click)
)
