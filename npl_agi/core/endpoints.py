"""What each of the service's endpoints is documented to take: numbers per request and
connections per account, so that ``npl-agi check`` can say when the configuration asks more.

Facts from the provider's API pages. The v2.4 page (``secure.comcetera.com/npl``, its plain
HTTP twin ``api.comcetera.com/npl``): at most 1000 numbers a request and one connection per
account. The current pages (v3.3 to v3.32, ``api.numberportabilitylookup.com/npl``): at most
100 numbers a request and, since v3.32, five concurrent connections per account "unless agreed
otherwise"; a note of February 2025 calls every other endpoint deprecated. Pure: no I/O.
"""

from __future__ import annotations

from collections import namedtuple
from urllib.parse import urlsplit

Endpoint = namedtuple("Endpoint", "page numbers connections deprecated")

V24 = Endpoint("v2.4", 1000, 1, True)
CURRENT = Endpoint("v3.3 to v3.32", 100, 5, False)
CURRENT_HOST = "api.numberportabilitylookup.com"
KNOWN = {"secure.comcetera.com": V24, "api.comcetera.com": V24, CURRENT_HOST: CURRENT}


def endpoint_of(url: str) -> Endpoint | None:
    """The documented limits of the endpoint ``url`` names; None for a host not documented
    (a proxy, the bundled simulator)."""
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return None
    return KNOWN.get(host)


def beyond_limits(url: str, batch_size: int, connections: int) -> list[str]:
    """What the configuration asks of the endpoint beyond what its page documents, one line
    each (none when within its limits or the endpoint is not documented)."""
    endpoint = endpoint_of(url)
    if endpoint is None:
        return []
    said = []
    if batch_size > endpoint.numbers:
        said.append(
            f"[api] batch_size = {batch_size}: the {endpoint.page} API page documents at most"
            f" {endpoint.numbers} numbers a request for {url}"
        )
    if connections > endpoint.connections:
        agreed = " unless agreed otherwise" if endpoint is CURRENT else ""
        said.append(
            f"[api] connections = {connections}: the {endpoint.page} API page documents at most"
            f" {endpoint.connections} concurrent connection(s) per account for {url}{agreed}"
        )
    if endpoint.deprecated:
        said.append(
            f"{url}: the provider calls this endpoint deprecated since February 2025; the current one is"
            f" https://{CURRENT_HOST}/npl (at most {CURRENT.numbers} numbers a request: set batch_size)"
        )
    return said
