# -*- test-case-name: tests.test_caching -*-
"""
HTTP caching rules (RFC 9111) as pure functions: cache keys, Cache-Control
parsing, what a shared cache may store, freshness lifetime and age.

No I/O and no clock: callers pass times (reactor seconds).
"""

from __future__ import annotations

import calendar
import re

from typing import Mapping, Optional, Sequence
from urllib.parse import urlsplit

from icpmesh.interfaces import DEFAULT_PORTS

#: Status codes a shared cache may store with heuristic freshness
#: (RFC 9110 section 15.1, "heuristically cacheable").
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
#: Final status codes whose caching rules this cache implements, for
#: C{must-understand} (RFC 9111 section 5.2.2.3): those RFC 9110 defines,
#: except C{206} (partial content is never stored) and C{304}.
UNDERSTOOD_STATUSES = frozenset(
    {200, 201, 202, 203, 204, 205, 300, 301, 302, 303, 305, 307, 308}
    | set(range(400, 418)) | {421, 422, 426}
    | set(range(500, 506))
)
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
    if url.startswith("http://") and "#" not in url:
        # Fast path: most URLs (and every URL Squid sends over ICP) are
        # already normal - lower-case host, no user info, no default port.
        slash = url.find("/", 7)
        if slash > 7:
            authority = url[7:slash]
            if (
                "@" not in authority
                and not authority.endswith(":80")
                and authority == authority.lower()
            ):
                if len(_keyCache) >= _KEY_CACHE_MAX:
                    _keyCache.clear()
                _keyCache[url] = url
                return url
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
    if '"' not in text:
        # Nothing quoted: every comma separates (the loop below, at C speed).
        return [p for p in (part.strip() for part in text.split(",")) if p]
    parts = []
    current: list[str] = []
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


#: How a node treats C{CDN-Cache-Control} (RFC 9213), the C{cdn_cache_control}
#: setting: C{ignore} it; honour only its C{restrictive} part (C{no-store},
#: C{private}, C{no-cache}, and a C{max-age}/C{s-maxage} shorter than the
#: response's own lifetime), which can only make a cache store or reuse less;
#: or honour it fully, C{on}, as RFC 9213 asks of a CDN cache: it then
#: replaces C{Cache-Control} and C{Expires} for storing and freshness.
CDN_MODES = ("ignore", "restrictive", "on")

_SF_KEY = r"[a-z*][a-z0-9_.*-]*"
_SF_BARE = (
    r'(?:-?[0-9]{1,15}(?:\.[0-9]{1,3})?'  # integer or decimal
    r'|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"'  # string
    r"|[A-Za-z*][!#$%&'*+.^_`|~:/0-9A-Za-z-]*"  # token
    r"|:[A-Za-z0-9+/=]*:"  # byte sequence
    r"|\?[01])"  # boolean
)
_SF_PARAMS = rf"(?:;[ ]*{_SF_KEY}(?:={_SF_BARE})?)*"
_SF_MEMBER = re.compile(rf"({_SF_KEY})(?:=({_SF_BARE}){_SF_PARAMS}|{_SF_PARAMS})")
_SF_SEPARATOR = re.compile(r"[ \t]*,[ \t]*")


def parseTargetedCacheControl(values: Optional[Sequence[bytes]]) -> Optional[dict[str, Optional[str]]]:
    """
    Parse a targeted cache-control field such as C{CDN-Cache-Control}
    (RFC 9213): a Structured Field Dictionary (RFC 8941).  Unlike
    C{Cache-Control}, a field that is not a valid dictionary is ignored
    whole, and keys are case-sensitive (lower case).

    @return: C{{directive: argument}} like L{parseCacheControl}
        (C{None} for a boolean true, strings unquoted, parameters
        dropped), or C{None} when the field is absent or invalid.  Inner
        lists are not supported and make the field invalid.
    """
    if not values:
        return None
    text = ",".join(v.decode("latin-1") for v in values).strip(" \t")
    if not text:
        return None
    result: dict[str, Optional[str]] = {}
    position = 0
    while True:
        match = _SF_MEMBER.match(text, position)
        if match is None:
            return None
        name, value = match.group(1), match.group(2)
        if value == "?0":
            result.pop(name, None)  # false: as if absent
        else:
            # The last duplicate wins (RFC 8941 section 4.2.2).
            result[name] = None if value is None or value == "?1" else value
        position = match.end()
        if position == len(text):
            return result
        separator = _SF_SEPARATOR.match(text, position)
        if separator is None or separator.end() == len(text):
            return None
        position = separator.end()


