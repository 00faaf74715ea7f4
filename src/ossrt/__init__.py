"""ossrt: the gpt-oss runtime."""

__version__ = "0.1.0"
