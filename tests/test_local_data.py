"""Numbers you know, ranges of your own and the range holder: stages of the one chain, through
both doors (the FastAGI server and the process script), on the simulator and real SQLite files
(and a real redis-server for a cluster)."""

from __future__ import annotations

import time

import pytest
from conftest import write_config
from doors import but_time, door_configs, through_both_doors

from npl_agi.admin import cli
from npl_agi.askers.direct import lookup_here
from npl_agi.backends import SqliteCache
from npl_agi.backends.base import KNOWN_NUMBERS, RANGES
from npl_agi.config import load_config
from npl_agi.core.errors import LookupTimeout
from npl_agi.core.protocol import Answer
from npl_agi.doubles.simulator import Simulator, simulated_answer

pytest_plugins = ("redis_fixture",)

NEVER_SEEN = "07400100001"  # 447400100001: no test asks it before


def import_csv(conf, command: str, tmp_path, text: str) -> int:
    path = tmp_path / f"{command}.csv"
    path.write_text(text)
    return cli.main(["--config", str(conf), command, "import", str(path)])


def the_same(variables: dict[str, dict[str, str]]) -> dict[str, str]:
    assert but_time(variables["server"]) == but_time(variables["process"])
    return but_time(variables["server"])


def test_a_known_number_costs_nothing_and_answers_local_through_both_doors(tmp_path, sim, subprocess_env):
    """Known before the cache: a cached answer of the same number is not what the call gets."""
    confs = door_configs(tmp_path, sim)
    for conf in confs.values():
        assert import_csv(conf, "local", tmp_path, "number,mccmnc,note\n+44 7788 450450,23430,on-net\n") == 0
        SqliteCache(load_config(str(conf)).cache).put_many([Answer("447788450450", mccmnc="23415")])
    v = the_same(through_both_doors(confs, subprocess_env, "07788450450"))
    assert (v["NPL_MCCMNC"], v["NPL_SOURCE"], v["NPL_ERR"], v["NPL_NUMBER"]) == ("23430", "local", "", "447788450450")
    assert v["NPL_NETWORK"] == "EE"
    assert sim.stats()["charged"] == []
    stats = SqliteCache(load_config(str(confs["process"])).cache).stats()
    assert (stats["hits"], stats["misses"]) == (0, 0)  # not the cache's: no credit saved by it


def test_a_file_with_a_bad_line_imports_nothing_and_names_every_bad_line(tmp_path, sim, capsys):
    conf = write_config(tmp_path / "npl-agi.conf", sim.url)
    good = "07700900001,23415\n"
    assert import_csv(conf, "local", tmp_path, good + "07700900002,2341X\n" + good + "not-a-number,23410\n") == 2
    err = capsys.readouterr().err
    assert "2 bad line(s), nothing imported" in err
    assert "line 2: mccmnc '2341X'" in err and "line 4: 'not-a-number' is not a number" in err
    assert list(SqliteCache(load_config(str(conf)).cache).local_items(KNOWN_NUMBERS)) == []
    assert import_csv(conf, "ranges", tmp_path, "447,23415\n44x7,23410\n") == 2
    assert "line 2: prefix '44x7'" in capsys.readouterr().err
    assert list(SqliteCache(load_config(str(conf)).cache).local_items(RANGES)) == []


def test_local_list_delete_and_clear(tmp_path, sim, capsys):
    conf = write_config(tmp_path / "npl-agi.conf", sim.url)
    assert import_csv(conf, "local", tmp_path, '07700900001,23415,"Sales, 2nd floor"\n07700900002,23410\n') == 0
    assert cli.main(["--config", str(conf), "local", "delete", "+44 7700 900002"]) == 0
    capsys.readouterr()
    assert cli.main(["--config", str(conf), "local", "list"]) == 0
    assert capsys.readouterr().out == 'number,mccmnc,note\n447700900001,23415,"Sales, 2nd floor"\n'
    assert cli.main(["--config", str(conf), "local", "clear"]) == 0
    assert capsys.readouterr().out == "deleted 1 numbers\n"
    assert cli.main(["--config", str(conf), "local", "delete", "x1"]) == 2


