"""
icpmesh: a Twisted web cache mesh that speaks the Internet Cache Protocol.

A node is a caching HTTP forward proxy (L{icpmesh.proxy}) that asks its
neighbour caches over ICPv2 (L{icpmesh.icp}, L{icpmesh.protocol}) who already
holds an object.  Storage, access control and peer selection are plugins
(L{icpmesh.interfaces}); the node is started with C{twistd icpmesh} or embedded
with L{icpmesh.service.makeMeshService}.
"""

__version__ = "0.1.0"
