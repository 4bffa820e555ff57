"""localcoder.quantize."""
