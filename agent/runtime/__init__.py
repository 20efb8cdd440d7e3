"""Device-side inference engines behind one interface.

Backends are imported lazily: ``import agent.runtime`` never imports onnxruntime (or a TFLite
runtime), so the agent daemon starts on a device that lacks one, and a model only needs its
own backend. :func:`load_engine` picks the backend from the file suffix and turns a
missing backend into an :class:`EngineError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.runtime.engine import (
    Engine,
    EngineError,
    InputError,
    RejectedInputError,
    TensorSpec,
    prepare_inputs,
)
from agent.runtime.options import EngineOptions, check_providers

if TYPE_CHECKING:
    from agent.runtime.onnx_engine import OnnxEngine
    from agent.runtime.tflite_engine import TfliteEngine

__all__ = [
    "Engine",
    "EngineError",
    "EngineOptions",
    "InputError",
    "OnnxEngine",
    "RejectedInputError",
    "TensorSpec",
    "TfliteEngine",
    "check_providers",
    "load_engine",
    "prepare_inputs",
]

_ONNX_ONLY_OPTIONS = ("providers", "intra_op_threads", "inter_op_threads")


def load_engine(path: str | os.PathLike[str], **options: Any) -> Engine:
    """Load ``path`` with the engine for its suffix; ``options`` go to that engine's constructor.

    ``.onnx`` -> :class:`OnnxEngine` (``providers``, ``intra_op_threads``, ``inter_op_threads``).
    ``.tflite`` -> :class:`TfliteEngine` (``num_threads``). The ONNX-only options are refused
    for a ``.tflite`` model rather than mapped: ``providers`` has no TFLite counterpart, and
    ``num_threads`` is not quite either ORT thread count. Passing them as ``None`` is accepted,
    so one call site can load either kind.
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
        # Importing the module imports no runtime; TfliteEngine raises EngineError without one.
        from agent.runtime.tflite_engine import TfliteEngine

        if onnx_only := [name for name in _ONNX_ONLY_OPTIONS if options.get(name) is not None]:
            raise EngineError(
                f"{', '.join(onnx_only)}: ONNX Runtime option(s), not available for a .tflite "
                "model (TFLite runs on its CPU interpreter; use num_threads)"
            )
        tflite_options = {k: v for k, v in options.items() if k not in _ONNX_ONLY_OPTIONS}
        return TfliteEngine(path, **tflite_options)
    raise EngineError(
        f"unsupported model file {Path(path).name!r}: expected a .onnx or .tflite file"
    )


def __getattr__(name: str) -> Any:
    # PEP 562: `from agent.runtime import OnnxEngine` imports onnxruntime only when asked for.
    if name == "OnnxEngine":
        from agent.runtime.onnx_engine import OnnxEngine

        return OnnxEngine
    if name == "TfliteEngine":
        from agent.runtime.tflite_engine import TfliteEngine

        return TfliteEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
