"""The package version, in one place below every layer (the CLI reports it)."""

__version__ = "0.1.0"
