"""The ``tinycompress`` command line; ``tinycompress.cli:main`` is the console script.

The Typer app is ``tinycompress.cli.app.app`` (not re-exported here, so that
``tinycompress.cli.app`` stays the module).
"""

from tinycompress.cli.app import main

__all__ = ["main"]
