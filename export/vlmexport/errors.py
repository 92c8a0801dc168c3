"""User-facing export errors.

An ExportError is a problem with what the user asked for (bad model folder,
unsupported family, unwritable output). `python -m vlmexport.export` prints it as ONE line on
stderr and exits non-zero, without a traceback. Anything else is a bug and
keeps its traceback.
"""


class ExportError(Exception):
    """A problem with the user's input, reported as a single line."""
