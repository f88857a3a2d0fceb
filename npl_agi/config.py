"""Configuration: one INI file, found by ``--config``, ``$NPL_AGI_CONFIG`` or the default path.

Every value is checked here, once, so that a typo becomes one clear line naming the file and
the key instead of a traceback in the middle of a call.
"""

from __future__ import annotations

import configparser
import math
import os
import re
import sys
from collections import namedtuple

from npl_agi import log
from npl_agi.core import protocol
from npl_agi.core.errors import ConfigError
from npl_agi.core.number import NumberConfig
from npl_agi.core.protocol import MAX_NUMBERS

DEFAULT_PATH = "/etc/asterisk/npl-agi.conf"
# install.sh writes the path of the configuration it installed here, inside the environment
# it made, so the installed script and command find a file installed with --conf-dir.
INSTALLED_PATH_FILE = os.path.join(sys.prefix, "share", "npl-agi", "config-path")
_INLINE_COMMENT = re.compile(r"\s[;#]")
_URL = re.compile(r"(?i)https?://(?:[^/?#@]*@)?(\[[^\]/]+\]|[^/?#:\[\]]*)")
# extra_form's patterns, compiled by re (and kept in its cache) when a configuration has one:
# most have none, and every call reads the configuration.
_FORM_SEPARATORS = r"[&\r\n]"
_FORM_BLANKS = " \t"  # trimmed around names and values; any other odd character is refused
_FORM_NAME = r"[A-Za-z0-9_.-]+"
_FORM_BAD_ESCAPE = r"%(?![0-9A-Fa-f]{2})"
ENV_VAR = "NPL_AGI_CONFIG"

NUMBER_TYPES = (
    "fixed_line",
    "mobile",
    "fixed_line_or_mobile",
    "toll_free",
    "premium_rate",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
    "unknown",
)


def record(name: str, **defaults):
    """An immutable record type (a namedtuple: cheap to import); each default gives its type."""
    return namedtuple(name, defaults, defaults=tuple(defaults.values()))


class ApiConfig(
    record(
        "ApiConfig",
        url="https://secure.comcetera.com/npl",
        user="",
        password="",
        apiver="2.4",
        timeout=2.0,
        min_request_time=0.3,
        finish_timeout=30.0,
        bulk_timeout=600.0,
        batch_size=1000,
        connections=1,
        enabled=True,
        verify_tls=True,
        ca_file="",
        lock_dir="",
        extra_form=(),  # (name, value) pairs sent with every query, from parse_extra_form
    )
):
    __slots__ = ()

    @property
    def request_floor(self) -> float:
        """Seconds a request needs before the deadline to be worth sending: ``min_request_time``,
        but never more than half of ``timeout`` (a short timeout still sends its requests)."""
        return min(self.min_request_time, self.timeout / 2)

    def __repr__(self) -> str:
        return (
            super()
            .__repr__()
            .replace(f"password={self.password!r}", "password=***" if self.password else "password=''")
        )


class CacheConfig(
    record(
        "CacheConfig",
        backend="sqlite",
        path="/var/lib/asterisk/npl-agi/cache.sqlite",
        redis_url="redis://127.0.0.1:6379/0",
        ttl=86400.0,
        error_ttl=3600.0,
        lock_fallback="file",
        stale_ttl=604800.0,
    )
):
    __slots__ = ()


class FastagiConfig(
    record(
        "FastagiConfig",
        listen="127.0.0.1:4573",
        batch_window=0.02,
        metrics_listen="127.0.0.1:9573",
        log_numbers="masked",
    )
):
    """``npl-agi serve``: where it listens, how it batches, when it stops asking a failing service."""

    __slots__ = ()


class BreakerConfig(record("BreakerConfig", failures=5, cooldown=30.0)):
    """When both doors stop asking a failing service (``failures`` in a row), and for how long."""

    __slots__ = ()


