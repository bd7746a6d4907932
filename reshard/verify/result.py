"""What one verification tier found: the value every tier returns and the reports print."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LEVELS = ("hashes", "weights", "generate")


@dataclass
class LevelResult:
    level: str
    passed: bool | None  # None: skipped, or checked by another process (elsewhere)
    detail: str = ""
    failures: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    elsewhere: bool = False  # under torchrun: another rank runs this tier

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "detail": self.detail, "failures": self.failures}
