"""How this device runs models, whatever model the fleet sends next.

An operator sets these once per device (``edge-agent run --provider ... --threads N``); the
bundles that arrive later may be ONNX or TFLite. So the options are stated per device and
mapped per model here: ``threads`` is ONNX Runtime's intra-op thread count and the TFLite
interpreter's ``num_threads`` (the number of cores one inference may use, in both), and
``providers`` applies to ONNX models only, since TFLite has no execution providers.

Providers are checked against the installed onnxruntime when the options are made
(:func:`check_providers`), so a misspelt provider stops the agent at start-up with the list
of what is available, instead of failing every install later as an unhealthy model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.runtime.engine import EngineError

__all__ = ["EngineOptions", "check_providers"]


@dataclass(frozen=True)
class EngineOptions:
    """``None`` keeps each runtime's default (ONNX Runtime: CPU provider, all cores)."""

    providers: tuple[str, ...] | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, given {self.threads}")
        if self.providers is not None and not self.providers:
            raise ValueError("providers: give at least one, or None for the default")

    def for_model(self, model_file: str | Path) -> dict[str, Any]:
        """Keyword arguments for :func:`agent.runtime.load_engine` on ``model_file``."""
        if Path(model_file).suffix.lower() == ".tflite":
            return {} if self.threads is None else {"num_threads": self.threads}
        options: dict[str, Any] = {}
        if self.providers is not None:
            options["providers"] = list(self.providers)
        if self.threads is not None:
            options["intra_op_threads"] = self.threads
        return options


def check_providers(providers: Sequence[str]) -> None:
    """Raise :class:`EngineError` naming any provider this onnxruntime build lacks."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise EngineError(
            "execution providers are ONNX Runtime options, and onnxruntime is not installed"
        ) from exc
    available = onnxruntime.get_available_providers()
    if unknown := [name for name in providers if name not in available]:
        raise EngineError(
            f"execution provider(s) {unknown} not available in this onnxruntime build; "
            f"available: {available}"
        )
