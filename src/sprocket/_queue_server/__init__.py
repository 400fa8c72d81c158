"""The local queue server: the managed queue's protocol on one machine, backed by SQLite.

Public pieces (imported by the CLI, the testing kit and the end-to-end tests):

- :class:`QueueStore`: synchronous, durable job store with an injectable clock.
- :class:`QueueService`: the async layer (offload strategy, long-poll wake-ups, lease reaper).
- :class:`FileStorage`: streamed, size-limited file storage with pre-signed upload URLs.
- :func:`create_app`: the QuartTrio app speaking the protocol.
- :func:`serve_queue`: hypercorn + reaper in a nursery, as ``sprocket queue serve`` runs it.
"""

from ._app import create_app
from ._serve import load_or_create_api_key, serve_queue
from ._service import (
    DEFAULT_CLAIM_TIMEOUT,
    Offload,
    QueueService,
    run_inline,
    thread_offload,
)
from ._storage import DEFAULT_MAX_UPLOAD_BYTES, FileStorage
from ._store import MAX_RETRIES, Job, JobConflict, JobNotFound, Metrics, QueueStore

__all__ = [
    "DEFAULT_CLAIM_TIMEOUT",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "MAX_RETRIES",
    "FileStorage",
    "Job",
    "JobConflict",
    "JobNotFound",
    "Metrics",
    "Offload",
    "QueueService",
    "QueueStore",
    "create_app",
    "load_or_create_api_key",
    "run_inline",
    "serve_queue",
    "thread_offload",
]
