"""Where the entry points used to live; kept so old imports and console scripts still work.

``turbo-node`` is cli/node.py, ``turbo-cluster`` cli/cluster.py, what they print cli/output.py.
"""

from .cluster import cluster_main  # noqa: F401
from .node import node_main, parse_bytes, parse_layers  # noqa: F401
