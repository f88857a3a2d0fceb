"""The dialplan snippets: asterisklint finds nothing, and the files keep their documented shape.

Behaviour on a real Asterisk is in test_asterisk.py; these checks need no Asterisk.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from asterisk_fixture import DIALPLAN, parse_routes

from npl_agi.doors.process import VARIABLES

SNIPPETS = ("npl-lookup.conf", "npl-outbound.conf", "npl-routes.conf")
LINT_FINDING = re.compile(r"\b[EWHI]_[A-Z0-9_]+\b")
# The process script, given the number, the Gosub's second argument (fresh, or empty) and the
# time of the call (to the ms: the deadline's start), last, so the script takes this one.
PROCESS_AGI = "AGI(npl-lookup.agi,${ARG1},${ARG2},t=${STRFTIME(,,%s.%3q)})"
FASTAGI = "AGI(${NPL_FASTAGI}/npl-lookup,${ARG1},${ARG2})"
FRESH_LOOKUP = "Gosub(npl-lookup,s,1(${NPL_DIAL},fresh))"
UK_NETWORKS = {"23415": "Vodafone UK", "23410": "O2 UK", "23430": "EE", "23420": "Three UK"}


def asterisklint() -> str:
    """The asterisklint command of this environment (a test extra)."""
    beside = Path(sys.executable).parent / "asterisklint"
    found = str(beside) if beside.exists() else shutil.which("asterisklint")
    assert found, "asterisklint is not installed: pip install -e '.[test]'"
    return found


def extensions_conf(directory: Path, snippets: dict[str, str]) -> Path:
    """An extensions.conf as the README tells admins to write it: the snippets #included last."""
    for name, text in snippets.items():
        (directory / name).write_text(text)
    main = directory / "extensions.conf"
    main.write_text(
        "[general]\nstatic=yes\nwriteprotect=yes\n\n"
        "[globals]\nNPL_ONNET_MCCMNC=23415\n\n"
        "[from-phones]\ninclude => npl-outbound\n\n" + "".join(f"#include {name}\n" for name in snippets)
    )
    return main


def lint(command: str, main: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [asterisklint(), command, main.name], cwd=main.parent, capture_output=True, text=True, timeout=60
    )


def bundled() -> dict[str, str]:
    return {name: (DIALPLAN / name).read_text() for name in SNIPPETS}


def test_snippets_pass_asterisklint(tmp_path: Path) -> None:
    result = lint("dialplan-check", extensions_conf(tmp_path, bundled()))
    findings = LINT_FINDING.findall(result.stdout + result.stderr)
    assert findings == [], result.stdout + result.stderr
    assert result.returncode == 0, result.stdout + result.stderr


def test_asterisklint_read_every_context(tmp_path: Path) -> None:
    """The check above saw the snippets' dialplan, not an empty include."""
    shown = lint("dialplan-show", extensions_conf(tmp_path, bundled())).stdout
    for context in ("npl-lookup", "npl-outbound", "npl-outbound-call", "npl-routes", "npl-fallback"):
        assert f"[ Context '{context}' created by 'pbx_config' ]" in shown
    assert PROCESS_AGI in shown
    for mccmnc in UK_NETWORKS:
        assert f"'{mccmnc}' =>" in shown


def test_asterisklint_does_report_a_broken_snippet(tmp_path: Path) -> None:
    """A findings-free run means something: the same check on a broken copy does find things."""
    snippets = bundled()
    snippets["npl-routes.conf"] += "\n[npl-broken]\nexten => 1,1,Dial(PJSIP/x@y\n same => n,NoSuchApp()\n"
    result = lint("dialplan-check", extensions_conf(tmp_path, snippets))
    findings = set(LINT_FINDING.findall(result.stderr))
    assert {"W_APP_BALANCE", "E_APP_MISSING"} <= findings, result.stderr
    assert result.returncode != 0


