"""
Test-only drop-in: a selector plugin found through twisted.plugin the way a
third-party one is.  Put on C{twisted.plugins.__path__} by the tests.
"""

from zope.interface import implementer

from icpmesh.interfaces import DIRECT, IPeerSelector, IPeerSelectorPlugin


@implementer(IPeerSelector)
class AlwaysDirect:
    def selectRoutes(self, request, neighbours, icp):
        return [DIRECT]


@implementer(IPeerSelectorPlugin)
class AlwaysDirectPlugin:
    name = "test-always-direct"
    description = "test plugin: always go to the origin"
    directives = ("test_direct_note",)

    def selectorFromConfig(self, section, reactor):
        section.checkOptions(())
        selector = AlwaysDirect()
        selector.notes = [d.args for d in section.directives]
        return selector


alwaysDirect = AlwaysDirectPlugin()
