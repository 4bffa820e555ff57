"""localcoder: private, local fill-in-the-middle code completion."""

__version__ = "0.1.0"
