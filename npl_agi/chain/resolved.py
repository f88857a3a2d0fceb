"""What the chain knows of the dialled numbers before and after asking: ``Resolved`` (what
the local data, the cache and the numbering plan made of them) and the rule for stale entries."""

from __future__ import annotations

from collections import namedtuple

from npl_agi.core.codes import SERVICE_FAILURES
from npl_agi.core.protocol import Answer


def stale_standins(fresh: dict[str, Answer], stale: dict[str, Answer]) -> dict[str, Answer]:
    """The stale entries that stand in for the numbers the service failed to answer.

    Only for a service that failed (``SERVICE_FAILURES``): a refusal of the account (``AUTH``,
    ``CREDIT``, ``LOCKED``) or a local failure keeps its own ``NPL_ERR``, so the admin sees it.
    """
    return {m: stale[m] for m, a in fresh.items() if a.error in SERVICE_FAILURES and m in stale}


class Resolved(namedtuple("Resolved", "dialled msisdn_of found settled refused holders")):
    """What the local data, the cache and the numbering plan made of the dialled numbers, before
    any request.

    ``msisdn_of`` maps each dialled number that may be looked up to its msisdn, ``found`` the
    known and cached answers by msisdn, ``settled`` the dialled numbers refused without asking
    (BADNUMBER, NOTMOBILE) to their answers, ``refused`` those refused by type (NOTMOBILE) to
    their msisdn, ``holders`` every msisdn to its range holder ("" when unknown): read with the
    cache, given to the answers last.
    """

    __slots__ = ()

    @property
    def wanted(self) -> list[str]:
        """The distinct msisdns, in the order first dialled."""
        return list(dict.fromkeys(self.msisdn_of.values()))

    @property
    def cache_hits(self) -> int:
        """The distinct msisdns the cache answered (the numbers the admin knows are not its)."""
        return sum(1 for m in self.wanted if m in self.found and self.found[m].source != "local")

    @property
    def misses(self) -> list[str]:
        """The distinct msisdns the cache does not hold: what the service must be asked."""
        return [m for m in self.wanted if m not in self.found]
