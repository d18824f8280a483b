"""Local time of a frame: its timestamp (microseconds since the Unix epoch, UTC) in the time zone of the
place the log was recorded, when the location says where that is.

The frame rows' ``map_location`` names the place (nuPlan: ``log.map_version`` such as
``us-nv-las-vegas-strip``; OpenScene the same; nuScenes: ``log.location`` such as ``singapore-onenorth``;
nuPlan's ``log.location`` is ``las_vegas``, ``boston``, ...). :data:`LOCATION_TIMEZONES` maps them to
IANA time zones by the first key contained in the lower-cased location:

==================== ====================== ===========================================================
key                  time zone              locations
==================== ====================== ===========================================================
``las-vegas``        America/Los_Angeles    nuPlan Las Vegas (``us-nv-las-vegas-strip``)
``las_vegas``        America/Los_Angeles    nuPlan ``log.location``
``us-nv``            America/Los_Angeles    any other Nevada map
``boston``           America/New_York       nuPlan Boston (``us-ma-boston``), nuScenes ``boston-seaport``
``us-ma``            America/New_York       any other Massachusetts map
``pittsburgh``       America/New_York       nuPlan Pittsburgh (``us-pa-pittsburgh-hazelwood``)
``us-pa``            America/New_York       any other Pennsylvania map
``singapore``        Asia/Singapore         nuPlan ``log.location``, nuScenes ``singapore-*``
``sg-``              Asia/Singapore         nuPlan Singapore (``sg-one-north``)
==================== ====================== ===========================================================

Any other location (or a missing time zone database) gives UTC, labelled ``UTC`` with the reason, so a
picture never shows a local-looking time that is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: (key contained in the lower-cased location, IANA time zone), first match wins (see the module doc).
LOCATION_TIMEZONES: tuple[tuple[str, str], ...] = (
    ("las-vegas", "America/Los_Angeles"),
    ("las_vegas", "America/Los_Angeles"),
    ("us-nv", "America/Los_Angeles"),
    ("boston", "America/New_York"),
    ("us-ma", "America/New_York"),
    ("pittsburgh", "America/New_York"),
    ("us-pa", "America/New_York"),
    ("singapore", "Asia/Singapore"),
    ("sg-", "Asia/Singapore"),
)


def timezone_of(location: str | None) -> str | None:
    """The IANA time zone of a log location (see :data:`LOCATION_TIMEZONES`), None when unknown."""
    text = (location or "").lower()
    for key, zone in LOCATION_TIMEZONES:
        if key in text:
            return zone
    return None


@dataclass(frozen=True)
class LocalTime:
    """A timestamp as a person reads it.

    Attributes:
        time: the aware datetime (in ``zone``, or UTC).
        zone: the IANA zone used, or ``"UTC"``.
        local: whether ``zone`` is the location's own zone (False: UTC because it is not known).
        reason: why UTC (empty when ``local``).
    """

    time: datetime
    zone: str
    local: bool
    reason: str = ""

    def text(self) -> str:
        """``2021-10-18 03:47:35.993 PDT (America/Los_Angeles)`` or ``... UTC (location unknown)``."""
        stamp = self.time.strftime("%Y-%m-%d %H:%M:%S.") + f"{self.time.microsecond // 1000:03d}"
        if self.local:
            return f"{stamp} {self.time.tzname()} ({self.zone})"
        return f"{stamp} UTC ({self.reason})"


def local_time(timestamp_us: int, location: str | None) -> LocalTime:
    """``timestamp_us`` (microseconds since the Unix epoch) in the time zone of ``location``.

    Raises:
        ValueError: the timestamp is out of the range a datetime can hold.
    """
    try:
        utc = datetime.fromtimestamp(int(timestamp_us) / 1e6, tz=UTC)
    except (OverflowError, OSError) as exc:
        raise ValueError(f"timestamp {timestamp_us} us is out of range ({exc})") from None
    zone = timezone_of(location)
    if zone is None:
        where = f"location {location!r} unknown" if location else "location unknown"
        return LocalTime(utc, "UTC", False, where)
    try:
        tz = ZoneInfo(zone)
    except ZoneInfoNotFoundError:
        return LocalTime(utc, "UTC", False, f"no time zone data for {zone}: pip install tzdata")
    return LocalTime(utc.astimezone(tz), zone, True)
