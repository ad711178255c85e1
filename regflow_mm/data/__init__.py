"""MD datasets: simulate with OpenMM into HDF5, load with splits and the system."""
from .dataset import Dataset, time_block_splits, dihedrals, load_dataset, read_metadata
from .simulate import export_trajectory, simulate

__all__ = ["Dataset", "time_block_splits", "dihedrals", "load_dataset", "read_metadata", "simulate",
           "export_trajectory"]
