"""localcoder.eval."""
