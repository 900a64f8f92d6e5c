"""Imports every module that registers HTTP routes (see server.route_installer).

Each area adds one import line here for its module.
"""

from __future__ import annotations
