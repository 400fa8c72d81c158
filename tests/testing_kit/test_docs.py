"""The test examples of docs/testing.md run as written (a user copies them verbatim)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from trio.testing import MockClock

from sprocket.testing import FakeQueue

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
BLOCKS = [
    block
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    if "async def test_" in block
]


def test_the_guide_has_examples() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
async def test_doc_example(
    index: int, fake_queue: FakeQueue, sprocket_worker: Any, autojump_clock: MockClock
) -> None:
    namespace: dict[str, Any] = {"__name__": f"docs_testing_{index}"}
    exec(compile(BLOCKS[index], f"docs/testing.md#example{index}", "exec"), namespace)
    (test,) = [v for k, v in namespace.items() if k.startswith("test_")]
    await test(fake_queue, sprocket_worker, autojump_clock)
