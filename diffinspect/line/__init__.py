"""`inspect watch`: the frame pipeline, from a file event to a committed row (docs/ARCHITECTURE.md)."""
