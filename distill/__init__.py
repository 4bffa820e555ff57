"""localcoder.distill."""
