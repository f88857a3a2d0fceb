"""What npl-agi check says of a configuration that asks an endpoint for more than its API page
documents (pure: no network)."""

from npl_agi.core.endpoints import beyond_limits, endpoint_of

CURRENT = "https://api.numberportabilitylookup.com/npl"
OLD = "https://secure.comcetera.com/npl"


def test_the_current_endpoint_takes_100_numbers_and_5_connections():
    assert beyond_limits(CURRENT, 100, 5) == []
    said = beyond_limits(CURRENT, 1000, 6)
    assert len(said) == 2
    assert "batch_size = 1000" in said[0] and "at most 100 numbers" in said[0]
    assert "connections = 6" in said[1] and "unless agreed otherwise" in said[1]


def test_the_v24_endpoints_take_1000_numbers_one_connection_and_are_deprecated():
    for url in (OLD, "http://api.comcetera.com/npl", "https://SECURE.comcetera.com/npl"):
        said = beyond_limits(url, 1000, 1)
        assert len(said) == 1 and "deprecated" in said[0] and CURRENT in said[0]
    said = beyond_limits(OLD, 1000, 2)
    assert "connections = 2" in said[0] and "at most 1 concurrent" in said[0]


def test_an_undocumented_host_says_nothing():
    assert endpoint_of("http://127.0.0.1:8080/npl") is None
    assert beyond_limits("http://127.0.0.1:8080/npl", 1000, 8) == []
    assert beyond_limits("http://[::1", 1000, 8) == []
