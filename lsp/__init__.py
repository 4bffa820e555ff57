"""localcoder.lsp."""
