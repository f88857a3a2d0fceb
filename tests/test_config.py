"""Configuration: where it is read from, its defaults, the sample file, and one clear line per mistake."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from npl_agi import log
from npl_agi.config import (
    DEFAULT_PATH,
    ENV_VAR,
    NUMBER_TYPES,
    ApiConfig,
    BreakerConfig,
    CacheConfig,
    Config,
    FastagiConfig,
    NumberConfig,
    config_path,
    load_config,
    locate_config,
    parse_listen,
    require_credentials,
)
from npl_agi.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "npl-agi.conf.sample"
SECTIONS = {
    "api": ApiConfig,
    "number": NumberConfig,
    "cache": CacheConfig,
    "fastagi": FastagiConfig,
    "breaker": BreakerConfig,
}
SECRET = "Pw-7f3Q-zK9-never-shown"


def write(tmp_path: Path, text: str, name: str = "npl-agi.conf") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- where the file is read from --


def test_path_argument_wins_over_environment(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "/from/env.conf")
    assert config_path("/from/arg.conf") == "/from/arg.conf"


def test_path_from_environment(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "/from/env.conf")
    assert config_path() == "/from/env.conf"
    assert config_path(None) == "/from/env.conf"


def test_default_path(monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert config_path() == DEFAULT_PATH == "/etc/asterisk/npl-agi.conf"


def test_load_reads_argument_then_environment(tmp_path, monkeypatch) -> None:
    by_arg = write(tmp_path, "[api]\nuser = from-arg\n", "arg.conf")
    by_env = write(tmp_path, "[api]\nuser = from-env\n", "env.conf")
    monkeypatch.setenv(ENV_VAR, str(by_env))
    assert load_config(str(by_arg)).api.user == "from-arg"
    assert load_config(str(by_arg)).path == str(by_arg)
    assert load_config().api.user == "from-env"
    assert load_config().path == str(by_env)


def test_path_recorded_by_the_installation(tmp_path, monkeypatch) -> None:
    """install.sh records where it put the file: read after --config and the environment, before the default."""
    installed = write(tmp_path, "[api]\nuser = installed\n", "installed.conf")
    record = tmp_path / "share" / "npl-agi" / "config-path"
    record.parent.mkdir(parents=True)
    record.write_text(f"{installed}\n")
    monkeypatch.setattr("npl_agi.config.INSTALLED_PATH_FILE", str(record))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert locate_config() == (str(installed), f"recorded by install.sh in {record}")
    assert load_config().api.user == "installed"
    monkeypatch.setenv(ENV_VAR, "/from/env.conf")
    assert locate_config() == ("/from/env.conf", f"${ENV_VAR}")
    assert locate_config("/from/arg.conf") == ("/from/arg.conf", "--config")
    monkeypatch.delenv(ENV_VAR)
    record.write_text("")
    assert locate_config() == (DEFAULT_PATH, "the default")


def test_load_falls_back_to_default_path(monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    if os.path.exists(DEFAULT_PATH):
        assert load_config().path == DEFAULT_PATH
    else:
        with pytest.raises(ConfigError) as e:
            load_config()
        assert DEFAULT_PATH in str(e.value)
        assert "not found" in str(e.value)


# -- defaults --


def test_empty_file_gives_defaults(tmp_path) -> None:
    path = write(tmp_path, "")
    config = load_config(str(path))
    assert config == Config(path=str(path))
    assert config.api == ApiConfig()
    assert config.number == NumberConfig()
    assert config.cache == CacheConfig()
    assert config.fastagi == FastagiConfig()
    assert config.breaker == BreakerConfig()
    assert config.networks == {}


def test_default_values() -> None:
    api, number, cache = ApiConfig(), NumberConfig(), CacheConfig()
    assert api.url == "https://secure.comcetera.com/npl"
    assert (api.user, api.password) == ("", "")
    assert api.apiver == "2.4"
    assert api.timeout == 2.0
    assert api.bulk_timeout == 600.0
    assert api.batch_size == 1000
    assert api.enabled is True
    assert api.verify_tls is True
    assert api.lock_dir == ""
    assert (number.national_prefix, number.international_prefix) == ("0", "00")
    assert number.lookup_types == ("mobile", "fixed_line_or_mobile")
    assert cache.backend == "sqlite"
    assert cache.ttl == 86400.0
    assert cache.error_ttl == 3600.0


def test_values_are_converted(tmp_path) -> None:
    path = write(
        tmp_path,
        "[api]\nurl = http://127.0.0.1:9/npl\ntimeout = 1.5\nbatch_size = 250\nenabled = no\nverify_tls = off\n"
        "[number]\ncountry_code = 49\nlookup_types = Mobile,  FIXED_LINE  toll_free\n"
        "[cache]\nbackend = none\nttl = 60 ; a minute\nerror_ttl = 30 # half a minute\n"
        "[networks]\n23415 = GB, Vodafone UK\n310260 = T-Mobile\n",
    )
    config = load_config(str(path))
    assert config.api.timeout == 1.5
    assert config.api.batch_size == 250 and isinstance(config.api.batch_size, int)
    assert config.api.enabled is False
    assert config.api.verify_tls is False
    assert config.number.country_code == "49"
    assert config.number.lookup_types == ("mobile", "fixed_line", "toll_free")
    assert config.cache.backend == "none"
    assert (config.cache.ttl, config.cache.error_ttl) == (60.0, 30.0)
    assert config.networks == {"23415": "GB, Vodafone UK", "310260": "T-Mobile"}


@pytest.mark.parametrize(("raw", "value"), [("yes", True), ("True", True), ("on", True), ("1", True), ("NO", False)])
def test_yes_no_values(tmp_path, raw: str, value: bool) -> None:
    assert load_config(str(write(tmp_path, f"[api]\nenabled = {raw}\n"))).api.enabled is value


def test_batch_size_of_1000_is_allowed(tmp_path) -> None:
    assert load_config(str(write(tmp_path, "[api]\nbatch_size = 1000\n"))).api.batch_size == 1000


# -- the shipped sample --


def sample_parser() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SAMPLE, encoding="utf-8")
    return parser


def test_sample_parses() -> None:
    config = load_config(str(SAMPLE))
    assert config.path == str(SAMPLE)
    assert config.number.country_code == "44"


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_sample_documents_every_key(section: str) -> None:
    parser = sample_parser()
    assert set(parser[section]) == set(SECTIONS[section]._fields)


def test_sample_has_exactly_the_known_sections() -> None:
    assert set(sample_parser().sections()) == {"api", "number", "cache", "fastagi", "breaker", "networks"}


def test_sample_shows_the_defaults() -> None:
    """The sample says every key shows its default; country_code is the one example value."""
    config = load_config(str(SAMPLE))
    assert config.api == ApiConfig()
    assert config.number == NumberConfig()._replace(country_code="44")
    assert config.cache == CacheConfig()
    assert config.fastagi == FastagiConfig()
    assert config.breaker == BreakerConfig()
    assert config.networks == {}


def test_sample_lists_every_number_type() -> None:
    text = SAMPLE.read_text(encoding="utf-8")
    listed = re.search(r"; Types: (.*?); or \"any\"", text, re.S)
    assert listed is not None
    names = {n.strip(" ;\n") for n in listed.group(1).split(",")}
    assert names == set(NUMBER_TYPES)


def test_sample_networks_examples_are_valid(tmp_path) -> None:
    text = SAMPLE.read_text(encoding="utf-8")
    examples = re.findall(r"^; (\d{5,6} = .+)$", text, re.M)
    assert examples
    config = load_config(str(write(tmp_path, "[networks]\n" + "\n".join(examples) + "\n")))
    assert set(config.networks) == {e.split()[0] for e in examples}


# -- mistakes: one ConfigError line naming the file and the key --

BAD = [
    # (id, file text, what the message must name besides the file)
    ("not-ini", "this is not an ini file\n", "INI"),
    ("not-ini-key-before-section", "user = demo\n[api]\n", "INI"),
    ("duplicate-key", "[api]\nuser = a\nuser = b\n", "user"),
    ("duplicate-section", "[api]\n[api]\n", "api"),
    ("unknown-section", "[cach]\nttl = 5\n", "[cach]"),
    ("unknown-section-case", "[API]\nuser = demo\n", "[API]"),
    ("unknown-section-default", "[DEFAULT]\ntimeout = 5\n", "[DEFAULT]"),
    ("unknown-key-api", "[api]\npasswd = x\n", "passwd"),
    ("unknown-key-number", "[number]\ncountrycode = 44\n", "countrycode"),
    ("unknown-key-cache", "[cache]\nsize = 10\n", "size"),
    ("bad-number-word", "[api]\ntimeout = fast\n", "[api] timeout"),
    ("bad-number-zero", "[api]\ntimeout = 0\n", "[api] timeout"),
    ("bad-number-negative", "[cache]\nerror_ttl = -5\n", "[cache] error_ttl"),
    ("bad-number-nan", "[api]\ntimeout = nan\n", "[api] timeout"),
    ("bad-number-inf", "[api]\nbulk_timeout = inf\n", "[api] bulk_timeout"),
    ("bad-number-ttl-nan", "[cache]\nttl = NaN\n", "[cache] ttl"),
    ("bad-number-int", "[api]\nbatch_size = 10.5\n", "[api] batch_size"),
    ("bad-number-empty", "[api]\ntimeout =\n", "[api] timeout"),
    ("bad-yes-no", "[api]\nenabled = maybe\n", "[api] enabled"),
    ("bad-yes-no-2", "[api]\nverify_tls = 2\n", "[api] verify_tls"),
    ("bad-yes-no-empty", "[api]\nverify_tls =\n", "[api] verify_tls"),
    ("bad-url-scheme", "[api]\nurl = ftp://secure.comcetera.com/npl\n", "[api] url"),
    ("bad-url-no-scheme", "[api]\nurl = secure.comcetera.com/npl\n", "[api] url"),
    ("bad-url-empty", "[api]\nurl =\n", "[api] url"),
    ("bad-url-no-host", "[api]\nurl = https://\n", "[api] url"),
    ("bad-url-no-host-path", "[api]\nurl = http:///npl\n", "[api] url"),
    ("batch-size-over-1000", "[api]\nbatch_size = 1001\n", "[api] batch_size"),
    ("bad-lookup-type", "[number]\nlookup_types = mobile, cell\n", "[number] lookup_types"),
    ("bad-lookup-type-semicolon", "[number]\nlookup_types = mobile;fixed_line\n", "[number] lookup_types"),
    ("empty-lookup-types", "[number]\nlookup_types =\n", "[number] lookup_types"),
    ("bad-country-code", "[number]\ncountry_code = +44\n", "[number] country_code"),
    ("bad-country-code-fullwidth", "[number]\ncountry_code = \uff14\uff14\n", "[number] country_code"),
    ("bad-national-prefix", "[number]\nnational_prefix = O\n", "[number] national_prefix"),
    ("bad-national-prefix-superscript", "[number]\nnational_prefix = \u00b9\n", "[number] national_prefix"),
    ("bad-international-prefix", "[number]\ninternational_prefix = 0-0\n", "[number] international_prefix"),
    ("bad-backend", "[cache]\nbackend = memcached\n", "[cache] backend"),
    ("bad-backend-case", "[cache]\nbackend = SQLite\n", "[cache] backend"),
    ("bad-networks-key-short", "[networks]\n2341 = GB, Short\n", "2341"),
    ("bad-networks-key-long", "[networks]\n2341567 = GB, Long\n", "2341567"),
    ("bad-networks-key-letters", "[networks]\nabcde = GB, Letters\n", "abcde"),
    ("bad-networks-key-fullwidth", "[networks]\n\uff12\uff13\uff14\uff11\uff15 = GB, Wide\n", "[networks]"),
    ("bad-listen-no-port", "[fastagi]\nlisten = 127.0.0.1\n", "[fastagi] listen"),
    ("bad-listen-port", "[fastagi]\nlisten = 127.0.0.1:70000\n", "[fastagi] listen"),
    ("bad-metrics-listen", "[fastagi]\nmetrics_listen = :x\n", "[fastagi] metrics_listen"),
    ("bad-log-numbers", "[fastagi]\nlog_numbers = some\n", "[fastagi] log_numbers"),
    ("bad-breaker-failures", "[fastagi]\nbreaker_failures = 0\n", "[fastagi] breaker_failures"),
    ("bad-breaker-section-failures", "[breaker]\nfailures = 0\n", "[breaker] failures"),
    ("bad-breaker-cooldown", "[breaker]\ncooldown = soon\n", "[breaker] cooldown"),
    ("bad-breaker-key", "[breaker]\nbreaker_failures = 3\n", "[breaker] unknown key"),
    ("bad-stale-ttl", "[cache]\nstale_ttl = soon\n", "[cache] stale_ttl"),
    ("ca-file-missing", "[api]\nca_file = /nonexistent\n", "[api] ca_file"),
    ("ca-file-a-directory", "[api]\nca_file = /\n", "[api] ca_file"),
    ("extra-form-no-equals", "[api]\nextra_form = economy\n", "[api] extra_form: expected name=value"),
    ("extra-form-empty-name", "[api]\nextra_form = =1\n", "[api] extra_form: a pair without a name"),
    ("extra-form-blank-name", "[api]\nextra_form = economy=1 &  = 2\n", "[api] extra_form: a pair without a name"),
    ("extra-form-name-chars", "[api]\nextra_form = eco/nomy=1\n", "'eco/nomy': a name holds only"),
    ("extra-form-name-space", "[api]\nextra_form = eco nomy=1\n", "'eco nomy': a name holds only"),
    ("extra-form-name-escape", "[api]\nextra_form = %70ass=1\n", "'%70ass': a name holds only"),
    ("extra-form-name-unicode", "[api]\nextra_form = \u00e9conomy=1\n", "a name holds only"),
    ("extra-form-own-field", "[api]\nextra_form = economy=1 & Pass=x\n", "'Pass' cannot be set here"),
    ("extra-form-duplicate", "[api]\nextra_form = economy=1&economy=0\n", "'economy' is given twice"),
    ("extra-form-duplicate-case", "[api]\nextra_form = economy=1\n  ECONOMY=0\n", "'ECONOMY' is given twice"),
    ("extra-form-value-space", "[api]\nextra_form = economy=1 tag=2\n", "[api] extra_form: economy: a space"),
    ("extra-form-value-control", "[api]\nextra_form = tag=a\x01b\n", "tag: a control character"),
    ("extra-form-value-tab", "[api]\nextra_form = tag=a\tb\n", "tag: a control character"),
    ("extra-form-value-escaped-newline", "[api]\nextra_form = tag=a%0Ab\n", "tag: a control character"),
    ("extra-form-value-escaped-nul", "[api]\nextra_form = tag=%00\n", "tag: a control character"),
    ("extra-form-value-bad-escape", "[api]\nextra_form = tag=100%\n", "tag: a % starts an escape"),
    ("extra-form-value-bad-escape-hex", "[api]\nextra_form = tag=%zz\n", "tag: a % starts an escape"),
    ("extra-form-value-not-utf8", "[api]\nextra_form = tag=%ff\n", "tag: the %-escapes are not UTF-8"),
]


def assert_one_line(message: str, path: Path, names: str) -> None:
    assert "\n" not in message, message
    assert str(path) in message, message
    assert names in message, message
    assert "Traceback" not in message


@pytest.mark.parametrize(("text", "names"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_mistake_is_one_config_error_line(tmp_path, text: str, names: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert_one_line(str(e.value), path, names)


# One of each kind through the command: exit 2, one line on stderr, no traceback.
COMMAND_CASES = [
    b
    for b in BAD
    if b[0]
    in {
        "not-ini",
        "duplicate-key",
        "unknown-section",
        "unknown-key-api",
        "bad-number-word",
        "bad-yes-no",
        "bad-url-scheme",
        "batch-size-over-1000",
        "bad-lookup-type",
        "bad-country-code",
        "bad-backend",
        "bad-networks-key-short",
        "ca-file-missing",
        "extra-form-own-field",
        "extra-form-duplicate",
    }
]


@pytest.mark.parametrize(("text", "names"), [b[1:] for b in COMMAND_CASES], ids=[b[0] for b in COMMAND_CASES])
def test_mistake_is_one_line_from_the_command(tmp_path, subprocess_env, text: str, names: str) -> None:
    path = write(tmp_path, text)
    done = subprocess.run(
        [sys.executable, "-m", "npl_agi.admin.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        env=subprocess_env,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert_one_line(lines[0], path, names)


def test_missing_file(tmp_path) -> None:
    path = tmp_path / "nowhere" / "npl-agi.conf"
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert_one_line(str(e.value), path, "not found")


def test_missing_file_from_environment(tmp_path, monkeypatch) -> None:
    path = tmp_path / "env-missing.conf"
    monkeypatch.setenv(ENV_VAR, str(path))
    with pytest.raises(ConfigError) as e:
        load_config()
    assert_one_line(str(e.value), path, "not found")


def test_unreadable_directory(tmp_path) -> None:
    path = tmp_path / "a-directory.conf"
    path.mkdir()
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert_one_line(str(e.value), path, "cannot read")


def test_unreadable_not_utf8(tmp_path) -> None:
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"[api]\nuser = \xe9\xff\xfe\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert_one_line(str(e.value), path, "cannot read")


def test_config_error_carries_config_npl_err(tmp_path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(str(write(tmp_path, "[api]\ntimeout = x\n")))
    assert e.value.npl_err == "CONFIG"


# -- credentials and the password --


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        ("[api]\npassword = x\n", "user"),
        ("[api]\nuser = x\n", "password"),
        ("[api]\nuser = x\npassword =\n", "password"),
        ("", "user"),
    ],
)
def test_require_credentials_names_the_missing_key(tmp_path, text: str, missing: str) -> None:
    path = write(tmp_path, text)
    config = load_config(str(path))
    with pytest.raises(ConfigError) as e:
        require_credentials(config)
    assert_one_line(str(e.value), path, f"[api] {missing}")


def test_require_credentials_accepts_both(tmp_path) -> None:
    config = load_config(str(write(tmp_path, f"[api]\nuser = alice\npassword = {SECRET}\n")))
    require_credentials(config)
    assert config.api.password == SECRET


def test_require_credentials_without_a_file() -> None:
    with pytest.raises(ConfigError, match=r"<config>: \[api\] user"):
        require_credentials(Config())


def test_password_is_not_in_repr(tmp_path) -> None:
    config = load_config(str(write(tmp_path, f"[api]\nuser = alice\npassword = {SECRET}\n")))
    assert config.api.password == SECRET
    for shown in (repr(config), str(config), repr(config.api), str(config.api), f"{config}", f"{config!r}"):
        assert SECRET not in shown
    assert "alice" in repr(config)


def test_password_is_not_in_errors_about_other_keys(tmp_path) -> None:
    path = write(tmp_path, f"[api]\nuser = alice\npassword = {SECRET}\ntimeout = soon\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert SECRET not in str(e.value)


def test_inline_comments_are_cut_except_from_the_password(tmp_path) -> None:
    path = write(
        tmp_path, "[api]\nuser = bob ; the account\npassword = p ;#x # y\n[networks]\n23415 = GB, Voda ; ours\n"
    )
    config = load_config(str(path))
    assert config.api.user == "bob"
    assert config.api.password == "p ;#x # y"
    assert config.networks == {"23415": "GB, Voda"}


def test_fastagi_section(tmp_path) -> None:
    text = "[fastagi]\nlisten = [::1]:4574\nbatch_window = 0.05\nmetrics_listen =\nlog_numbers = full\n"
    config = load_config(str(write(tmp_path, text)))
    assert config.fastagi == FastagiConfig(
        listen="[::1]:4574", batch_window=0.05, metrics_listen="", log_numbers="full"
    )
    assert parse_listen(config.fastagi.listen) == ("::1", 4574)


# -- a password every user can read --


def warnings_of(path: Path) -> list[str]:
    seen: list[str] = []
    log.set_sink(seen.append)
    try:
        load_config(str(path))
        load_config(str(path))
    finally:
        log.set_sink(None)
    return seen


def test_world_readable_config_with_a_password_warns_once(tmp_path) -> None:
    path = write(tmp_path, f"[api]\nuser = u\npassword = {SECRET}\n", "readable.conf")
    path.chmod(0o644)
    (warning,) = warnings_of(path)  # once per process, however often it is read
    assert str(path) in warning and "chmod o-rwx" in warning
    assert SECRET not in warning


@pytest.mark.parametrize(("mode", "text"), [(0o640, f"[api]\npassword = {SECRET}\n"), (0o644, "[api]\nuser = u\n")])
def test_no_warning_for_a_private_file_or_one_without_a_password(tmp_path, mode: int, text: str) -> None:
    path = write(tmp_path, text, f"quiet-{mode:o}.conf")
    path.chmod(mode)
    assert warnings_of(path) == []


def test_the_breaker_section_is_read_by_both_doors(tmp_path) -> None:
    config = load_config(str(write(tmp_path, "[breaker]\nfailures = 3\ncooldown = 12.5\n", "breaker.conf")))
    assert config.breaker == BreakerConfig(failures=3, cooldown=12.5)


def test_the_old_fastagi_breaker_keys_still_work_with_one_deprecation_warning(tmp_path) -> None:
    path = write(tmp_path, "[fastagi]\nbreaker_failures = 3\nbreaker_cooldown = 12\n", "old-breaker.conf")
    (warning,) = warnings_of(path)  # once per process, however often it is read
    assert str(path) in warning and "deprecated" in warning and "[breaker] failures, cooldown" in warning
    assert load_config(str(path)).breaker == BreakerConfig(failures=3, cooldown=12.0)


def test_the_breaker_section_wins_over_the_old_keys(tmp_path) -> None:
    path = write(tmp_path, "[fastagi]\nbreaker_failures = 3\n[breaker]\nfailures = 7\n", "both-breaker.conf")
    assert load_config(str(path)).breaker.failures == 7


# -- [api] extra_form --


def extra_form(tmp_path: Path, text: str) -> tuple[tuple[str, str], ...]:
    return load_config(str(write(tmp_path, f"[api]\nextra_form = {text}\n"))).api.extra_form


@pytest.mark.parametrize(
    ("text", "pairs"),
    [
        ("economy=1", (("economy", "1"),)),
        ("economy=1&tag=pbx-1.a_b", (("economy", "1"), ("tag", "pbx-1.a_b"))),
        ("economy = 1 & tag=x &", (("economy", "1"), ("tag", "x"))),  # spaces around, an empty pair
        ("tag=a%20b%26c%3Bd%23e%25f", (("tag", "a b&c;d#e%f"),)),  # escapes decoded, once
        ("tag=%C3%A9t%C3%A9", (("tag", "\u00e9t\u00e9"),)),  # UTF-8
        ("tag=a+b", (("tag", "a+b"),)),  # a plus sign is a plus sign
        ("tag=a=b", (("tag", "a=b"),)),  # the first = ends the name
        ("tag=", (("tag", ""),)),
        ("", ()),
        ("tag=1 ; a comment", (("tag", "1"),)),
    ],
)
def test_extra_form_pairs(tmp_path, text: str, pairs: tuple) -> None:
    assert extra_form(tmp_path, text) == pairs


def test_extra_form_over_several_lines_with_comments(tmp_path) -> None:
    text = "economy=1 ; cached answers\n    tag=pbx1   # which PBX\n    ; a line of comment\n\n    zone=eu\n"
    assert extra_form(tmp_path, text) == (("economy", "1"), ("tag", "pbx1"), ("zone", "eu"))


def test_extra_form_defaults_to_nothing(tmp_path) -> None:
    assert ApiConfig().extra_form == () == load_config(str(write(tmp_path, "[api]\n"))).api.extra_form


OWN = ["user", "pass", "apiver", "msisdn"]


@pytest.mark.parametrize(
    "name",
    [*OWN, *(n.upper() for n in OWN), *(n.capitalize() for n in OWN), "ApiVer", "mSiSdN"],
)
@pytest.mark.parametrize("layout", ["{name}=x", " {name} = x ", "economy=1 & {name}=x", "economy=1\n  \t{name}\t=x"])
def test_extra_form_never_sets_a_field_of_npl_agi_s_own(tmp_path, name: str, layout: str) -> None:
    path = write(tmp_path, f"[api]\nuser = bob\npassword = 123\nextra_form = {layout.format(name=name)}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert_one_line(str(e.value), path, f"[api] extra_form: {name!r} cannot be set here")
    assert "user, pass, apiver and msisdn" in str(e.value)
    assert "123" not in str(e.value).replace(str(path), "<path>")  # pytest's own temp dir may be pytest-123


@pytest.mark.parametrize("name", ["\u00a0pass", "pa\u017fs"])  # no-break space; long s, which casefolds to s
def test_extra_form_refuses_look_alikes_of_its_own_fields(tmp_path, name: str) -> None:
    path = write(tmp_path, f"[api]\nextra_form = {name}=x\n")
    with pytest.raises(ConfigError, match="cannot be set here"):
        load_config(str(path))


def test_a_password_that_looks_like_a_pair_is_the_password(tmp_path) -> None:
    path = write(tmp_path, "[api]\nuser = bob\npassword = economy=1&apiver=2.3\nextra_form = economy=1\n")
    api = load_config(str(path)).api
    assert api.password == "economy=1&apiver=2.3"
    assert api.extra_form == (("economy", "1"),)
    assert api.apiver == "2.4"
