"""diffinspect: diffusion-based visual inspection for the factory line."""

__version__ = "0.1.0"


class DiffinspectError(Exception):
    """An error a user can act on: the CLI prints its message on one line and exits non-zero."""