# [fastagi]'s names of the [breaker] keys, before both doors had a breaker: still read, with a warning.
_OLD_BREAKER_KEYS = {"breaker_failures": "failures", "breaker_cooldown": "cooldown"}


class Config(
    record(
        "Config",
        api=ApiConfig(),
        number=NumberConfig(),
        cache=CacheConfig(),
        networks={},
        path="",
        fastagi=FastagiConfig(),
        breaker=BreakerConfig(),
    )
):
    """The whole configuration; ``networks`` maps MCCMNC to the ``[networks]`` override text."""

    __slots__ = ()


def config_path(explicit: str | None = None) -> str:
    """Where the configuration is read from: argument, environment, installation, default."""
    return locate_config(explicit)[0]


def locate_config(explicit: str | None = None) -> tuple[str, str]:
    """The configuration's path, and what chose it (for ``npl-agi --version`` and ``check``)."""
    if explicit:
        return explicit, "--config"
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR], f"${ENV_VAR}"
    try:
        with open(INSTALLED_PATH_FILE, encoding="utf-8") as f:
            installed = f.readline().strip()
    except (OSError, UnicodeDecodeError):
        installed = ""
    if installed:
        return installed, f"recorded by install.sh in {INSTALLED_PATH_FILE}"
    return DEFAULT_PATH, "the default"


_warned_readable: set[str] = set()
_warned_old_keys: set[str] = set()


