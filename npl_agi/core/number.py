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


def canonical(dialled: str, cfg: NumberConfig) -> str:
    """``validate(normalise(dialled, cfg), cfg)``: the same number, or the same refusal.

    For a file of millions of numbers: a number written in international form is decided from
    the numbering plan's lengths and patterns (``quick``), without a phonenumbers parse per
    number; whatever that cannot be sure of goes through ``validate``.
    """
    readings = normalise(dialled, cfg)
    return quick(readings, cfg) or validate(readings, cfg)


def quick(readings: tuple[str, ...], cfg: NumberConfig) -> str | None:
    """What ``validate(readings, cfg)`` returns, decided as phonenumbers decides it but without
    parsing; None when not sure (then only ``validate`` may say).

    Sure of a reading that parses as written: a known country code, then a national number
    that keeps every digit. Not sure, and so None: a type filter other than ``any``, no known
    country code, a national number starting with 0 (a trunk prefix written after the country
    code, or an Italian leading zero) or one that the country's national prefix rule could
    strip, a refusal (its reason is ``validate``'s to give).
    """
    if "any" not in cfg.lookup_types:
        return None
    first = _as_written(readings[0])
    if first is None:
        return None
    if len(readings) == 1:  # valid or possible: a valid number has a possible length
        return readings[0] if first[0].possible(first[1]) else None
    if first[0].valid(first[1]):
        return readings[0]
    rest = [_as_written(r) for r in readings[1:]]
    if None in rest:
        return None
    written = list(zip(readings, [first, *rest], strict=True))
    for reading, (country, national) in written[1:]:
        if country.valid(national):
            return reading
    return next((reading for reading, (country, national) in written if country.possible(national)), None)


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


# -- ``quick``: phonenumbers' metadata, read once per country code and kept compiled --


class _Desc:
    """A number description (the general one, or one type's): its lengths and its pattern."""

    __slots__ = ("lengths", "pattern")

    def __init__(self, desc) -> None:
        import re

        self.lengths = frozenset(desc.possible_length) if desc is not None else frozenset()
        pattern = desc.national_number_pattern if desc is not None else None
        self.pattern = re.compile(pattern) if pattern else None

    def matches(self, national: str) -> bool:
        if self.lengths and len(national) not in self.lengths:
            return False
        return self.pattern is not None and self.pattern.fullmatch(national) is not None


class _Region:
    """One region's validity rule: the general description and, behind it, a type's."""

    __slots__ = ("country_code", "general", "leading", "types")

    _TYPES = ("premium_rate", "toll_free", "shared_cost", "voip", "personal_number", "pager", "uan", "voicemail")

    def __init__(self, metadata) -> None:
        import re

        self.country_code = metadata.country_code
        self.general = _Desc(metadata.general_desc)
        names = ["mobile", "fixed_line", *self._TYPES]
        if metadata.same_mobile_and_fixed_line_pattern:  # then mobile counts only as fixed_line does
            names.remove("mobile")
        self.types = tuple(_Desc(d) for d in (getattr(metadata, n) for n in names) if d is not None)
        self.leading = re.compile(metadata.leading_digits) if metadata.leading_digits is not None else None

    def valid(self, national: str) -> bool:
        """``_number_type_helper(national, metadata) != UNKNOWN``"""
        return self.general.matches(national) and any(t.matches(national) for t in self.types)


class _Country:
    """A country calling code: its regions (the main one first), the main region's lengths and
    national prefix rule, each region's validity rule."""

    __slots__ = ("code", "lengths", "local_lengths", "prefix", "regions")

    def __init__(self, code: str, region_codes: tuple[str, ...]) -> None:
        import re

        from phonenumbers.phonemetadata import PhoneMetadata

        self.code = code
        self.regions = []
        for region in region_codes:
            if region == "001":
                metadata = PhoneMetadata.metadata_for_nongeo_region(int(code), None)
            else:
                metadata = PhoneMetadata.metadata_for_region(region.upper(), None)
            self.regions.append((region, _Region(metadata) if metadata is not None else None))
        main = self.regions[0][1]
        if main is None:
            raise LookupError(code)
        metadata = PhoneMetadata.metadata_for_region_or_calling_code(int(code), region_codes[0])
        general = metadata.general_desc
        self.lengths = tuple(general.possible_length) if general is not None else ()
        self.local_lengths = tuple(general.possible_length_local_only) if general is not None else ()
        npfp = metadata.national_prefix_for_parsing
        self.prefix = re.compile(npfp) if npfp else None

    def possible(self, national: str) -> bool:
        """phonenumbers' ``is_possible_number``: a length of the main region's, a local-only
        length included."""
        length, lengths = len(national), self.lengths
        if length in self.local_lengths:
            return True
        if not lengths or lengths[0] > length or lengths[-1] < length:
            return False
        return length in lengths

    def valid(self, national: str) -> bool:
        """phonenumbers' ``is_valid_number``: the region chosen as ``region_code_for_number``
        chooses it (leading digits, else the first region the number is valid in), then valid
        there."""
        if len(self.regions) == 1:
            region = self.regions[0][1]
            if region is None or (self.regions[0][0] != "001" and str(region.country_code) != self.code):
                return False
            return region.valid(national)
        for _, region in self.regions:
            if region is None:
                continue
            if region.leading is not None:
                if region.leading.match(national):
                    return str(region.country_code) == self.code and region.valid(national)
            elif region.valid(national):
                return str(region.country_code) == self.code
        return False


_COUNTRIES: dict[str, _Country | None] = {}  # "44" -> its rules; None: a code with no metadata
_CODES: dict[str, tuple[str, ...]] = {}  # every country calling code, as digits, to its regions


def _as_written(reading: str) -> tuple[_Country, str] | None:
    """The country and national number phonenumbers parses ``+reading`` to, when it is sure to
    keep every digit as written; else None."""
    country = _country_of(reading)
    if country is None:
        return None
    national = reading[len(country.code) :]
    if len(national) < 2 or national[0] == "0" or (country.prefix and country.prefix.match(national)):
        return None
    return country, national


def _country_of(reading: str) -> _Country | None:
    """The country calling code a reading starts with (1 to 3 digits, the first known wins, as
    phonenumbers extracts it), or None."""
    if not _CODES:
        from phonenumbers import COUNTRY_CODE_TO_REGION_CODE

        _CODES.update((str(code), tuple(regions)) for code, regions in COUNTRY_CODE_TO_REGION_CODE.items())
    if not reading or reading[0] == "0":
        return None
    for n in (1, 2, 3):
        code = reading[:n]
        if code in _CODES:
            if code not in _COUNTRIES:
                try:
                    _COUNTRIES[code] = _Country(code, _CODES[code])
                except LookupError:
                    _COUNTRIES[code] = None
            return _COUNTRIES[code]
    return None
