"""Pure-torch reference twins of the public ops (the test oracle and the CPU fallback)."""

from .ops import *  # noqa: F401,F403
from .ops import __all__  # noqa: F401
