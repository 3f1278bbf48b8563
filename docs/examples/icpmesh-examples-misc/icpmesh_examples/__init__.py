"""
Example icpmesh plugins, each in its own module:

  - L{icpmesh_examples.fifostore}: a store plugin, C{store fifo};
  - L{icpmesh_examples.subnets}: an access-control plugin, C{access subnets}.

See C{docs/plugin-examples.md} in icpmesh.
"""

__version__ = "1.0"
