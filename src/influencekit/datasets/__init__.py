"""Data that ships with the dependencies or is generated, and loaders for the paper's real files.

Nothing here downloads anything: bundled sets come from scikit-learn, generated sets from a seed,
and the paper's original data (MNIST IDX files, ...) from a path the user gives.
"""

from .images import Split, digits, mnist, read_idx

__all__ = ["Split", "digits", "mnist", "read_idx"]
