"""The gRPC contract between coordinator and nodes."""
