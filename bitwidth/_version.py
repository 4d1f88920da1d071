"""The package version (a leaf: modules that need it import nothing else of the package).

>>> __version__.count(".")
2
"""

__version__ = "0.1.0"
