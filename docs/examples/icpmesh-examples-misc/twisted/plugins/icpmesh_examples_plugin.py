"""
Drop-in for the example icpmesh plugins (C{store fifo}, C{access subnets}).

Imports the plugin objects and nothing else; no C{__init__.py} in
C{twisted/} or C{twisted/plugins/}.
"""

from icpmesh_examples.fifostore import fifoStore
from icpmesh_examples.subnets import subnetAccess

__all__ = ["fifoStore", "subnetAccess"]
