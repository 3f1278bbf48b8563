"""
Drop-in for the C{lowest-rtt} icpmesh peer selector.

C{twisted.plugin} imports this module on every plugin scan, so it imports
the plugin object and nothing else.  There is no C{__init__.py} in
C{twisted/} or C{twisted/plugins/}: those packages belong to Twisted.
"""

from icpmesh_lowestrtt import lowestRTT

__all__ = ["lowestRTT"]