def test_ranges_take_a_delta_as_numbers_do(tmp_path, sim, capsys):
    """One import path for both kinds: a prefix changed, one removed, one added, all or nothing."""
    conf = write_config(tmp_path / "npl-agi.conf", sim.url)
    assert import_csv(conf, "ranges", tmp_path, "447700,23410\n447701,23415\n") == 0
    delta = tmp_path / "delta.csv"
    delta.write_text("prefix,mccmnc\n447700,23420\n447701,-\n447702,23430\n")
    assert cli.main(["--config", str(conf), "ranges", "import", "--delta", str(delta)]) == 0
    assert "applied 3 changes to ranges (1 removals in the file)" in capsys.readouterr().out
    ranges = SqliteCache(load_config(str(conf)).cache)
    assert list(ranges.local_items(RANGES)) == [("447700", "23420", ""), ("447702", "23430", "")]
    delta.write_text("447700,23410\n447700,-\n")  # given and removed: a bad line, nothing applied
    assert cli.main(["--config", str(conf), "ranges", "import", "--delta", str(delta)]) == 2
    assert "line 2: 447700 is 23410 on line 1 and - here" in capsys.readouterr().err
    assert list(ranges.local_items(RANGES)) == [("447700", "23420", ""), ("447702", "23430", "")]


def test_the_longest_range_wins_and_ported_says_whether_the_network_is_the_range_holder(tmp_path, sim, subprocess_env):
    """447788450450 is ported to 23415 (the simulator's PORTED); an unported number's network is
    its range's. A shorter range never beats a longer one."""
    unported = "447400100002"
    home = simulated_answer(unported, "2.4").split()[1].split(",")[0]
    ranges = f"44,23410\n447788,23430\n{unported[:8]},{home}\n"
    confs = door_configs(tmp_path, sim)
    for conf in confs.values():
        assert import_csv(conf, "ranges", tmp_path, ranges) == 0
    ported = the_same(through_both_doors(confs, subprocess_env, "07788450450"))
    assert (ported["NPL_MCCMNC"], ported["NPL_RANGE_MCCMNC"], ported["NPL_PORTED"]) == ("23415", "23430", "1")
    same = the_same(through_both_doors(confs, subprocess_env, "0" + unported[2:]))
    assert (same["NPL_MCCMNC"], same["NPL_RANGE_MCCMNC"], same["NPL_PORTED"]) == (home, home, "0")


def test_the_range_holder_is_known_for_a_number_refused_as_not_mobile(tmp_path, sim, subprocess_env):
    """A fixed line (London 020) is refused without a credit; its range holder is still said."""
    confs = door_configs(tmp_path, sim)
    for conf in confs.values():
        assert import_csv(conf, "ranges", tmp_path, "4420,23410\n") == 0
    v = the_same(through_both_doors(confs, subprocess_env, "02079460000"))
    assert (v["NPL_ERR"], v["NPL_RANGE_MCCMNC"], v["NPL_PORTED"], v["NPL_MCCMNC"]) == ("NOTMOBILE", "23410", "", "")


@pytest.mark.parametrize(("fallback", "expected"), [("no", ("TIMEOUT", "", "")), ("yes", ("", "23430", "range"))])
def test_a_hanging_service_routes_a_never_seen_number_to_its_range_holder_only_when_asked(
    tmp_path, subprocess_env, fallback, expected
):
    """``range_fallback = yes``: the answer is the range holder's within the deadline, never
    cached; ``no``: TIMEOUT, with the range holder still said."""
    with Simulator("127.0.0.1", 0, hang_seconds=2) as sim:
        sim.fault = "hang"
        confs = door_configs(tmp_path, sim, api={"timeout": 1.5}, number={"range_fallback": fallback})
        for conf in confs.values():
            assert import_csv(conf, "ranges", tmp_path, "4474001,23430\n") == 0

        doors = through_both_doors(confs, subprocess_env, NEVER_SEEN, sim)
    for door, v in doors.items():
        assert (v["NPL_ERR"], v["NPL_MCCMNC"], v["NPL_SOURCE"]) == expected, door
        assert (v["NPL_RANGE_MCCMNC"], v["NPL_PORTED"]) == ("23430", ""), door
        assert int(v["NPL_LOOKUP_MS"]) <= 1600, door
    the_same(doors)
    for conf in confs.values():  # a guess is never cached
        assert SqliteCache(load_config(str(conf)).cache).get_many(["447400100001"]) == {}


