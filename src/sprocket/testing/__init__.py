"""sprocket.testing: test a sprocket worker in-process, on Trio's mock clock.

- ``FakeQueue``: the managed queue in memory (the local queue server's own logic), served
  through an in-process transport, recording every request and job history, with injectable
  faults and "external" files.
- ``run_worker``: the real runtime in queue mode against a ``FakeQueue``; yields a
  ``WorkerHandle`` (``sigterm()``, ``wait_exit()``, state, ordered events).
- ``VirtualThreads`` with ``sleep``/``wait``/``Gate``: a synchronous predict takes virtual
  time only where the test says so; ``patch_time_sleep`` makes its ``time.sleep`` virtual.
- A pytest plugin (fixtures ``fake_queue``, ``sprocket_worker``, ``virtual_sleep``).

See docs/testing.md.
"""

from .._events import Event
from .._lifecycle import State
from ._fake_queue import FakeQueue
from ._faults import Fault
from ._harness import WorkerHandle, run_worker
from ._history import Transition
from ._records import ENDPOINTS, Endpoint, RecordedRequest
from ._sleep import patch_time_sleep
from ._threads import Gate, VirtualThreads, sleep, wait

__all__ = [
    "ENDPOINTS",
    "Endpoint",
    "Event",
    "FakeQueue",
    "Fault",
    "Gate",
    "RecordedRequest",
    "State",
    "Transition",
    "VirtualThreads",
    "WorkerHandle",
    "patch_time_sleep",
    "run_worker",
    "sleep",
    "wait",
]