def test_routes_file_keeps_the_format_the_demo_reads() -> None:
    text = (DIALPLAN / "npl-routes.conf").read_text()
    routes = parse_routes(text)
    assert {r.mccmnc: r.network for r in routes} == UK_NETWORKS
    for route in routes:
        assert route.application == "Dial"
        assert route.args.startswith("PJSIP/${NPL_DIAL}@trunk-")
        line_after = text.splitlines()[route.line]
        assert line_after.split(",", 1)[1].strip() == "Return()", line_after
    fallback = parse_routes(
        text.replace("\n[npl-fallback]\n", "\n[npl-fallback]\n; Default\nexten => 00000,1,NoOp()\n")
    )
    assert [r.mccmnc for r in fallback if r.mccmnc == "00000"] == []  # only [npl-routes] holds routes
    assert "exten => s,1,Dial(PJSIP/${NPL_DIAL}@trunk-default,60)" in text.split("\n[npl-fallback]\n")[1]


def test_routes_parser_rejects_what_breaks_the_contract() -> None:
    with pytest.raises(ValueError, match="no comment"):
        parse_routes("[npl-routes]\n\nexten => 23415,1,Dial(PJSIP/x@y)\n")
    with pytest.raises(ValueError, match="must start"):
        parse_routes("[npl-routes]\n; Vodafone UK\nexten => 23415,n,Dial(PJSIP/x@y)\n")
    same_line = parse_routes("[npl-routes]\nexten => 23415,1,Dial(PJSIP/x@y) ; Vodafone UK\n")
    assert [(r.mccmnc, r.network, r.application, r.args) for r in same_line] == [
        ("23415", "Vodafone UK", "Dial", "PJSIP/x@y")
    ]


def test_demo_reads_the_bundled_routes() -> None:
    """The demo's own reader (npl_agi.doubles.demo) finds every route and the fallback."""
    from npl_agi.doubles.demo import read_routes

    found = read_routes(DIALPLAN / "npl-routes.conf")
    assert set(found) == {*UK_NETWORKS, "s"}
    assert "trunk-vodafone" in found["23415"]
    assert "trunk-default" in found["s"]


def test_outbound_matches_numbers_only() -> None:
    """_X. and _+X.; never _. (which also matches h, i and t and would loop or misroute)."""
    for name, text in bundled().items():
        patterns = re.findall(r"^exten\s*=>\s*(_[^,]*),", text, flags=re.MULTILINE)
        assert "_." not in patterns, name
        assert all(p in ("_X.", "_+X.") for p in patterns), (name, patterns)
    outbound = bundled()["npl-outbound.conf"]
    assert re.findall(r"^exten\s*=>\s*(_[^,]*),", outbound, flags=re.MULTILINE) == ["_X.", "_+X."]


def test_the_benchmarks_vary_the_shipped_agi_line() -> None:
    """bench/ replaces the process script's line of npl-lookup.conf by its variants' lines."""
    from bench.pbx import AGI_LINE

    assert AGI_LINE == PROCESS_AGI
    assert bundled()["npl-lookup.conf"].count(AGI_LINE) == 1


def test_lookup_clears_every_variable_before_the_agi_runs() -> None:
    """Every variable npl_agi sets is emptied first, so nothing stale survives an AGI that fails."""
    text = bundled()["npl-lookup.conf"]
    before_agi, _ = text.split(PROCESS_AGI)
    cleared = set(re.findall(r"^\s*same\s*=>\s*n,Set\((NPL_[A-Z_]+)=\)\s*$", before_agi, flags=re.MULTILINE))
    assert cleared == set(VARIABLES)


