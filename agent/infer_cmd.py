"""``edge-agent infer MODEL --input PATH``: run one model once and print its outputs as JSON.

A field tool for checking a model on a device before a rollout, so its failures must read
as one line, not a stack trace: a bad request or input file exits 2, a model or runtime
failure exits 1 (the agent CLI's convention). Everything goes through the same
:func:`agent.runtime.load_engine` / ``Engine.infer`` path as the daemon, input validation
included, so what this prints is what the daemon would compute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agent.runtime import EngineError, EngineOptions, InputError, load_engine
from agent.runtime.engine import InputData

__all__ = ["infer_main", "load_input_file", "run_infer"]

INPUT_SUFFIXES = (".json", ".npy", ".npz")


def run_infer(
    model_path: Path, input_path: Path, options: EngineOptions | None = None
) -> dict[str, Any]:
    """``{"model": str, "outputs": {name: nested list}, "shapes": {name: [dims]}}``.

    Raises :class:`InputError` for a bad request or input file, :class:`EngineError` for a
    model that cannot be loaded or run.
    """
    data = load_input_file(input_path)
    options = options or EngineOptions()
    with load_engine(model_path, **options.for_model(model_path)) as engine:
        outputs = engine.infer(_unwrap(data, {spec.name for spec in engine.inputs}))
    return {
        "model": str(model_path),
        "outputs": {name: value.tolist() for name, value in outputs.items()},
        "shapes": {name: list(value.shape) for name, value in outputs.items()},
    }


def infer_main(model_path: Path, input_path: Path, options: EngineOptions | None = None) -> int:
    """Print :func:`run_infer`'s result as JSON on stdout; on failure, one line on stderr."""
    if not model_path.is_file():  # a usage error (exit 2), not a runtime failure
        return _fail(InputError(f"model file {model_path}: not found"), 2)
    if options is not None and options.providers and model_path.suffix.lower() == ".tflite":
        print("note: --provider applies to ONNX models; ignored for a .tflite model",
              file=sys.stderr)
    try:
        result = run_infer(model_path, input_path, options)
    except InputError as exc:
        return _fail(exc, 2)
    except EngineError as exc:
        return _fail(exc, 1)
    print(json.dumps(result))
    return 0


def load_input_file(path: Path) -> InputData:
    """JSON (a nested list, an object of input name -> nested list, or either inside the
    endpoint's ``{"inputs": ...}``), ``.npy`` or ``.npz``.

    ``.npz`` maps names to arrays, except that a lone unnamed array (``np.savez(f, a)`` stores
    it as ``arr_0``) is passed positionally. Pickled arrays are never loaded.
    """
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise InputError(
            f"input file {path}: unsupported type {suffix or '(none)'}; "
            f"expected one of {', '.join(INPUT_SUFFIXES)}"
        )
    try:  # only reading here: InputError is a ValueError and must not be re-wrapped
        if suffix == ".json":
            text = path.read_text(encoding="utf-8")
        else:  # np.load goes by the file's magic, not its suffix: handle both results
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                return loaded
            with loaded:
                arrays = {name: loaded[name] for name in loaded.files}
    except FileNotFoundError as exc:
        raise InputError(f"input file {path}: not found") from exc
    except (OSError, ValueError, EOFError) as exc:  # includes UnicodeDecodeError, bad headers
        raise InputError(f"input file {path}: cannot read {suffix[1:]}: {exc}") from exc
    if suffix == ".json":
        return _parse_json(path, text)
    if list(arrays) == ["arr_0"]:
        return arrays["arr_0"]
    return arrays


def _parse_json(path: Path, text: str) -> InputData:
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or a number too long to convert
        raise InputError(f"input file {path}: invalid JSON: {exc}") from exc
    if isinstance(data, bool) or not isinstance(data, list | dict | int | float):
        raise InputError(
            f"input file {path}: expected a JSON array, or an object mapping input names "
            f"to arrays, given {type(data).__name__}"
        )
    return data


def _unwrap(data: InputData, input_names: set[str]) -> InputData:
    """The endpoint's request body ``{"inputs": ...}`` means what it means there, so a
    request saved from an application runs as is; unless the model has an input named
    ``inputs``, which then takes the object as a name -> array map like any other."""
    if isinstance(data, dict) and list(data) == ["inputs"] and "inputs" not in input_names:
        return data["inputs"]
    return data


def _fail(exc: Exception, code: int) -> int:
    message = " ".join(str(exc).split())  # backend messages can span lines; keep it one
    print(f"error: {message}", file=sys.stderr)
    return code