@pytest.mark.parametrize(("fallback", "expected"), [("yes", ("AUTH", "")), ("always", ("", "range"))])
def test_a_refused_account_falls_back_to_the_range_holder_only_with_always(
    tmp_path, sim, subprocess_env, fallback, expected
):
    confs = door_configs(tmp_path, sim, password="wrong", number={"range_fallback": fallback})
    for conf in confs.values():
        assert import_csv(conf, "ranges", tmp_path, "4474001,23430\n") == 0
    v = the_same(through_both_doors(confs, subprocess_env, NEVER_SEEN))
    assert (v["NPL_ERR"], v["NPL_SOURCE"]) == expected
    assert v["NPL_RANGE_MCCMNC"] == "23430"


def test_switched_off_lookups_route_by_the_range_holder_with_always(tmp_path, sim, subprocess_env):
    confs = door_configs(tmp_path, sim, api={"enabled": "no"}, number={"range_fallback": "always"})
    for conf in confs.values():
        assert import_csv(conf, "ranges", tmp_path, "4474001,23430\n") == 0
    v = the_same(through_both_doors(confs, subprocess_env, NEVER_SEEN))
    assert (v["NPL_ERR"], v["NPL_MCCMNC"], v["NPL_SOURCE"]) == ("", "23430", "range")
    assert sim.stats()["requests"] == []


def test_a_cluster_shares_known_numbers_and_ranges_through_redis(tmp_path, sim, redis_server):
    """Imported on one PBX, answered on another: both read the same Redis."""
    cache = {"backend": "redis", "redis_url": redis_server.url}
    one = write_config(tmp_path / "one.conf", sim.url, cache=cache)
    other = load_config(str(write_config(tmp_path / "other.conf", sim.url, cache=cache)))
    assert import_csv(one, "local", tmp_path, "07788450450,23430\n") == 0
    assert import_csv(one, "ranges", tmp_path, "4474001,23410\n") == 0
    known, asked = lookup_here(other).many(["07788450450", NEVER_SEEN])
    assert (known.mccmnc, known.source) == ("23430", "local")
    assert (asked.source, asked.range_mccmnc) == ("api", "23410")
    assert sim.stats()["charged"] == ["447400100001"]
    assert cli.main(["--config", str(one), "local", "clear"]) == 0
    assert lookup_here(other).one("07788450450").source == "api"


def test_a_lookup_failed_past_its_deadline_still_gets_the_admins_range_holder(tmp_path, sim):
    """Whichever timer ended the call (the chain's deadline, or the process script's alarm after
    it), the admin's range wins over the bundled table: the route must not depend on the race."""
    conf = write_config(tmp_path / "npl-agi.conf", sim.url)
    assert import_csv(conf, "ranges", tmp_path, "447788,23430\n") == 0  # the bundled table: 23415
    lookup = lookup_here(load_config(str(conf)))
    failure = LookupTimeout("no answer within the call's 2 s")
    now = time.monotonic()
    assert lookup.failed("07788450450", failure, deadline=now + 60).range_mccmnc == "23430"
    past = lookup.failed("07788450450", failure, deadline=now - 1)
    assert (past.error, past.range_mccmnc, past.msisdn) == ("TIMEOUT", "23430", "")


def test_a_value_another_writer_left_in_redis_is_never_an_answer(tmp_path, sim, redis_server):
    """The hash is shared: what it holds is read as hostile, like the service's answers."""
    conf = load_config(
        str(write_config(tmp_path / "npl-agi.conf", sim.url, cache={"backend": "redis", "redis_url": redis_server.url}))
    )
    r = redis_server.client()
    r.hset("npl-agi:local:number", "447788450450", '23"4\n,x')
    r.hset("npl-agi:local:range", "4474001", "ABCDE")
    known, asked = lookup_here(conf).many(["07788450450", NEVER_SEEN])
    assert (known.source, known.mccmnc) == ("api", "23415")
    assert asked.range_mccmnc != "ABCDE"