def test_fastagi_when_npl_fastagi_is_set_and_the_process_script_when_it_fails() -> None:
    lines = [line.strip() for line in bundled()["npl-lookup.conf"].splitlines() if not line.startswith(";")]
    fast = lines.index(f"same => n,{FASTAGI}")
    assert lines[fast - 1] == 'same => n,GotoIf($["${NPL_FASTAGI}" = ""]?process)'
    assert lines[fast + 1] == 'same => n,GotoIf($["${AGISTATUS}" != "FAILURE"]?done)'
    assert lines[fast + 2].startswith("same => n(process),Set(LOCAL(npl_max)=")
    # then the limit on running scripts, and the script itself
    assert lines[fast + 3 : fast + 6] == [
        "same => n,Set(GROUP(npl-lookup)=process)",
        "same => n,GotoIf($[${npl_max} > 0 & ${GROUP_COUNT(process@npl-lookup)} > ${npl_max}]?busy)",
        f"same => n,{PROCESS_AGI}",
    ]
    assert lines[fast + 6] == "same => n,Set(GROUP(npl-lookup)=)"  # the slot is given back


def test_snippets_leave_globals_to_extensions_conf() -> None:
    """A second [globals] would be ignored or override the admin's; settings are documented instead."""
    for name, text in bundled().items():
        assert not re.search(r"^\[globals\]", text, flags=re.MULTILINE), name
    header = bundled()["npl-outbound.conf"].split("[npl-outbound]")[0]
    for setting in ("NPL_ONNET_MCCMNC=23415", "NPL_RETRY_CAUSES=1,3", "NPL_RETRY_DIALSTATUS=CHANUNAVAIL,CONGESTION"):
        assert setting in header
    assert "npl_retry" in header


def outbound_lines() -> list[str]:
    """npl-outbound.conf's dialplan lines, without comments."""
    text = bundled()["npl-outbound.conf"]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(";")]


def test_outbound_retries_with_one_fresh_lookup_at_most_once_a_call() -> None:
    lines = outbound_lines()
    lookups = [line for line in lines if "Gosub(npl-lookup," in line]
    assert lookups == ["exten => s,1,Gosub(npl-lookup,s,1(${NPL_DIAL}))", f"same => n,{FRESH_LOOKUP}"]
    (fresh,) = [i for i, line in enumerate(lines) if FRESH_LOOKUP in line]
    assert lines[fresh - 1] == "same => n(retry),Set(LOCAL(npl_was)=${NPL_MCCMNC})"
    assert lines[fresh + 1] == "same => n,Set(LOCAL(npl_retry)=changed)"  # never empty again: the guard holds
    retry = lines[fresh:]
    assert "same => n,Set(CDR(npl_retry)=${npl_retry})" in retry
    assert retry[-1] == "same => n,Goto(price)"  # priced and routed again: the CDR fields follow
    # The only ways to the retry, each after the guard that it has not happened yet.
    into = [i for i, line in enumerate(lines) if line.endswith("?retry)")]
    guard = lines.index('same => n,GotoIf($["${npl_retry}" != ""]?unavailable)')
    assert into and all(guard < i < fresh for i in into)
    assert [lines[i] for i in into] == [
        "same => n,GotoIf($[${FIELDNUM(npl_causes,\\,,${HANGUPCAUSE})} > 0]?retry)",
        "same => n,GotoIf($[${FIELDNUM(npl_statuses,\\,,${DIALSTATUS})} > 0]?retry)",
    ]


def test_outbound_retries_only_for_answers_not_asked_for_this_call() -> None:
    lines = outbound_lines()
    source = 'same => n,GotoIf($["${NPL_SOURCE}" != "cache" & "${NPL_SOURCE}" != "stale"'
    source += ' & "${NPL_SOURCE}" != "range"]?unavailable)'
    assert lines.index(source) < min(i for i, line in enumerate(lines) if line.endswith("?retry)"))
    # after the retry, only a changed network leaves the fallback path
    fallback = 'same => n,GotoIf($["${npl_retry}" = "same" | "${npl_retry}" = "failed"]?fallback)'
    assert lines.index(fallback) < lines.index(
        "same => n,GotoIf($[${DIALPLAN_EXISTS(npl-routes,${NPL_MCCMNC},1)}]?route)"
    )
