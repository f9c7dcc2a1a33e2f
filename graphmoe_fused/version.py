"""The package version, in a module of its own so that nothing inside the package has to import
the package ``__init__`` (and with it every submodule) to read it."""

__version__ = "0.1.0"
