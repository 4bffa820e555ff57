from localcoder.fim.formats import FORMATS, FimFormat, Snippet, detect_format, get_format

__all__ = ["FORMATS", "FimFormat", "Snippet", "detect_format", "get_format"]
