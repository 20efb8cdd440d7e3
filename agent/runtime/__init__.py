"""Device-side inference engines behind one interface.

Backends are imported lazily: ``import agent.runtime`` never imports onnxruntime (or, later,
the TFLite runtime), so the agent daemon starts on a device that lacks one, and a model only
needs its own backend. :func:`load_engine` picks the backend from the file suffix and turns a
missing backend into an :class:`EngineError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.runtime.engine import Engine, EngineError, InputError, TensorSpec, prepare_inputs

if TYPE_CHECKING:
    from agent.runtime.onnx_engine import OnnxEngine

__all__ = [
    "Engine",
    "EngineError",
    "InputError",
    "OnnxEngine",
    "TensorSpec",
    "load_engine",
    "prepare_inputs",
]


def load_engine(path: str | os.PathLike[str], **options: Any) -> Engine:
    """Load ``path`` with the engine for its suffix; ``options`` go to that engine's constructor.

    ``.onnx`` -> :class:`OnnxEngine` (``providers``, ``intra_op_threads``, ``inter_op_threads``).
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        try:
            from agent.runtime.onnx_engine import OnnxEngine
        except ImportError as exc:
            raise EngineError(
                "ONNX Runtime is not installed; install edgefleet[agent] to run .onnx models"
            ) from exc
        return OnnxEngine(path, **options)
    if suffix == ".tflite":
        raise EngineError("TFLite support is not implemented yet; only .onnx models can run")
    raise EngineError(
        f"unsupported model file {Path(path).name!r}: expected a .onnx or .tflite file"
    )


def __getattr__(name: str) -> Any:
    # PEP 562: `from agent.runtime import OnnxEngine` imports onnxruntime only when asked for.
    if name == "OnnxEngine":
        from agent.runtime.onnx_engine import OnnxEngine

        return OnnxEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
