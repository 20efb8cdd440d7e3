"""``edge-agent``: the device command line.

argparse rather than typer: the agent's install stays small on the device.
Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.runtime import EngineOptions

__all__ = ["main"]


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/edgefleet-agent")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgefleet-agent"


def _default_device_id() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "device"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("EDGE_AGENT_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the agent daemon")
    run.add_argument(
        "--broker",
        default=os.environ.get("EDGE_AGENT_BROKER", "mqtt://127.0.0.1:1883"),
        help="mqtt://[user[:pass]@]HOST:PORT or mqtts://… (env EDGE_AGENT_BROKER)",
    )
    run.add_argument(
        "--device-id",
        default=os.environ.get("EDGE_AGENT_DEVICE_ID") or _default_device_id(),
        help="this device's id (default: the host name; env EDGE_AGENT_DEVICE_ID)",
    )
    state_dir_default = Path(os.environ.get("EDGE_AGENT_STATE_DIR") or _default_state_dir())
    run.add_argument(
        "--state-dir",
        type=Path,
        default=state_dir_default,
        help="where the agent keeps its state (env EDGE_AGENT_STATE_DIR)",
    )
    run.add_argument("--interval", type=float, default=10.0, help="heartbeat seconds")
    run.add_argument("--keepalive", type=int, default=15, help="MQTT keepalive seconds")
    run.add_argument("--fleet", help="fleet URL for bundles (default: the enrolled one)")
    run.add_argument("--max-bundle-mb", type=float, default=512.0,
                     help="refuse bundles larger than this (default 512)")
    run.add_argument("--listen", default=os.environ.get("EDGE_AGENT_LISTEN", "127.0.0.1:8470"),
                     help="local inference endpoint HOST:PORT, or 'off' (default 127.0.0.1:8470)")
    run.add_argument("--socket", type=Path, help="serve the endpoint on this Unix socket instead")
    run.add_argument("--max-request-mb", type=float, default=16.0,
                     help="largest inference request body (default 16)")
    run.add_argument("--outbox-mb", type=float, default=64.0,
                     help="disk budget for telemetry waiting for the broker (default 64)")
    run.add_argument(
        "--download-deadline", type=float,
        default=os.environ.get("EDGE_AGENT_DOWNLOAD_DEADLINE") or 300.0,
        help="seconds a bundle download may take, plus its signed length at "
        "--download-floor (default 300; env EDGE_AGENT_DOWNLOAD_DEADLINE)",
    )
    run.add_argument(
        "--download-floor", type=float,
        default=os.environ.get("EDGE_AGENT_DOWNLOAD_FLOOR") or 1024.0,
        help="slowest bundle download kept going, in bytes/s averaged over "
        "--download-window; 0 = no floor (default 1024; env EDGE_AGENT_DOWNLOAD_FLOOR)",
    )
    run.add_argument(
        "--download-window", type=float,
        default=os.environ.get("EDGE_AGENT_DOWNLOAD_WINDOW") or 60.0,
        help="seconds over which --download-floor is measured "
        "(default 60; env EDGE_AGENT_DOWNLOAD_WINDOW)",
    )
    _add_engine_arguments(run)

    enroll = commands.add_parser("enroll", help="pin the fleet's root of trust (once)")
    enroll.add_argument("--fleet", required=True, help="fleet URL, e.g. http://fleet:8000")
    enroll.add_argument("--state-dir", type=Path, default=state_dir_default)
    enroll.add_argument("--force", action="store_true", help="replace an existing enrollment")

    rollback = commands.add_parser(
        "rollback", help="switch back to the previous model (once; the fleet is told)"
    )
    rollback.add_argument("--state-dir", type=Path, default=state_dir_default)
    rollback.add_argument("--timeout", type=float, default=180.0,
                          help="seconds to wait for the running agent (default 180)")

    infer = commands.add_parser("infer", help="run a model on input data, print JSON outputs")
    infer.add_argument("model", type=Path, help="a .onnx or .tflite model file")
    infer.add_argument("--input", dest="input_path", type=Path, required=True,
                       help=".json (list, or {input: list}), .npy or .npz")
    _add_engine_arguments(infer)
    return parser


def _add_engine_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--provider", action="append", dest="providers",
        help="ONNX Runtime execution provider, in priority order (repeatable; default "
        "CPUExecutionProvider; env EDGE_AGENT_PROVIDERS, comma-separated)",
    )
    command.add_argument(  # a string default goes through type=int: a bad env var is usage
        "--threads", type=int, default=os.environ.get("EDGE_AGENT_THREADS") or None,
        help="cores one inference may use: ONNX Runtime intra-op threads, TFLite "
        "num_threads (default: the runtime's; env EDGE_AGENT_THREADS)",
    )


def _engine_options(
    args: argparse.Namespace, onnx_models: bool = True
) -> EngineOptions | None:
    """The device's engine options, or None after printing why they are wrong. Providers
    are checked against the installed onnxruntime only if ONNX models may be run."""
    from agent.runtime import EngineError, EngineOptions, check_providers

    from_env = [p.strip() for p in os.environ.get("EDGE_AGENT_PROVIDERS", "").split(",")]
    providers = args.providers or [name for name in from_env if name]
    try:
        options = EngineOptions(providers=tuple(providers) or None, threads=args.threads)
    except ValueError as exc:  # "threads must be at least 1, given 0"
        print(f"error: --{exc}", file=sys.stderr)
        return None
    try:
        if providers and onnx_models:
            check_providers(providers)
    except EngineError as exc:
        print(f"error: --provider: {exc}", file=sys.stderr)
        return None
    return options


def _run(args: argparse.Namespace) -> int:
    from agent.contract import is_valid_device_id
    from agent.daemon import AgentConfig, AgentDaemon
    from agent.mqtt import BrokerAddress
    from agent.slots import SlotsBusyError
    from agent.trust.download import DownloadLimits

    if not is_valid_device_id(args.device_id):
        print(
            f"error: --device-id {args.device_id!r}: use 1-64 letters, digits, '_', '.', '-'",
            file=sys.stderr,
        )
        return 2
    if args.interval <= 0:
        print("error: --interval must be greater than 0", file=sys.stderr)
        return 2
    try:
        broker = BrokerAddress.parse(args.broker)
    except ValueError as exc:
        print(f"error: --broker: {exc}", file=sys.stderr)
        return 2
    listen = None
    if args.listen != "off" and args.socket is None:
        host, _, port = args.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            print(f"error: --listen {args.listen!r}: expected HOST:PORT or 'off'",
                  file=sys.stderr)
            return 2
        listen = (host, int(port))
    engine = _engine_options(args)
    if engine is None:
        return 2
    try:
        download = DownloadLimits(
            deadline_s=args.download_deadline, floor_bps=args.download_floor,
            window_s=args.download_window,
        )
    except ValueError as exc:  # "download deadline must be greater than 0, given 0"
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        daemon = AgentDaemon(
            AgentConfig(
                broker=broker,
                device_id=args.device_id,
                state_dir=args.state_dir,
                interval_s=args.interval,
                keepalive_s=args.keepalive,
                fleet_url=args.fleet,
                max_bundle_bytes=int(args.max_bundle_mb * 1024 * 1024),
                listen=listen,
                socket_path=args.socket,
                max_request_bytes=int(args.max_request_mb * 1024 * 1024),
                outbox_bytes=int(args.outbox_mb * 1024 * 1024),
                engine=engine,
                download=download,
            )
        )
    except (OSError, SlotsBusyError) as exc:  # state dir not writable, port taken, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: daemon.stop())
    daemon.run()
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from agent.errors import TrustError
    from agent.state import AgentState
    from agent.trust.client import enroll

    state = AgentState(args.state_dir)
    try:
        if state.fleet_url and not args.force:
            print(f"error: already enrolled with {state.fleet_url} (use --force to replace)",
                  file=sys.stderr)
            return 2
        root = enroll(args.fleet, args.state_dir / "tuf")
        state.put("fleet_url", args.fleet.rstrip("/"))
    except TrustError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        state.close()
    keyids = ", ".join(k[:12] for k in root.roles["root"].keyids)
    print(f"enrolled with {args.fleet}: root v{root.version}, root keys {keyids}, "
          f"threshold {root.roles['root'].threshold}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    """Ask the running agent to roll back (it reports ``rolled_back`` to the fleet); with
    no agent running, roll back on disk under the slots' lock (reported at its start)."""
    from agent.control import NoDaemonError, request, socket_path

    path = socket_path(args.state_dir)
    try:
        reply = request(path, "rollback", timeout=args.timeout)
    except NoDaemonError:
        return _rollback_offline(args.state_dir)
    except (OSError, ValueError) as exc:  # a timeout, a daemon that died mid-way
        print(f"error: no answer from the agent on {path}: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"error: {reply.get('error', reply)}", file=sys.stderr)
        return 1
    print(f"rolled back to {_label(reply['to'])} from {_label(reply['from'])} "
          f"(slot {reply['slot']}); reported to the fleet")
    return 0


def _label(ref: dict) -> str:
    return f"{ref['name']} v{ref['version']}"


def _rollback_offline(state_dir: Path) -> int:
    from agent.contract import to_data
    from agent.errors import UpdateError
    from agent.installer import Installer
    from agent.reconciler import Reconciler
    from agent.state import AgentState

    installer = Installer(state_dir, lambda: None, lambda *a, **k: None, max_bundle_bytes=0)
    if not installer.slots.try_lock():
        print(f"error: an agent owns {state_dir} but does not answer on its control socket",
              file=sys.stderr)
        return 1
    state = AgentState(state_dir)
    try:
        reconciler = Reconciler(
            state, installer, emit=None, current=lambda: None,
            on_swap=lambda loaded: loaded.engine.close(),
        )
        record = reconciler.rollback()
    except UpdateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        state.close()
        installer.slots.unlock()
    print(f"rolled back to {_label(to_data(record.to_ref))} from "
          f"{_label(to_data(record.from_ref))} (slot {record.slot}); no agent is running: "
          "it reports this to the fleet when it starts")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "run":
        return _run(args)
    if args.command == "enroll":
        return _enroll(args)
    if args.command == "rollback":
        return _rollback(args)
    from agent.infer_cmd import infer_main

    engine = _engine_options(args, onnx_models=args.model.suffix.lower() != ".tflite")
    if engine is None:
        return 2
    return infer_main(args.model, args.input_path, engine)


if __name__ == "__main__":
    raise SystemExit(main())
