"""Errors that mean "the user asked for something that cannot be done", as opposed to bugs.

The ``vlmrl`` command prints these as one line (``vlmrl: error: ...``) instead of a traceback; their
messages say what to change.
"""

from __future__ import annotations


class VlmrlError(Exception):
    """Base of the errors the command line reports as one message."""


class ConfigError(VlmrlError, ValueError):
    """A configuration that cannot run (caught before any model loads wherever possible)."""


class RunDirectoryError(VlmrlError):
    """A run directory that is in use by another process or already holds another run."""
