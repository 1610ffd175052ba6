"""The OpenAI-compatible HTTP server over a Cluster (``turbo-cluster serve``); see docs/serving.md."""
