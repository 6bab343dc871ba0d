"""Data sets: described without loading (for the API's feasibility check) and loaded as arrays (for
the workers). numpy and file readers, never torch."""

from models.data.sets import Dataset, InvalidData, describe, load, resolve_data_path

__all__ = ["Dataset", "InvalidData", "describe", "load", "resolve_data_path"]
