"""A fast, drop-in replacement for Flagsmith's Edge Proxy."""

__version__ = "0.1.0"