def load_config(path: str | None = None) -> Config:
    """Read and check the configuration file; raise ``ConfigError`` with one clear line."""
    path = config_path(path)
    # No special [DEFAULT] section; inline comments are cut in _build, except from the password.
    parser = configparser.ConfigParser(interpolation=None, default_section="")
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            parser.read_file(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found (use --config or ${ENV_VAR})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read configuration file: {e.__class__.__name__}") from None
    except configparser.Error as e:
        raise ConfigError(f"{path}: not a valid INI file: {str(e).splitlines()[0]}") from None
    config = parse_config(parser, path)
    if mode & 0o004 and config.api.password and path not in _warned_readable:
        _warned_readable.add(path)  # once per process: a FastAGI server reads it more than once
        log.warning("%s holds the account password and every user can read it: chmod o-rwx %s", path, path)
    return config


def parse_config(parser: configparser.ConfigParser, path: str = "<config>") -> Config:
    """Build a ``Config`` from parsed INI sections, checking every key and value."""
    known = {
        "api": ApiConfig,
        "number": NumberConfig,
        "cache": CacheConfig,
        "fastagi": FastagiConfig,
        "breaker": BreakerConfig,
    }
    for section in parser.sections():
        if section not in known and section != "networks":
            raise ConfigError(f"{path}: unknown section [{section}]")
    sections = {s: dict(parser.items(s)) if parser.has_section(s) else {} for s in known}
    _move_old_breaker_keys(sections, path)
    parts = {section: _build(cls, sections[section], path, section) for section, cls in known.items()}
    networks = {k: _uncomment(v) for k, v in parser.items("networks")} if parser.has_section("networks") else {}
    for key in networks:
        if not (_digits(key) and len(key) in (5, 6)):
            raise ConfigError(f"{path}: [networks] {key}: key must be an MCCMNC of 5 or 6 digits")
    _check(parts["api"], parts["number"], parts["cache"], path)
    _check_fastagi(parts["fastagi"], path)
    return Config(
        parts["api"],
        parts["number"],
        parts["cache"],
        networks,
        path,
        fastagi=parts["fastagi"],
        breaker=parts["breaker"],
    )


def _move_old_breaker_keys(sections: dict[str, dict[str, str]], path: str) -> None:
    """``[fastagi] breaker_failures/breaker_cooldown`` become ``[breaker]`` keys (which win), with
    one warning naming the new keys."""
    old = [k for k in _OLD_BREAKER_KEYS if k in sections["fastagi"]]
    for key in old:
        where = f"{path}: [fastagi] {key}"
        raw = sections["fastagi"].pop(key)
        _convert(getattr(BreakerConfig(), _OLD_BREAKER_KEYS[key]), _uncomment(raw), where)  # its own error
        sections["breaker"].setdefault(_OLD_BREAKER_KEYS[key], raw)
    if old and path not in _warned_old_keys:
        _warned_old_keys.add(path)  # once per process, as for the password's mode
        new = ", ".join(_OLD_BREAKER_KEYS[k] for k in old)
        log.warning("%s: [fastagi] %s: deprecated, use [breaker] %s", path, ", ".join(old), new)


def _build(cls: type, values: dict[str, str], path: str, section: str):
    defaults = cls()
    kwargs = {}
    for key, raw in values.items():
        if key not in cls._fields:
            raise ConfigError(f"{path}: [{section}] unknown key {key!r}")
        where = f"{path}: [{section}] {key}"
        raw = raw.strip() if key == "password" else _uncomment(raw)  # a password may hold " ;"
        parse = _PARSERS.get((section, key))
        kwargs[key] = parse(raw, where) if parse else _convert(getattr(defaults, key), raw, where)
    return cls(**kwargs)


def _convert(default, raw: str, where: str):
    if isinstance(default, bool):
        low = raw.lower()
        if low in ("yes", "true", "on", "1"):
            return True
        if low in ("no", "false", "off", "0"):
            return False
        raise ConfigError(f"{where}: expected yes or no, got {raw!r}")
    if isinstance(default, (int, float)):
        try:
            value = type(default)(raw)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {raw!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}: must be a number greater than 0, got {raw!r}")
        return value
    if isinstance(default, tuple):
        return tuple(p.strip().lower() for p in raw.replace(",", " ").split() if p.strip())
    return raw


def parse_extra_form(text: str, where: str = "[api] extra_form") -> tuple[tuple[str, str], ...]:
    """The ``name=value`` pairs of ``[api] extra_form``, in order, checked once here so that a
    mistake is one configuration error instead of a field the service reads otherwise.

    Pairs are separated by ``&`` or line breaks; spaces around a name or a value are ignored,
    and a value holds no space of its own: ``%XX`` escapes (UTF-8) give one, or any character
    that would otherwise separate or start a comment; ``+`` is a plus sign. Refused: a field
    npl-agi fills itself (``user``, ``pass``, ``apiver``, ``msisdn``, in any case), an empty
    name or one with characters other than letters, digits, ``_``, ``-`` and ``.``, a name
    given twice, and a value with a control character or line break.
    """
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in filter(None, (p.strip(_FORM_BLANKS) for p in re.split(_FORM_SEPARATORS, text))):
        name, equals, raw = (part.strip(_FORM_BLANKS) for part in item.partition("="))
        if not equals:
            raise ConfigError(f"{where}: expected name=value, got {item!r}")
        if not name:
            raise ConfigError(f"{where}: a pair without a name: {item!r}")
        if protocol.own_field(name):
            raise ConfigError(
                f"{where}: {name!r} cannot be set here: npl-agi sends user, pass, apiver and msisdn itself"
                " (from [api] user, password, apiver and the numbers asked)"
            )
        if not re.fullmatch(_FORM_NAME, name):
            raise ConfigError(f"{where}: {name!r}: a name holds only letters, digits, '_', '-' and '.'")
        if name.casefold() in seen:
            raise ConfigError(f"{where}: {name!r} is given twice")
        seen.add(name.casefold())
        pairs.append((name, _form_value(raw, f"{where}: {name}")))
    return tuple(pairs)


def _form_value(raw: str, where: str) -> str:
    """A value of ``extra_form`` with its ``%XX`` escapes decoded, as the service is to get it."""
    if " " in raw:
        raise ConfigError(
            f"{where}: a space inside a value is written %20 (pairs are separated by & or line breaks), got {raw!r}"
        )
    if "%" in raw:
        if re.search(_FORM_BAD_ESCAPE, raw):
            raise ConfigError(f"{where}: a % starts an escape of two hex digits (%25 for % itself), got {raw!r}")
        from urllib.parse import unquote  # only then: most configurations have no escape to decode

        try:
            value = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: the %-escapes are not UTF-8, got {raw!r}") from None
    else:
        value = raw
    if not value.isprintable():
        raise ConfigError(f"{where}: a control character or line break cannot be sent, got {raw!r}")
    return value


# Keys with a syntax of their own, by (section, key); the others are converted by their default's type.
_PARSERS = {("api", "extra_form"): parse_extra_form}


def _check(api: ApiConfig, number: NumberConfig, cache: CacheConfig, path: str) -> None:
    url = _URL.match(api.url)
    if not url:
        raise ConfigError(f"{path}: [api] url: must start with https:// or http://")
    if not url.group(1):
        raise ConfigError(f"{path}: [api] url: no host name in {api.url!r}")
    if api.ca_file and not os.path.isfile(api.ca_file):
        raise ConfigError(f"{path}: [api] ca_file: no such file: {api.ca_file!r}")
    if api.ca_file and not os.access(api.ca_file, os.R_OK):
        raise ConfigError(f"{path}: [api] ca_file: cannot be read: {api.ca_file!r}")
    if api.batch_size > MAX_NUMBERS:
        raise ConfigError(f"{path}: [api] batch_size: the service takes at most {MAX_NUMBERS} numbers a request")
    for key in ("country_code", "national_prefix", "international_prefix"):
        value = getattr(number, key)
        if value and not _digits(value):
            raise ConfigError(f"{path}: [number] {key}: digits 0-9 only, got {value!r}")
    if not number.lookup_types:
        raise ConfigError(f"{path}: [number] lookup_types: empty; list types, or 'any' to look every number up")
    bad = [t for t in number.lookup_types if t not in NUMBER_TYPES and t != "any"]
    if bad:
        raise ConfigError(
            f"{path}: [number] lookup_types: unknown type {bad[0]!r} (one of: any, {', '.join(NUMBER_TYPES)})"
        )
    if number.range_fallback not in ("no", "yes", "always"):
        raise ConfigError(f"{path}: [number] range_fallback: no, yes or always; got {number.range_fallback!r}")
    if cache.lock_fallback not in ("file", "none"):
        raise ConfigError(f"{path}: [cache] lock_fallback: file or none; got {cache.lock_fallback!r}")
    if cache.backend not in ("sqlite", "redis", "none"):
        raise ConfigError(f"{path}: [cache] backend: one of sqlite, redis, none; got {cache.backend!r}")


def _check_fastagi(fastagi: FastagiConfig, path: str) -> None:
    parse_listen(fastagi.listen, f"{path}: [fastagi] listen")
    if fastagi.metrics_listen:
        parse_listen(fastagi.metrics_listen, f"{path}: [fastagi] metrics_listen")
    if fastagi.log_numbers not in ("masked", "full"):
        raise ConfigError(f"{path}: [fastagi] log_numbers: masked or full, got {fastagi.log_numbers!r}")


def parse_listen(text: str, where: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a host and a port number; ``ConfigError`` if not."""
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not _digits(port) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: expected HOST:PORT, e.g. 127.0.0.1:4573, got {text!r}")
    return host, int(port)


def _uncomment(raw: str) -> str:
    """A value without its inline comments (`` ;`` or `` #`` and the rest of its line)."""
    return "\n".join(_INLINE_COMMENT.split(line, 1)[0] for line in raw.split("\n")).strip()


def _digits(value: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts fullwidth and superscript digits."""
    return value.isascii() and value.isdigit()


def require_credentials(config: Config) -> None:
    """Lookups need an account: say which key is missing rather than send an empty password."""
    for key in ("user", "password"):
        if not getattr(config.api, key):
            raise ConfigError(f"{config.path or '<config>'}: [api] {key}: not set")
