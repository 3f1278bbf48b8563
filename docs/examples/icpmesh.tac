# Run an icpmesh node inside your own Twisted application:
#     twistd -ny docs/examples/icpmesh.tac
# The node is an ordinary IService: add your own services beside it.
from twisted.application import service

from icpmesh.config import parseConfig
from icpmesh.service import makeMeshService

CONFIG = """
http_port 127.0.0.1:3128
icp_port 127.0.0.1:3130
visible_hostname embedded-node
"""

application = service.Application("my-app-with-a-cache")
mesh = makeMeshService(parseConfig(CONFIG, "icpmesh.tac"))
mesh.setServiceParent(application)
