"""``python -m turbocluster.runtime.cli.node serve ...``: the same as ``turbo-node``."""

import sys

from .main import node_main

if __name__ == "__main__":
    sys.exit(node_main())
