"""onebasin: merge independently trained networks by permutation alignment, interpolation and REPAIR."""

__version__ = "0.1.0"
