"""Command-line entry points; thin wrappers over the library."""

import argparse


def node_main(argv=None):
    parser = argparse.ArgumentParser(prog="turbo-node", description="Serve a share of a model's layers over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve layers (not implemented yet)")
    parser.parse_args(argv)
    parser.error("turbo-node serve is not implemented yet")


def cluster_main(argv=None):
    parser = argparse.ArgumentParser(prog="turbo-cluster", description="Generate text over a cluster of turbo-nodes.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("generate", help="generate text (not implemented yet)")
    parser.parse_args(argv)
    parser.error("turbo-cluster generate is not implemented yet")