def parseSurrogateControl(values: Optional[Sequence[bytes]]) -> Optional[dict[str, Optional[str]]]:
    """
    Parse C{Surrogate-Control} (W3C Edge Architecture): directives like
    C{Cache-Control}'s, each optionally aimed at one device with
    C{;target}.  This node announces no C{Surrogate-Capability}, so
    directives with a target are left out.

    @return: the untargeted directives, or C{None} when there are none.
    """
    if not values:
        return None
    result: dict[str, Optional[str]] = {}
    for name, argument in parseCacheControl(values).items():
        if ";" in name or (argument is not None and ";" in argument):
            continue
        result[name] = argument
    return result or None


def responseDirectives(
    ccValues: Optional[Sequence[bytes]],
    cdnValues: Optional[Sequence[bytes]],
    surrogateValues: Optional[Sequence[bytes]],
    mode: str,
) -> tuple[dict[str, Optional[str]], Optional[int], bool]:
    """
    The directives a response's storing and freshness are decided with:
    its C{Cache-Control}, with C{CDN-Cache-Control} and
    C{Surrogate-Control} applied as C{mode} says (L{CDN_MODES},
    L{targetedFreshness}; in C{on} mode a valid C{CDN-Cache-Control} comes
    first, as the more specific field).
    """
    cc = parseCacheControl(ccValues)
    if mode == "ignore" or not (cdnValues or surrogateValues):
        return cc, None, False
    cdn = parseTargetedCacheControl(cdnValues)
    surrogate = parseSurrogateControl(surrogateValues)
    if mode == "on":
        return targetedFreshness(cc, cdn if cdn else surrogate, mode)
    cap = None
    for targeted in (cdn, surrogate):
        cc, limit, _ = targetedFreshness(cc, targeted, mode)
        if limit is not None:
            cap = limit if cap is None else min(cap, limit)
    return cc, cap, False


def targetedFreshness(
    responseCC: dict[str, Optional[str]],
    targeted: Optional[dict[str, Optional[str]]],
    mode: str,
) -> tuple[dict[str, Optional[str]], Optional[int], bool]:
    """
    Combine a response's C{Cache-Control} with its C{CDN-Cache-Control}
    under the C{cdn_cache_control} C{mode} (see L{CDN_MODES}).

    @return: C{(directives, lifetimeCap, ignoreExpires)}: the directives
        to decide storing and reuse with, a cap on the freshness lifetime
        in seconds (or C{None}), and whether C{Expires} no longer counts.
    """
    if not targeted or mode == "ignore":
        return responseCC, None, False
    if mode == "on":
        # RFC 9213 section 2.1: a targeted field replaces the others.
        return targeted, None, True
    effective = responseCC
    for directive in ("no-store", "private", "no-cache"):
        if directive in targeted and directive not in effective:
            if effective is responseCC:
                effective = dict(responseCC)
            effective[directive] = None
    cap = None
    for directive in ("s-maxage", "max-age"):
        value = targeted.get(directive)
        if value is not None and value.isdigit():
            cap = min(int(value), 2**31)
            break
    return effective, cap, False


