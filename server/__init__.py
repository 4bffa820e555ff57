"""localcoder.server."""
