"""Errors only training raises: bad eval-outcome files and unusable datasets.

Both are :class:`~tierpick.classifier.errors.TierpickError` (a ``ValueError``): one message that
names the file or dataset and the problem.
"""

from __future__ import annotations

from tierpick.classifier.errors import TierpickError


class IngestError(TierpickError):
    """An input file cannot be read at all, or yields zero usable rows."""


class DatasetError(TierpickError):
    """A built dataset is unusable, or a dataset directory is missing or corrupt."""
