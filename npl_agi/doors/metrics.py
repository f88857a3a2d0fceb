"""Prometheus metrics of the FastAGI server, served on a loopback port from the event loop."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from npl_agi.chain.breaker import CLOSED, HALF_OPEN, OPEN

MAX_REQUEST = 8192  # a scrape's request head; anything longer is not a scraper


class Metrics:
    """One registry per server, so tests (and two servers in one process) never share counters."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.lookups = Counter("npl_lookups", "Lookups by NPL_ERR and NPL_SOURCE", ["npl_err", "source"], registry=r)
        self.cache_hits = Counter("npl_cache_hits", "Numbers answered from the cache", registry=r)
        self.cache_misses = Counter("npl_cache_misses", "Numbers the cache did not have", registry=r)
        self.batch_numbers = Histogram(
            "npl_batch_numbers",
            "Numbers per request to the service",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.service_seconds = Histogram(
            "npl_service_seconds",
            "Duration of requests to the service (lock wait included)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.requests = Counter("npl_service_requests", "Requests to the service, by outcome", ["outcome"], registry=r)
        self.deadline_misses = Counter("npl_deadline_misses", "Calls past their deadline", registry=r)
        self.breaker = Enum("npl_breaker", "Circuit breaker state", states=[CLOSED, OPEN, HALF_OPEN], registry=r)
        self.in_flight = Gauge("npl_calls_in_flight", "FastAGI calls being served", registry=r)
        self.refused = Counter("npl_connections_refused", "FastAGI connections closed at once (limits)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int) -> asyncio.Server:
        """``GET /metrics`` (any path) over plain HTTP/1.0, one answer per connection."""
        return await asyncio.start_server(self._scrape, host, port, limit=MAX_REQUEST)

    async def _scrape(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                await reader.readuntil(b"\r\n\r\n")
                body = self.render()
                head = f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\nContent-Length: {len(body)}\r\n\r\n"
                writer.write(head.encode() + body)
                await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            # A client that is not a scraper gets nothing.
            return
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
