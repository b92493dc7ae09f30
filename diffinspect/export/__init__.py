"""Export of a bundle's scoring graph for the edge runtimes (needs torch; imported lazily)."""

from diffinspect.export.api import export_bundle

__all__ = ["export_bundle"]
