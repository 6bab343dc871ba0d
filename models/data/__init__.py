"""Data sets: described without loading (for the API's feasibility check) and loaded as arrays (for
the workers). numpy and file readers, never torch."""

from models.data.roots import RESERVED_TEAM_NAMES, SHARED_FOLDER, DataRoot, InvalidData, data_root_for
from models.data.sets import Dataset, describe, load

__all__ = ["RESERVED_TEAM_NAMES", "SHARED_FOLDER", "DataRoot", "Dataset", "InvalidData", "data_root_for", "describe", "load"]
