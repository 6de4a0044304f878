"""kakuremichi: shared command-line, configuration and logging helpers."""

__version__ = "0.1.0"
