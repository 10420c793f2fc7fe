"""The one base class of the errors a user can fix."""

from __future__ import annotations


class SipError(Exception):
    """A problem in what the user gave sip (manifest, files, tables, options), not a bug.

    The message must name the manifest key, the file or the row that is wrong, and the fix.
    The ``sip`` command prints it on one line as ``Error: <message>`` (no traceback) and exits
    with code 2. Subclasses keep a built-in base where callers catch one (``ValueError``,
    ``RuntimeError``), so ``class ManifestError(SipError, ValueError)``.
    """
