"""Dialled number to international format (``447912345678``), or a clear refusal.

Dialled numbers come from SIP request URIs and can hold anything. Two steps:

* ``normalise`` is plain string work (separators, international and trunk prefixes, digits,
  length). It is all a cache lookup needs, so a cache hit never loads anything heavier.
* ``validate`` runs before a number may cost a credit: ``phonenumbers`` (Google's
  libphonenumber metadata) checks the country code and numbering plan, gives the canonical
  E.164 form and the number type that ``lookup_types`` filters on.
"""

from __future__ import annotations

from collections import namedtuple

from npl_agi.core.errors import BadNumber, NotMobile

_PLAN = {
    "country_code": "",
    "national_prefix": "0",
    "international_prefix": "00",
    "lookup_types": ("mobile", "fixed_line_or_mobile"),
    "range_fallback": "no",
}


class NumberConfig(namedtuple("NumberConfig", _PLAN, defaults=tuple(_PLAN.values()))):
    """How the PBX's users dial (``[number]``): the numbering plan a dialled number is read by."""

    __slots__ = ()


MAX_INPUT = 64  # longer than any dialled number with separators; the rest is hostile
_SEPARATORS = str.maketrans("", "", " \t-.()/[]")


def normalise(dialled: str, cfg: NumberConfig) -> tuple[str, ...]:
    """The international forms the dialled number can stand for, most likely first.

    Usually one. A number dialled with no prefix at all may be national without a trunk prefix
    (NANP ``7044518989``) or international already (``447912345678``): both readings are
    returned, and ``validate`` takes the first valid one. The international reading comes
    first only when it starts with our own country code (a German PBX given ``4915112345678``);
    otherwise the national one does (a US PBX dialling ``4794518989`` means Arkansas, not
    Norway). Raises ``BadNumber``.
    """
    if len(dialled) > MAX_INPUT:
        raise BadNumber(f"dialled number longer than {MAX_INPUT} characters")
    s = dialled.strip().translate(_SEPARATORS)
    readings = None
    if s.startswith("+"):
        s = s[1:]
    elif cfg.international_prefix and s.startswith(cfg.international_prefix):
        s = s[len(cfg.international_prefix) :]
    elif cfg.national_prefix and cfg.country_code and s.startswith(cfg.national_prefix):
        s = cfg.country_code + s[len(cfg.national_prefix) :]
    elif cfg.country_code:
        national = cfg.country_code + s
        readings = (s, national) if s.startswith(cfg.country_code) else (national, s)
    if not s.isascii() or not s.isdigit():
        raise BadNumber("dialled number has characters other than digits and separators")
    readings = tuple(r for r in readings or (s,) if 7 <= len(r) <= 15)
    if not readings:
        raise BadNumber(f"{len(s)} digits: an international number has 7 to 15")
    return readings


def validate(readings: tuple[str, ...], cfg: NumberConfig) -> str:
    """The canonical number to look up, from the readings ``normalise`` gave.

    The first reading that is a valid number wins, else the first possible one. Raises
    ``BadNumber`` for an unknown country code or an impossible number, ``NotMobile`` for a
    number whose type is not in ``lookup_types``.
    """
    import phonenumbers

    parsed = [p for p in map(_parse_or_none, readings) if p is not None]
    valid = [p for p in parsed if phonenumbers.is_valid_number(p)]
    possible = [p for p in parsed if phonenumbers.is_possible_number(p)]
    if not parsed:
        raise BadNumber("no country has this calling code")
    if not (valid or possible):
        raise BadNumber("not a possible number in its country's numbering plan")
    number = (valid or possible)[0]
    # libphonenumber's E.164 form drops a trunk 0 written after the country code ("+44 (0)79…")
    msisdn = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)[1:]
    types = cfg.lookup_types
    if "any" not in types:
        kind = _type_name(phonenumbers.number_type(number))
        if kind not in types:
            raise NotMobile(f"number type is {kind}; lookup_types allows {', '.join(types)}", msisdn)
    return msisdn


def number_type(msisdn: str) -> str:
    """libphonenumber's type of an international number, e.g. ``mobile``, ``fixed_line``."""
    import phonenumbers

    return _type_name(phonenumbers.number_type(_parse(msisdn)))


def _type_name(value: int) -> str:
    from phonenumbers import PhoneNumberType

    names = {getattr(PhoneNumberType, n): n.lower() for n in dir(PhoneNumberType) if n.isupper()}
    return names.get(value, "unknown")


def _parse(msisdn: str):
    parsed = _parse_or_none(msisdn)
    if parsed is None:
        raise BadNumber("not an international number")
    return parsed


def _parse_or_none(msisdn: str):
    import phonenumbers

    try:
        return phonenumbers.parse("+" + msisdn)
    except phonenumbers.NumberParseException:
        return None
