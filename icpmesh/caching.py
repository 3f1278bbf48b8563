# -*- test-case-name: tests.test_caching -*-
"""
HTTP caching rules (RFC 9111) as pure functions: cache keys, Cache-Control
parsing, what a shared cache may store, freshness lifetime and age.

No I/O and no clock: callers pass times (reactor seconds).
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import Mapping, Optional, Sequence
from urllib.parse import urlsplit

from icpmesh.interfaces import DEFAULT_PORTS

#: Status codes a shared cache may store with heuristic freshness
#: (RFC 9110 section 15.1, "heuristically cacheable").
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
#: Heuristic freshness: this fraction of the time since Last-Modified ...
HEURISTIC_FRACTION = 0.1
#: ... capped at this many seconds (RFC 9111 4.2.2 suggests a bounded fraction).
HEURISTIC_MAX = 24 * 3600.0

_keyCache: dict[str, str] = {}
_KEY_CACHE_MAX = 65536


def cacheKey(url: str) -> str:
    """
    The store key for the GET response to C{url}: scheme and host lower
    case, the default port dropped, an empty path made C{/}, the fragment
    dropped.  Results are remembered (bounded), since the same URLs come
    back through ICP queries and hits.

    @raise ValueError: never; an unparseable URL is its own key.
    """
    key = _keyCache.get(url)
    if key is not None:
        return key
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        key = url
    else:
        if ":" in host:
            host = f"[{host}]"
        if port is not None and port != DEFAULT_PORTS.get(scheme):
            host = f"{host}:{port}"
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        key = f"{scheme}://{host}{path}"
    if len(_keyCache) >= _KEY_CACHE_MAX:
        _keyCache.clear()
    _keyCache[url] = key
    return key


def parseCacheControl(values: Optional[Sequence[bytes]]) -> dict[str, Optional[str]]:
    """
    Parse Cache-Control header values into C{{directive: argument}}
    (directive names lower case; C{None} for no argument; quotes removed).
    """
    result: dict[str, Optional[str]] = {}
    if not values:
        return result
    for value in values:
        text = value.decode("latin-1")
        for part in _splitList(text):
            name, sep, arg = part.partition("=")
            name = name.strip().lower()
            if not name:
                continue
            if sep:
                arg = arg.strip()
                if len(arg) >= 2 and arg[0] == arg[-1] == '"':
                    arg = arg[1:-1]
                result.setdefault(name, arg)
            else:
                result.setdefault(name, None)
    return result


def _splitList(text: str) -> list[str]:
    parts = []
    current = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def deltaSeconds(value: Optional[str]) -> Optional[int]:
    """
    A delta-seconds argument, or C{None} when missing or invalid.
    """
    if value is None or not value.isdigit():
        return None
    return min(int(value), 2**31)


def httpDate(value: Optional[bytes]) -> Optional[float]:
    """
    Parse an HTTP date to a POSIX timestamp, or C{None}.
    """
    if not value:
        return None
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def mayStore(
    method: str,
    status: int,
    requestCC: Mapping[str, Optional[str]],
    responseCC: Mapping[str, Optional[str]],
    hasAuthorization: bool,
    hasExpires: bool,
    hasLastModified: bool,
) -> bool:
    """
    RFC 9111 section 3: may a shared cache store this response?
    """
    if method not in ("GET", "HEAD"):
        return False
    if "no-store" in requestCC or "no-store" in responseCC or "private" in responseCC:
        return False
    if status == 206 or status < 200 or status >= 600:
        return False
    if hasAuthorization and not (
        "public" in responseCC or "s-maxage" in responseCC or "must-revalidate" in responseCC
    ):
        return False
    explicit = (
        hasExpires
        or deltaSeconds(responseCC.get("max-age")) is not None
        or deltaSeconds(responseCC.get("s-maxage")) is not None
        or "public" in responseCC
    )
    if explicit:
        return True
    return status in HEURISTIC_STATUSES and hasLastModified


def freshnessLifetime(
    status: int,
    responseCC: Mapping[str, Optional[str]],
    date: Optional[float],
    expires: Optional[bytes],
    lastModified: Optional[float],
    responseTime: float,
) -> float:
    """
    RFC 9111 section 4.2.1, for a shared cache: s-maxage, then max-age,
    then Expires minus Date, then a heuristic from Last-Modified; 0 when
    none applies.
    """
    for directive in ("s-maxage", "max-age"):
        value = deltaSeconds(responseCC.get(directive))
        if value is not None:
            return float(value)
    if expires is not None:
        when = httpDate(expires)
        if when is None:
            return 0.0  # an invalid Expires means already expired
        base = date if date is not None else responseTime
        return max(0.0, when - base)
    if lastModified is not None and (status in HEURISTIC_STATUSES or "public" in responseCC):
        base = date if date is not None else responseTime
        return min(HEURISTIC_MAX, max(0.0, (base - lastModified) * HEURISTIC_FRACTION))
    return 0.0


def correctedInitialAge(
    ageHeader: Optional[bytes], date: Optional[float], requestTime: float, responseTime: float
) -> float:
    """
    RFC 9111 section 4.2.3: the age of a response when it arrived.
    """
    apparent = max(0.0, responseTime - date) if date is not None else 0.0
    age = 0.0
    if ageHeader is not None:
        text = ageHeader.decode("latin-1").strip()
        if text.isdigit():
            age = float(text)
    corrected = age + (responseTime - requestTime)
    return max(apparent, corrected)
