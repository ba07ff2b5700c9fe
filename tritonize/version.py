"""tritonize's version, in a module of its own: the manifest, the templates and the export record it
without importing the package's Python API."""

__version__ = "0.1.0"
