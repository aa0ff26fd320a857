"""The library's version, in one place: the package metadata (pyproject.toml) and every manifest read it."""

__version__ = "0.1.0"
