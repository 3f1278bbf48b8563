# -*- test-case-name: tests.test_ranges -*-
"""
Byte ranges served from stored complete responses (RFC 9110 section 14).

The rules are pure functions, no I/O and no clock:

  - L{parseRange} reads a C{Range} header against a body size and says
    which single byte range to send, that none can be satisfied, or that the
    header is to be ignored (multiple ranges, another unit, bad syntax);
  - L{ifRangeAllows} evaluates C{If-Range} (RFC 9110 section 13.1.5)
    against a stored response's validators;
  - L{contentRange} and L{unsatisfiedRange} build C{Content-Range} values.

L{writeRange} writes one range of a stored object to a consumer: with the
object's own L{icpmesh.interfaces.IRangedCachedObject.writeRangeTo} when it
has one (reading only those bytes), else by filtering L{writeTo
<icpmesh.interfaces.ICachedObject.writeTo>} through a L{_SliceConsumer}.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from twisted.internet.defer import Deferred

from icpmesh.caching import httpDate
from icpmesh.interfaces import IRangedCachedObject


class _Unsatisfiable:
    """
    The type of L{UNSATISFIABLE}.
    """

    def __repr__(self) -> str:
        return "UNSATISFIABLE"


#: A C{Range} header none of whose ranges overlaps the body: answer 416.
UNSATISFIABLE = _Unsatisfiable()

#: What L{parseRange} returns: C{None} (ignore the
#: header and send the whole body), L{UNSATISFIABLE}, or C{(first, last)},
#: the inclusive offsets of the bytes to send.
RangeResult = Union[None, _Unsatisfiable, tuple[int, int]]

#: Numbers with more digits than this are taken as "larger than any body":
#: no store holds 10**18 bytes, and C{int()} of a very long digit string
#: is slow or refused (Python's C{int_max_str_digits}).
_MAX_DIGITS = 18

_HUGE = 10**_MAX_DIGITS

_DIGITS = frozenset(b"0123456789")

_OWS = b" \t"


def _number(text: bytes) -> Optional[int]:
    """
    The value of a non-empty run of ASCII digits, capped at L{_HUGE};
    C{None} for anything else (signs, blanks, other characters).
    """
    if not text or not _DIGITS.issuperset(text):
        return None
    if len(text) > _MAX_DIGITS:
        return _HUGE
    return int(text)


def parseRange(values: Sequence[bytes], size: int) -> RangeResult:
    """
    Read a C{Range} request header against a body of C{size} bytes
    (RFC 9110 section 14.1.1 and 14.2).

    Only one C{bytes} range is served.  The unit is case-insensitive;
    optional white space around the list's elements and empty elements are
    accepted, as for any list-based field (RFC 9110 section 5.6.1).

      - C{first-last}: C{last} is clamped to the body's end; satisfiable
        when C{first} is inside the body.  C{last < first} is invalid.
      - C{first-}: from C{first} to the end.
      - C{-n}: the last C{n} bytes (the whole body when it is shorter);
        satisfiable when C{n > 0} and the body is not empty.

    @param values: the header's values (a request may repeat the field;
        anything but exactly one value is ignored).
    @param size: the body length.
    @return: C{(first, last)} (inclusive offsets), L{UNSATISFIABLE}, or
        C{None} when the header must be ignored: several header lines,
        another unit, several ranges, or a malformed one.
    """
    if len(values) != 1:
        return None
    unit, equals, rangeSet = values[0].partition(b"=")
    if not equals or unit.lower() != b"bytes":
        return None
    specs = [spec.strip(_OWS) for spec in rangeSet.split(b",")]
    specs = [spec for spec in specs if spec]
    if len(specs) != 1:
        return None
    first, dash, last = specs[0].partition(b"-")
    if not dash:
        return None
    if not first:
        suffix = _number(last)
        if suffix is None:
            return None
        if suffix == 0:
            return UNSATISFIABLE
        if size == 0:
            # RFC 9110 14.1.1: satisfiable, but no byte range can say so;
            # the whole (empty) response answers it.
            return None
        return (max(0, size - suffix), size - 1)
    start = _number(first)
    if start is None:
        return None
    if last:
        end = _number(last)
        if end is None or end < start:
            return None
    else:
        end = _HUGE
    if start >= size:
        return UNSATISFIABLE
    return (start, min(end, size - 1))


def ifRangeAllows(
    values: Sequence[bytes],
    etag: Optional[bytes],
    lastModified: Optional[bytes],
    date: Optional[bytes],
) -> bool:
    """
    RFC 9110 section 13.1.5: may the range be served, given the request's
    C{If-Range} values, for a stored response with these validators?

      - there must be exactly one C{If-Range} line;

      - an entity tag must be strong and equal to the stored C{ETag}, which
        must be strong too (the strong comparison, section 8.8.3.2);
      - an HTTP date must be exactly the stored C{Last-Modified}, and that
        must be a strong validator: the stored C{Date} is at least one
        second later (section 8.8.2.2);
      - anything else is false.

    When this is false the C{Range} header is ignored: the whole body is
    sent with 200.
    """
    if len(values) != 1:
        return False
    value = values[0].strip(_OWS)
    if value.startswith(b'"'):
        return (
            etag is not None
            and len(value) >= 2
            and value.endswith(b'"')
            and etag.strip(_OWS) == value
        )
    if value.startswith(b"W/"):
        return False
    if lastModified is None or lastModified.strip(_OWS) != value:
        return False
    modified = httpDate(value)
    sent = httpDate(date)
    return modified is not None and sent is not None and sent - modified >= 1


def contentRange(first: int, last: int, size: int) -> bytes:
    """
    The C{Content-Range} of a 206: C{bytes first-last/size}.
    """
    return b"bytes %d-%d/%d" % (first, last, size)


def unsatisfiedRange(size: int) -> bytes:
    """
    The C{Content-Range} of a 416: C{bytes */size}.
    """
    return b"bytes */%d" % (size,)


class _SliceConsumer:
    """
    A consumer that passes on only bytes C{[offset, offset + length)} of
    what is written to it, for stores whose objects cannot read a range
    themselves.  Producers are registered with the real consumer, so its
    flow control still applies.
    """

    def __init__(self, consumer: Any, offset: int, length: int) -> None:
        self._consumer = consumer
        self._skip = offset
        self._left = length

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
        if self._left <= 0:
            return
        if len(data) > self._left:
            data = data[: self._left]
        self._left -= len(data)
        self._consumer.write(data)


def writeRange(obj: Any, consumer: Any, offset: int, length: int) -> "Deferred[None]":
    """
    Write bytes C{[offset, offset + length)} of a stored object's body to
    C{consumer}.

    @param obj: an L{icpmesh.interfaces.ICachedObject}; when it also
        provides L{IRangedCachedObject} only the range is read.
    @return: a Deferred that fires when the range has been written, and
        fails as C{writeTo} does.
    """
    if IRangedCachedObject.providedBy(obj):
        return obj.writeRangeTo(consumer, offset, length)  # type: ignore[no-any-return]
    return obj.writeTo(_SliceConsumer(consumer, offset, length))  # type: ignore[no-any-return]
