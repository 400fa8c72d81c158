"""sprocket: a Trio runtime for Sprocket workers on Together AI Dedicated Containers.

The public surface is exactly the names below; everything else lives in private modules.
"""

from ._api import AsyncSprocket, FileOutput, InputOutputProcessor, Sprocket
from ._info import emit_info
from ._main import run
from ._version import __version__

__all__ = [
    "AsyncSprocket",
    "FileOutput",
    "InputOutputProcessor",
    "Sprocket",
    "__version__",
    "emit_info",
    "run",
]
