"""The exceptions the runtime raises and reports.

Hierarchy::

    SprocketError                 base: catch this to catch anything the runtime raises
    ├── ConfigurationError        bad settings or environment (the CLI exits with status 2)
    ├── JobError                  one job failed; its message becomes the job's ``info.error``
    │   ├── PayloadError          the payload is not a JSON object, or an input value is unusable
    │   ├── DownloadError         an input file could not be fetched (status, size, address)
    │   ├── UploadError           a FileOutput could not be uploaded (missing file, storage error)
    │   └── PredictionTimeout     predict did not finish before its deadline
    └── FatalError                the worker cannot go on (setup failed, rank died): exit non-zero
"""

from __future__ import annotations


class SprocketError(Exception):
    """Base of every exception raised by the sprocket runtime."""


class ConfigurationError(SprocketError):
    """The settings or environment are unusable."""


class JobError(SprocketError):
    """One job failed for a reason the user can act on; the worker carries on."""


class PayloadError(JobError):
    """The job's payload or one of its values is unusable."""


class DownloadError(JobError):
    """An input file could not be downloaded."""


class UploadError(JobError):
    """An output file could not be uploaded."""


class PredictionTimeout(JobError):
    """``predict()`` did not finish before its deadline."""


class FatalError(SprocketError):
    """The worker cannot continue; the process exits non-zero so the platform restarts it."""


def describe_exception(exc: BaseException) -> str:
    """``"<ExceptionType>: <message>"``: the form reported as ``info.error``."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
