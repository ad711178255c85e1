"""regflow-mm: Boltzmann generators for OpenMM."""
__version__ = "0.1.0"
