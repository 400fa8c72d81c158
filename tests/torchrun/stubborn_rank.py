"""A rank that never connects and ignores SIGTERM: only SIGKILL stops it."""

import signal
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(3600)
