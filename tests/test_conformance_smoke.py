"""
The http-cache-tests harness (C{conformance/run.py}) works: it counts
results as the suite does, and it really routes the suite through a proxy.

The counting tests need nothing but Python.  The harness tests run a few
suite tests for real (Node, the suite's origin, an icpmesh node, all on
127.0.0.1) in a few seconds; they are skipped when Node or npm is missing,
unless C{CI} is set, where that is a failure.  The whole suite is run by
C{python conformance/run.py}, not here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import unittest
from types import ModuleType
from typing import Any, Optional

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SCRIPT = os.path.join(ROOT, "conformance", "run.py")


def loadRun() -> ModuleType:
    """
    Import C{conformance/run.py}, which is a script, not a package module.
    """
    name = "icpmesh_conformance_run"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, RUN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


run = loadRun()


def record(testId: str, kind: str = "required", result: Any = True,
           dependsOn: Optional[list[str]] = None) -> dict[str, Any]:
    """
    A test record as C{client.mjs} writes it.
    """
    return {"id": testId, "suite": "s", "name": testId, "kind": kind,
            "depends_on": dependsOn or [], "result": result}


def requireHarness() -> None:
    """
    Skip (or, under CI, fail) unless Node, npm and the pinned suite are
    available; install the suite with C{npm ci} if it is missing.
    """
    def unavailable(message: str) -> None:
        if os.environ.get("CI"):
            raise AssertionError(message + " (CI must provide it)")
        raise unittest.SkipTest(message)

    if not (shutil.which("node") and shutil.which("npm")):
        unavailable("node and npm are not installed")
    try:
        run.ensureSuite(timeout=240.0)
    except run.HarnessError as e:
        unavailable(f"http-cache-tests is not available: {e}")


class ClassifyTests(SynchronousTestCase):
    """
    L{run.classify} and L{run.summarise} count as the suite's
    C{determineTestResult} does.
    """

    def test_kinds(self) -> None:
        """
        A failed C{required} test is C{fail}, a failed C{optimal} test is
        C{optional_fail}, a failed C{check} test is C{no}; passes are
        C{pass}, C{pass} and C{yes}.
        """
        failed = ["Assertion", "Response 2 comes from cache"]
        tests = [
            record("r1"), record("r2", result=failed),
            record("o1", "optimal"), record("o2", "optimal", failed),
            record("c1", "check"), record("c2", "check", failed),
        ]
        self.assertEqual(
            run.classify(tests),
            {"r1": "pass", "r2": "fail", "o1": "pass", "o2": "optional_fail",
             "c1": "yes", "c2": "no"},
        )

    def test_setupAndRetry(self) -> None:
        """
        A C{Setup} error is C{setup_fail}, or C{retry} when its message is
        C{retry}; C{False} is a harness failure; a test that did not run is
        C{untested}.
        """
        tests = [
            record("a", result=["Setup", "Response 1 status is 502, not 200"]),
            record("b", "optimal", ["Setup", "retry"]),
            record("c", result=False),
            record("d", result=None),
        ]
        self.assertEqual(
            run.classify(tests),
            {"a": "setup_fail", "b": "retry", "c": "harness_fail", "d": "untested"},
        )

    def test_dependencies(self) -> None:
        """
        A test whose dependency did not pass (transitively) is
        C{dependency_fail} whatever its own result; a C{yes} dependency
        counts as passing; unknown dependencies are ignored.
        """
        failed = ["Assertion", "x"]
        tests = [
            record("base", result=failed),
            record("child", dependsOn=["base"]),
            record("grandchild", "optimal", dependsOn=["child"]),
            record("checked", "check"),
            record("afterCheck", result=failed, dependsOn=["checked", "elsewhere"]),
        ]
        self.assertEqual(
            run.classify(tests),
            {"base": "fail", "child": "dependency_fail", "grandchild": "dependency_fail",
             "checked": "yes", "afterCheck": "fail"},
        )

    def test_requiredFailures(self) -> None:
        """
        Every C{required} test whose own result is not C{true} is a
        required failure, with its display class and message: a failed
        assertion, a setup failure, or a failure under a failed dependency.
        A required test that passed its own checks under a failed
        dependency is not, and neither are optimal and check failures.
        """
        tests = [
            record("ok"),
            record("assert", result=["Assertion", "a"]),
            record("setup", result=["Setup", "b"]),
            record("dep", dependsOn=["assert"]),
            record("depFailed", result=["Assertion", "e"], dependsOn=["assert"]),
            record("optimal", "optimal", ["Assertion", "c"]),
            record("check", "check", ["Assertion", "d"]),
        ]
        summary = run.summarise("proxy", tests)
        self.assertEqual(
            summary.requiredFailures,
            (("assert", "fail", "Assertion: a"), ("setup", "setup_fail", "Setup: b"),
             ("depFailed", "dependency_fail", "Assertion: e")),
        )
        self.assertEqual((summary.passed, summary.failed, summary.total), (2, 5, 7))
        self.assertEqual(summary.classes, {"pass": 1, "fail": 1, "setup_fail": 1,
                                           "dependency_fail": 2, "optional_fail": 1, "no": 1})

    @given(st.lists(
        st.tuples(st.sampled_from(["required", "optimal", "check"]),
                  st.sampled_from([True, ["Assertion", "m"], ["Setup", "m"], ["FetchError", "m"]]),
                  st.booleans()),
        max_size=30,
    ))
    def test_countsAddUp(self, specs: list[tuple[str, Any, bool]]) -> None:
        """
        For any results, passed plus failed is the total, passed is the
        number of C{true} results, the required failures are exactly the
        required tests without C{true}, none of them is classed C{pass},
        and the class counts add up to the total.
        """
        tests = [
            record(f"t{i}", kind, result, [f"t{i - 1}"] if dep and i else None)
            for i, (kind, result, dep) in enumerate(specs)
        ]
        summary = run.summarise("proxy", tests)
        self.assertEqual(summary.passed + summary.failed, summary.total)
        self.assertEqual(summary.total, len(specs))
        self.assertEqual(summary.passed, sum(1 for _, result, _ in specs if result is True))
        failedIds = {testId for testId, _, _ in summary.requiredFailures}
        self.assertEqual(
            failedIds,
            {t["id"] for t in tests if t["kind"] == "required" and t["result"] is not True},
        )
        self.assertNotIn("pass", {cls for _, cls, _ in summary.requiredFailures})
        self.assertEqual(sum(summary.classes.values()), summary.total)

    def test_formatSummary(self) -> None:
        """
        The printed summary gives passed, failed, total and the number of
        required failures, and lists each required failure.
        """
        tests = [record("a"), record("b", result=["Assertion", "Response 2 comes from cache"]),
                 record("c", "optimal", ["Assertion", "m"])]
        text = run.formatSummary(run.summarise("icpmesh", tests))
        self.assertIn("icpmesh: 1 passed, 2 failed of 3; 1 required failures", text)
        self.assertIn("b: Assertion: Response 2 comes from cache", text)
        self.assertNotIn("c: Assertion", text)
        self.assertIn("c: Assertion: m", run.formatSummary(run.summarise("icpmesh", tests), verbose=True))


class HarnessTests(SynchronousTestCase):
    """
    A few of the suite's tests, run for real on loopback.
    """

    IDS = ("freshness-none", "freshness-max-age", "vary-match")

    def setUp(self) -> None:
        requireHarness()

    def test_directHasNoCache(self) -> None:
        """
        Straight to the origin, with no cache in between, the tests that
        need a cache fail ("does not come from cache") and the one that
        checks that an unmarked response is not reused says "yes": the
        harness's assertions can fail.
        """
        summary, report = run.measure("direct", None, self.mktemp(), ids=self.IDS, timeout=60.0)
        self.assertEqual(report["version"], run.SUITE_VERSION)
        self.assertEqual(summary.total, 3)
        self.assertEqual(summary.results["freshness-none"][:2], ("check", "yes"))
        for testId in ("freshness-max-age", "vary-match"):
            kind, cls, message = summary.results[testId]
            self.assertEqual(cls, "optional_fail")
            self.assertIn("does not come from cache", message)

    def test_throughIcpmesh(self) -> None:
        """
        Through an icpmesh node the same tests all pass, and the node's
        access log shows it answered the repeated requests from its cache
        (absolute URLs on the suite's origin).
        """
        workdir = self.mktemp()
        summary, report = run.measure("icpmesh", run.icpmeshProxy, workdir, ids=self.IDS,
                                      timeout=60.0)
        self.assertEqual(report["proxy"][:17], "http://127.0.0.1:")
        self.assertEqual({t: r[1] for t, r in summary.results.items()},
                         {"freshness-none": "yes", "freshness-max-age": "pass", "vary-match": "pass"})
        self.assertEqual((summary.passed, summary.requiredFailures), (3, ()))
        with open(os.path.join(workdir, "access.log")) as f:
            log = f.read()
        hits = [line for line in log.splitlines()
                if re.search(r"\bTCP_\w*HIT/200\b", line) and report["base"] + "/test/" in line]
        self.assertEqual(len(hits), 2, log)
