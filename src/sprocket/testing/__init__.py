"""sprocket.testing: test a sprocket worker in-process, on Trio's mock clock.

``VirtualThreads`` with ``sleep``/``wait``/``Gate`` let a synchronous predict take virtual time.
"""

from ._threads import Gate, VirtualThreads, sleep, wait

__all__ = ["Gate", "VirtualThreads", "sleep", "wait"]
