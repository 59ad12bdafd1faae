"""The version of influencekit (one place, read by the package, saved state and stores)."""

__version__ = "0.1.0"
