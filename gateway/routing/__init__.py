"""Routing: deployments, keys, strategies, health, retries and fallbacks."""

from gateway.routing.attempts import run_attempts
from gateway.routing.router import Group, Router

__all__ = ["Group", "Router", "run_attempts"]
