"""
The examples the docs show actually work.
"""

from __future__ import annotations

import os

from twisted.application.service import IServiceCollection
from twisted.trial.unittest import SynchronousTestCase

from icpmesh.config import loadConfig
from icpmesh.plugins import resolvePlugins
from icpmesh.service import MeshService

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ExampleTests(SynchronousTestCase):
    """
    docs/examples and etc/.
    """

    def test_tacFile(self) -> None:
        """
        docs/examples/icpmesh.tac builds an application holding a node with
        the configured name and ports (nothing is started).
        """
        namespace: dict[str, object] = {}
        path = os.path.join(ROOT, "docs", "examples", "icpmesh.tac")
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), namespace)
        collection = IServiceCollection(namespace["application"])
        [node] = list(collection)
        self.assertIsInstance(node, MeshService)
        self.assertEqual(node.config.visibleHostname, "embedded-node")
        self.assertEqual((node.config.httpPort, node.config.icpPort), (3128, 3130))
        self.assertFalse(node.running)

    def test_exampleConfigParses(self) -> None:
        """
        etc/icpmesh.conf.example is a valid config, and everything it
        leaves commented out is valid too.
        """
        from twisted.internet.task import Clock

        path = os.path.join(ROOT, "etc", "icpmesh.conf.example")
        resolvePlugins(loadConfig(path), reactor=Clock())
        with open(path) as f:
            lines = f.read().splitlines()
        uncommented = []
        for line in lines:
            if line.startswith("#") and not line.startswith("# ") and line != "#":
                line = line[1:]
            uncommented.append(line)
        # Only one of each plugin line may be active.
        text = "\n".join(l for l in uncommented if not l.startswith("store disk"))
        out = self.mktemp()
        with open(out, "w") as f:
            f.write(text)
        resolvePlugins(loadConfig(out), reactor=Clock(), build=False)
