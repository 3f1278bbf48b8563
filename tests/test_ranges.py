"""
Tests for L{icpmesh.ranges}: parsing C{Range} against a body size,
C{If-Range}, C{Content-Range} values, and writing one range of a stored
object.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from icpmesh.interfaces import ICachedObject
from icpmesh.ranges import (
    UNSATISFIABLE,
    contentRange,
    ifRangeAllows,
    parseRange,
    unsatisfiedRange,
    writeRange,
)

LM = b"Mon, 01 Jan 2024 00:00:00 GMT"
LATER = b"Mon, 01 Jan 2024 00:00:01 GMT"


def parse(value: bytes, size: int = 10) -> Any:
    return parseRange([value], size)


class ParseRangeTests(SynchronousTestCase):
    """
    L{parseRange} selects one byte range, says it cannot be satisfied, or
    says to ignore the header.
    """

    def test_firstLast(self) -> None:
        """
        C{first-last} selects those bytes, inclusive.
        """
        self.assertEqual(parse(b"bytes=2-5"), (2, 5))

    def test_firstByte(self) -> None:
        """
        C{0-0} is the first byte.
        """
        self.assertEqual(parse(b"bytes=0-0"), (0, 0))

    def test_lastBeyondSizeClamped(self) -> None:
        """
        A last position past the end is clamped to the last byte.
        """
        self.assertEqual(parse(b"bytes=3-99"), (3, 9))
        self.assertEqual(parse(b"bytes=0-9"), (0, 9))

    def test_openEnded(self) -> None:
        """
        C{first-} runs to the end.
        """
        self.assertEqual(parse(b"bytes=4-"), (4, 9))
        self.assertEqual(parse(b"bytes=9-"), (9, 9))

    def test_suffix(self) -> None:
        """
        C{-n} is the last n bytes, or the whole body when it is shorter.
        """
        self.assertEqual(parse(b"bytes=-3"), (7, 9))
        self.assertEqual(parse(b"bytes=-10"), (0, 9))
        self.assertEqual(parse(b"bytes=-11"), (0, 9))

    def test_suffixZeroUnsatisfiable(self) -> None:
        """
        C{-0} selects nothing: 416.
        """
        self.assertIs(parse(b"bytes=-0"), UNSATISFIABLE)

    def test_firstAtOrPastEndUnsatisfiable(self) -> None:
        """
        A first position at or after the end cannot be satisfied.
        """
        self.assertIs(parse(b"bytes=10-"), UNSATISFIABLE)
        self.assertIs(parse(b"bytes=10-20"), UNSATISFIABLE)
        self.assertIs(parse(b"bytes=11-12"), UNSATISFIABLE)

    def test_lastBeforeFirstIgnored(self) -> None:
        """
        C{5-2} is invalid: the header is ignored (the whole body, 200).
        """
        self.assertIsNone(parse(b"bytes=5-2"))

    def test_whitespaceAroundElements(self) -> None:
        """
        Optional white space around the range, as in any list, is accepted.
        """
        self.assertEqual(parse(b"bytes= 0-1"), (0, 1))
        self.assertEqual(parse(b"bytes=0-1 \t"), (0, 1))
        self.assertEqual(parse(b"bytes=, 0-1 ,"), (0, 1))

    def test_whitespaceInsideIgnored(self) -> None:
        """
        White space inside a range, or between the unit and C{=}, is not
        valid: the header is ignored.
        """
        self.assertIsNone(parse(b"bytes=0 -1"))
        self.assertIsNone(parse(b"bytes=0- 1"))
        self.assertIsNone(parse(b"bytes =0-1"))

    def test_unitCaseInsensitive(self) -> None:
        """
        The unit is case-insensitive.
        """
        self.assertEqual(parse(b"Bytes=0-1"), (0, 1))
        self.assertEqual(parse(b"BYTES=-1"), (9, 9))

    def test_otherUnitIgnored(self) -> None:
        """
        Units other than C{bytes} are ignored.
        """
        self.assertIsNone(parse(b"items=0-1"))
        self.assertIsNone(parse(b"bytes0-1"))

    def test_multipleRangesIgnored(self) -> None:
        """
        Several ranges get the whole body (a multipart answer is optional).
        """
        self.assertIsNone(parse(b"bytes=0-1,3-4"))
        self.assertIsNone(parse(b"bytes=0-1, -2"))
        self.assertIsNone(parse(b"bytes=20-30,40-50"))

    def test_severalHeaderLinesIgnored(self) -> None:
        """
        A request with more than one C{Range} line, or none, is ignored.
        """
        self.assertIsNone(parseRange([b"bytes=0-1", b"bytes=2-3"], 10))
        self.assertIsNone(parseRange([], 10))

    def test_malformedIgnored(self) -> None:
        """
        Anything that is not C{first-[last]} or C{-n} with ASCII digits is
        ignored.
        """
        for value in (
            b"bytes=", b"bytes=-", b"bytes=1", b"bytes=a-b", b"bytes=1-2-3", b"bytes=+1-2",
            b"bytes=-+1", b"bytes=--1", b"bytes=1--2", b"bytes=0x1-2", b"bytes=\xd9\xa1-2",
            b"bytes=1.0-2", b"",
        ):
            self.assertIsNone(parse(value), value)

    def test_hugeNumbers(self) -> None:
        """
        Numbers too large for any body work without converting thousands of
        digits: a huge last is clamped, a huge first is unsatisfiable, a
        huge suffix is the whole body, and a huge last below a huger first
        is still invalid.
        """
        huge = b"9" * 5000
        self.assertEqual(parse(b"bytes=1-" + huge), (1, 9))
        self.assertIs(parse(b"bytes=" + huge + b"-"), UNSATISFIABLE)
        self.assertEqual(parse(b"bytes=-" + huge), (0, 9))
        self.assertEqual(parse(b"bytes=2-18446744073709551616"), (2, 9))

    def test_emptyBody(self) -> None:
        """
        Of an empty body, a range with a first position cannot be
        satisfied; a non-zero suffix can (RFC 9110 14.1.1), but no 206 can
        express it, so it is ignored and the whole empty body is sent; a
        malformed range is ignored too.
        """
        self.assertIs(parse(b"bytes=0-0", 0), UNSATISFIABLE)
        self.assertIs(parse(b"bytes=0-", 0), UNSATISFIABLE)
        self.assertIs(parse(b"bytes=-0", 0), UNSATISFIABLE)
        self.assertIsNone(parse(b"bytes=-5", 0))
        self.assertIsNone(parse(b"bytes=5-2", 0))

    @given(
        size=st.integers(min_value=0, max_value=1000),
        first=st.integers(min_value=0, max_value=1200),
        length=st.integers(min_value=0, max_value=1200),
    )
    def test_rangeInsideBody(self, size: int, first: int, length: int) -> None:
        """
        A satisfiable C{first-last} range always lies inside the body and
        starts at C{first}.
        """
        result = parse(b"bytes=%d-%d" % (first, first + length), size)
        if first >= size:
            self.assertIs(result, UNSATISFIABLE)
        else:
            self.assertEqual(result, (first, min(first + length, size - 1)))


class IfRangeTests(SynchronousTestCase):
    """
    L{ifRangeAllows}: the strong comparison for entity tags, an exact and
    strong C{Last-Modified} for dates.
    """

    def test_strongETagMatches(self) -> None:
        self.assertTrue(ifRangeAllows([b'"abc"'], b'"abc"', None, None))
        self.assertTrue(ifRangeAllows([b' "abc" '], b'"abc"', None, None))

    def test_otherETag(self) -> None:
        self.assertFalse(ifRangeAllows([b'"abd"'], b'"abc"', None, None))
        self.assertFalse(ifRangeAllows([b'"abc"'], None, LM, LATER))

    def test_weakETagsNeverMatch(self) -> None:
        """
        A weak tag on either side fails the strong comparison.
        """
        self.assertFalse(ifRangeAllows([b'W/"abc"'], b'W/"abc"', None, None))
        self.assertFalse(ifRangeAllows([b'"abc"'], b'W/"abc"', None, None))

    def test_dateMatchesStrongLastModified(self) -> None:
        """
        The exact C{Last-Modified}, one second or more before the stored
        C{Date}, allows the range.
        """
        self.assertTrue(ifRangeAllows([LM], None, LM, LATER))

    def test_dateWeakLastModified(self) -> None:
        """
        A C{Last-Modified} equal to C{Date}, or without a C{Date}, is a weak
        validator: no range.
        """
        self.assertFalse(ifRangeAllows([LM], None, LM, LM))
        self.assertFalse(ifRangeAllows([LM], None, LM, None))

    def test_otherDate(self) -> None:
        """
        A different date, even the same instant written differently, or an
        unparseable value, does not match.
        """
        self.assertFalse(ifRangeAllows([LATER], None, LM, LATER))
        self.assertFalse(ifRangeAllows([b"Monday, 01-Jan-24 00:00:00 GMT"], None, LM, LATER))
        self.assertFalse(ifRangeAllows([b"yesterday"], None, b"yesterday", LATER))
        self.assertFalse(ifRangeAllows([LM], b'"abc"', None, LATER))


class SeveralIfRangeTests(SynchronousTestCase):
    def test_severalIfRangeLines(self) -> None:
        """
        Several C{If-Range} lines, or none, never allow the range.
        """
        self.assertFalse(ifRangeAllows([b'"x"', b'"x"'], b'"x"', None, None))
        self.assertFalse(ifRangeAllows([], b'"x"', None, None))


class ContentRangeTests(SynchronousTestCase):
    def test_contentRange(self) -> None:
        self.assertEqual(contentRange(0, 1, 11), b"bytes 0-1/11")

    def test_unsatisfied(self) -> None:
        self.assertEqual(unsatisfiedRange(11), b"bytes */11")


class Collector:
    """
    A consumer that records writes and producer registrations.
    """

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.producers: list[Any] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producers.append(producer)

    def unregisterProducer(self) -> None:
        self.producers.append(None)


@implementer(ICachedObject)
class ChunkedObject:
    """
    An object without C{writeRangeTo} that writes its body in chunks and
    registers a producer, as a streaming store would.
    """

    meta = None

    def __init__(self, body: bytes, chunk: int) -> None:
        self.body = body
        self.size = len(body)
        self.chunk = chunk

    def writeTo(self, consumer: Any) -> Deferred[None]:
        consumer.registerProducer(self, True)
        for i in range(0, len(self.body), self.chunk):
            consumer.write(self.body[i : i + self.chunk])
        consumer.unregisterProducer()
        return succeed(None)


class WriteRangeTests(SynchronousTestCase):
    """
    L{writeRange} slices L{ICachedObject.writeTo} for objects that cannot
    read a range themselves.
    """

    @given(
        body=st.binary(min_size=1, max_size=60),
        chunk=st.integers(min_value=1, max_value=17),
        data=st.data(),
    )
    def test_fallbackSlices(self, body: bytes, chunk: int, data: Any) -> None:
        """
        Exactly the bytes of the range reach the consumer, whatever the
        chunking, and producers are registered with the real consumer.
        """
        offset = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
        length = data.draw(st.integers(min_value=1, max_value=len(body) - offset))
        obj = ChunkedObject(body, chunk)
        consumer = Collector()
        self.successResultOf(writeRange(obj, consumer, offset, length))
        self.assertEqual(b"".join(consumer.data), body[offset : offset + length])
        self.assertEqual(consumer.producers, [obj, None])

    def test_rangedObjectUsed(self) -> None:
        """
        An object providing C{IRangedCachedObject} is asked for the range
        itself.
        """
        from icpmesh.interfaces import IRangedCachedObject

        calls = []

        @implementer(IRangedCachedObject)
        class Ranged(ChunkedObject):
            def writeRangeTo(self, consumer: Any, offset: int, length: int) -> Deferred[None]:
                calls.append((offset, length))
                consumer.write(b"!")
                return succeed(None)

        consumer = Collector()
        self.successResultOf(writeRange(Ranged(b"abcdef", 2), consumer, 1, 3))
        self.assertEqual((calls, consumer.data), ([(1, 3)], [b"!"]))