_MONTHS = {
    name: number
    for number, name in enumerate(
        (b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov", b"dec"),
        1,
    )
}
_MON = rb"(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)"
_IMF_FIXDATE = re.compile(
    rb"^(?:mon|tue|wed|thu|fri|sat|sun), (\d\d) " + _MON + rb" (\d{4}) (\d\d):(\d\d):(\d\d) gmt$",
    re.I,
)
_RFC850_DATE = re.compile(
    rb"^(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday), (\d\d)-" + _MON
    + rb"-(\d\d) (\d\d):(\d\d):(\d\d) gmt$",
    re.I,
)
_ASCTIME_DATE = re.compile(
    rb"^(?:mon|tue|wed|thu|fri|sat|sun) " + _MON + rb" ([ \d]\d) (\d\d):(\d\d):(\d\d) (\d{4})$",
    re.I,
)


def httpDate(value: Optional[bytes]) -> Optional[float]:
    """
    Parse an HTTP date (RFC 9110 section 5.6.7: IMF-fixdate, or the obsolete
    RFC 850 and asctime forms; names case-insensitive) to a POSIX timestamp.

    @return: the time, or C{None} for anything else - recipients must treat
        an invalid date as absent (or, for C{Expires}, as already expired),
        never guess.
    """
    if not value:
        return None
    cached = _dateCache.get(value, False)
    if cached is not False:
        return cached  # type: ignore[return-value]
    parsed = _parseHTTPDate(value)
    if len(value) > 64:
        # Not a date anyone sends; not worth memory.
        return parsed
    if len(_dateCache) >= _DATE_CACHE_MAX:
        _dateCache.clear()
    _dateCache[value] = parsed
    return parsed


#: Parsed HTTP dates by value (bounded): a response's C{Date} changes once
#: a second, and its C{Last-Modified} and C{Expires} repeat far more often.
_dateCache: dict[bytes, Optional[float]] = {}
_DATE_CACHE_MAX = 4096


def _parseHTTPDate(value: bytes) -> Optional[float]:
    """
    L{httpDate}, without its cache.
    """
    text = value.strip()
    match = _IMF_FIXDATE.match(text)
    if match is not None:
        day, month, year, hour, minute, second = match.groups()
    else:
        match = _RFC850_DATE.match(text)
        if match is not None:
            day, month, year, hour, minute, second = match.groups()
            # Two-digit years: RFC 9110 says to pick the most recent past
            # year with those digits; 70-99 is 19xx, 00-69 is 20xx.
            year = (b"19" if int(year) >= 70 else b"20") + year
        else:
            match = _ASCTIME_DATE.match(text)
            if match is None:
                return None
            month, day, hour, minute, second, year = match.groups()
    try:
        fields = (int(year), _MONTHS[month.lower()], int(day), int(hour), int(minute), int(second))
    except (KeyError, ValueError):
        return None
    if not (1 <= fields[2] <= 31 and fields[3] < 24 and fields[4] < 60 and fields[5] < 61):
        return None
    return float(calendar.timegm(fields + (0, 0, 0)))


def mayStore(
    method: str,
    status: int,
    requestCC: Mapping[str, Optional[str]],
    responseCC: Mapping[str, Optional[str]],
    hasAuthorization: bool,
    hasExpires: bool,
) -> bool:
    """
    RFC 9111 section 3: may a shared cache store this response at all?

    A response passes when the request method is GET, neither side says
    C{no-store} (a response's C{no-store} does not count when it also says
    C{must-understand} and its status is in L{UNDERSTOOD_STATUSES}; with
    any other status, C{must-understand} forbids storing), the response is not C{private}, a request with
    C{Authorization} got an explicit permission (C{public}, C{s-maxage} or
    C{must-revalidate}, section 3.5), partial content is not involved, and
    the response has explicit freshness (C{Expires}, C{max-age},
    C{s-maxage}, C{public}) or a heuristically cacheable status code.  Such
    a response may be stored even when it is stale at once, to be
    revalidated later; whether that is worth it is the caller's choice.

    @param method: the request method, upper case.
    @param status: the response status code.
    @param requestCC: the request's parsed C{Cache-Control}.
    @param responseCC: the response's parsed C{Cache-Control}.
    @param hasAuthorization: the request carried C{Authorization}.
    @param hasExpires: the response carried C{Expires}.
    @return: C{True} when storing is allowed.
    """
    if method != "GET":
        return False
    mustUnderstand = "must-understand" in responseCC
    if mustUnderstand and status not in UNDERSTOOD_STATUSES:
        return False
    if "no-store" in requestCC or "private" in responseCC:
        return False
    if "no-store" in responseCC and not mustUnderstand:
        # With must-understand and a status we implement, no-store is
        # there for caches that do not know must-understand (5.2.2.3).
        return False
    if status == 206 or status < 200 or status >= 600 or status == 304:
        return False
    if hasAuthorization and not (
        "public" in responseCC or "s-maxage" in responseCC or "must-revalidate" in responseCC
    ):
        return False
    if (
        hasExpires
        or "public" in responseCC
        or deltaSeconds(responseCC.get("max-age")) is not None
        or deltaSeconds(responseCC.get("s-maxage")) is not None
    ):
        return True
    return status in HEURISTIC_STATUSES


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
        # The first member of the first Age line; an invalid one is ignored
        # (RFC 9111 section 5.1).
        text = ageHeader.split(b",", 1)[0].decode("latin-1").strip()
        if text.isdigit():
            age = float(text)
    corrected = age + (responseTime - requestTime)
    return max(apparent, corrected)


def currentAge(
    ageHeader: Optional[bytes],
    date: Optional[float],
    requestTime: float,
    responseTime: float,
    now: float,
) -> float:
    """
    RFC 9111 section 4.2.3: the age of a stored response at C{now}.
    """
    return correctedInitialAge(ageHeader, date, requestTime, responseTime) + (now - responseTime)


#: Request headers whose values C{Vary} compares after normalising white
#: space only; everything else is compared as sent.
_VARY_SEPARATOR = "\n"


def varyNames(values: Optional[Sequence[bytes]]) -> Optional[tuple[str, ...]]:
    """
    The request header names a response varies on, lower case, sorted and
    without duplicates.

    @return: an empty tuple for no C{Vary}, C{None} for C{Vary: *} (the
        response can never be reused).
    """
    if not values:
        return ()
    names = set()
    for value in values:
        for part in value.decode("latin-1").split(","):
            name = part.strip().lower()
            if name == "*":
                return None
            if name:
                names.add(name)
    return tuple(sorted(names))


def varyKey(primary: str, names: Sequence[str], headers: Mapping[str, Sequence[bytes]]) -> str:
    """
    The secondary cache key of a response that varies on C{names}
    (RFC 9111 section 4.1): the primary key plus each named request
    header's values, white space normalised.  Requests whose selecting
    headers are equivalent get the same key; an absent header differs from
    an empty one.

    @param primary: the primary key (L{cacheKey}).
    @param names: the names from L{varyNames}.
    @param headers: request header values by lower-case name.
    """
    parts = [primary]
    for name in names:
        values = headers.get(name)
        if values is None:
            parts.append(f"{name}:")
        else:
            joined = ",".join(v.decode("latin-1") for v in values)
            normal = ",".join(" ".join(item.split()) for item in joined.split(","))
            parts.append(f"{name}={normal}")
    return _VARY_SEPARATOR.join(parts)


def weakMatch(a: bytes, b: bytes) -> bool:
    """
    Weak comparison of two entity tags (RFC 9110 section 8.8.3.2).
    """
    a = a.strip()
    b = b.strip()
    if a.startswith(b"W/"):
        a = a[2:]
    if b.startswith(b"W/"):
        b = b[2:]
    return a == b


def ifNoneMatchMatches(ifNoneMatch: Sequence[bytes], etag: Optional[bytes]) -> bool:
    """
    Whether an C{If-None-Match} field (all its values) matches C{etag},
    by weak comparison; C{*} matches any stored response.
    """
    for value in ifNoneMatch:
        for tag in _splitList(value.decode("latin-1")):
            if tag == "*":
                return True
            if etag is not None and weakMatch(tag.encode("latin-1"), etag):
                return True
    return False


def notModified(
    ifNoneMatch: Optional[Sequence[bytes]],
    ifModifiedSince: Optional[bytes],
    etag: Optional[bytes],
    lastModified: Optional[bytes],
    date: Optional[bytes],
) -> bool:
    """
    RFC 9111 section 4.3.2: should a cache answer a conditional request
    with 304 from a stored response with these validators?

    C{If-None-Match} wins when present; otherwise C{If-Modified-Since} is
    compared with C{Last-Modified} (or, without it, the stored C{Date}).
    """
    if ifNoneMatch:
        return ifNoneMatchMatches(ifNoneMatch, etag)
    if ifModifiedSince is None:
        return False
    since = httpDate(ifModifiedSince)
    if since is None:
        return False
    modified = httpDate(lastModified) if lastModified is not None else httpDate(date)
    return modified is not None and modified <= since


#: Headers a 304 never replaces in the stored response (RFC 9111 section
#: 3.2: the framing of the stored body stays).
#: C{Content-MD5} is a digest of the stored bytes: a 304 cannot change those.
_KEEP_ON_UPDATE = frozenset(
    {b"content-length", b"content-encoding", b"content-range", b"transfer-encoding", b"content-md5"}
)


def updatedHeaders(
    stored: Sequence[tuple[bytes, bytes]], fresh: Sequence[tuple[bytes, bytes]]
) -> tuple[tuple[bytes, bytes], ...]:
    """
    RFC 9111 section 3.2: the stored headers updated from a 304 (or a HEAD
    response): every header field in C{fresh} replaces all stored fields of
    that name, except those describing the body's framing.

    @param stored: the stored C{(name, value)} pairs (names as stored).
    @param fresh: the new C{(name, value)} pairs, hop-by-hop ones removed.
    """
    replace: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for name, value in fresh:
        lower = name.lower()
        if lower in _KEEP_ON_UPDATE:
            continue
        replace.setdefault(lower, []).append((name, value))
    result: list[tuple[bytes, bytes]] = []
    done: set[bytes] = set()
    for name, value in stored:
        lower = name.lower()
        if lower in replace:
            if lower not in done:
                result.extend(replace[lower])
                done.add(lower)
        else:
            result.append((name, value))
    for lower, pairs in replace.items():
        if lower not in done:
            result.extend(pairs)
    return tuple(result)


def invalidationTarget(requestURL: str, value: bytes) -> Optional[str]:
    """
    RFC 9111 section 4.4: the URL named by a C{Location} or
    C{Content-Location} value, resolved against the request URL, when it
    has the same origin (scheme, host and port) as the request; otherwise
    C{None} (a cache must not invalidate other origins on its word).
    """
    from urllib.parse import urljoin

    try:
        target = urljoin(requestURL, value.decode("latin-1").strip())
        a = urlsplit(requestURL)
        b = urlsplit(target)
        same = (
            a.scheme.lower() == b.scheme.lower()
            and (a.hostname or "") == (b.hostname or "")
            and (a.port or DEFAULT_PORTS.get(a.scheme.lower()))
            == (b.port or DEFAULT_PORTS.get(b.scheme.lower()))
        )
    except ValueError:
        return None
    return target if same else None
