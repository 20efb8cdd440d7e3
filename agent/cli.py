"""``edge-agent``: the device command line.

argparse rather than typer: the agent's install stays small on the device, and
``--help``, ``--version`` and ``status`` import nothing heavy (no numpy, no runtime, no
TUF): each command imports what it needs when it runs.
Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad input, 141 the reader of the
output went away (``edge-agent infer ... | head``: quietly, as ``cat`` would).
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


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not one of {', '.join(_LOG_LEVELS)} (case does not matter)")
    return level


def _command(
    commands, name: str, common: argparse.ArgumentParser, summary: str, examples: str
) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=summary, description=summary, parents=[common],
        epilog="examples:\n" + examples.rstrip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _build_parser() -> argparse.ArgumentParser:
    from agent import __version__

    parser = argparse.ArgumentParser(
        prog="edge-agent", description=__doc__.splitlines()[0],
        epilog="examples:\n"
        "  edge-agent enroll --fleet http://fleet.lan:8000      # once per device\n"
        "  edge-agent run --device-id cam-01                   # the daemon\n"
        "  edge-agent status\n"
        "  edge-agent run --help                               # a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}",
                        help="print the version and exit")
    log_help = ("DEBUG, INFO, WARNING or ERROR (default INFO; env EDGE_AGENT_LOG_LEVEL); "
                "accepted before or after the command")
    parser.add_argument("--log-level", type=_log_level,
                        default=os.environ.get("EDGE_AGENT_LOG_LEVEL", "INFO"), help=log_help)
    # The same option after the command: SUPPRESS keeps the top-level value unless given.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", type=_log_level, default=argparse.SUPPRESS,
                        help=log_help)
    _add_config_option(parser, common)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    state_dir_default = Path(os.environ.get("EDGE_AGENT_STATE_DIR") or _default_state_dir())
    state_dir_help = (f"the agent's state directory (default {state_dir_default}; "
                      "env EDGE_AGENT_STATE_DIR)")

    run = _command(commands, "run", common, "run the agent daemon", """\
  edge-agent run --device-id cam-01 --state-dir /var/lib/edgefleet-agent
  edge-agent run --broker mqtt://cam-01:PASSWORD@fleet.lan:1883 --listen 0.0.0.0:8470""")
    run.add_argument(
        "--broker",
        help="mqtt://[user[:pass]@]HOST:PORT or mqtts://… (env EDGE_AGENT_BROKER; default: "
        "the broker the fleet named at enrollment, else mqtt://127.0.0.1:1883)",
    )
    run.add_argument(
        "--device-id",
        default=os.environ.get("EDGE_AGENT_DEVICE_ID"),
        help="this device's id (default: the id it enrolled as, else the host name; env "
        "EDGE_AGENT_DEVICE_ID)",
    )
    run.add_argument("--state-dir", type=Path, default=state_dir_default, help=state_dir_help)
    run.add_argument("--interval", type=float, default=10.0,
                     help="seconds between heartbeats (default 10)")
    run.add_argument("--drift-window", type=float, default=300.0,
                     help="seconds per drift window: the serving bundle's input and output "
                     "histograms are sent once per window (default 300)")
    run.add_argument("--keepalive", type=int, default=15,
                     help="MQTT keepalive seconds: how soon the fleet learns of a lost "
                     "device (default 15)")
    run.add_argument("--reconnect-jitter", choices=("on", "off"),
                     default=os.environ.get("EDGE_AGENT_RECONNECT_JITTER") or "on",
                     help="draw reconnect delays at random over their backoff window, so a "
                     "fleet does not reconnect in step after a broker restart (default on; "
                     "env EDGE_AGENT_RECONNECT_JITTER)")
    run.add_argument("--fleet", help="fleet URL for bundles (default: the enrolled one)")
    run.add_argument("--max-bundle-mb", type=float, default=512.0,
                     help="refuse bundles larger than this (default 512)")
    run.add_argument("--listen", default=os.environ.get("EDGE_AGENT_LISTEN", "127.0.0.1:8470"),
                     help="local inference endpoint HOST:PORT, or 'off' (default "
                     "127.0.0.1:8470; env EDGE_AGENT_LISTEN)")
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
    run.add_argument(
        "--max-download-kbps", type=float,
        default=os.environ.get("EDGE_AGENT_MAX_DOWNLOAD_KBPS") or 0.0,
        help="cap on the agent's own bundle download rate, in kilobits/s, leaving the "
        "rest of the link to the device's application; 0 = no cap "
        "(default 0; env EDGE_AGENT_MAX_DOWNLOAD_KBPS)",
    )
    run.add_argument(
        "--fleet-silence", type=float,
        default=os.environ.get("EDGE_AGENT_FLEET_SILENCE") or 60.0,
        help="seconds connected with nothing from a fleet before saying so (a WARNING when "
        "not enrolled; default 60; env EDGE_AGENT_FLEET_SILENCE)",
    )
    _add_label_argument(run)
    _add_engine_arguments(run)

    _add_simulate_command(commands, common, state_dir_default)

    enroll = _command(
        commands, "enroll", common,
        "join a fleet with a one-time code: pin its root, make this device's key pair, "
        "get its broker account (once per device)", """\
  edge-agent enroll --fleet http://fleet.lan:8000 --code EF1-… --state-dir /var/lib/edgefleet""")
    enroll.add_argument("--fleet", required=True, help="fleet URL, e.g. http://fleet:8000")
    enroll.add_argument("--code", help="the one-time code `edge-fleet devices add DEVICE` "
                        "printed (it also names the fleet's root keys)")
    enroll.add_argument("--trust-first-root", action="store_true",
                        help="no code: pin whatever root the URL serves, unchecked (a lab "
                        "only; no device key or broker account is made)")
    enroll.add_argument("--state-dir", type=Path, default=state_dir_default,
                        help=state_dir_help)
    enroll.add_argument("--force", action="store_true",
                        help="replace an existing enrollment (trusts the fleet's root anew)")

    _add_doctor_command(commands, common, state_dir_default, state_dir_help)

    status = _command(
        commands, "status", common,
        "show the fleet, device id, trust, active model, desired state and outbox "
        "(with or without a running agent)", """\
  edge-agent status --state-dir /var/lib/edgefleet-agent
  edge-agent status --json""")
    status.add_argument("--state-dir", type=Path, default=state_dir_default,
                        help=state_dir_help)
    status.add_argument("--json", action="store_true", help="print one JSON object instead")

    rollback = _command(
        commands, "rollback", common,
        "switch back to the previous model (once; the fleet is told)", """\
  edge-agent rollback --state-dir /var/lib/edgefleet-agent""")
    rollback.add_argument("--state-dir", type=Path, default=state_dir_default,
                          help=state_dir_help)
    rollback.add_argument("--timeout", type=float, default=180.0,
                          help="seconds to wait for the running agent (default 180)")

    infer = _command(
        commands, "infer", common, "run a model on input data, print JSON outputs", """\
  edge-agent infer model.onnx --input sample.json      # [[0.1, 0.2, 0.3, 0.4]]
  edge-agent infer model.onnx --input request.json     # {"inputs": {"x": [[...]]}}
  edge-agent infer model.tflite --input batch.npy --threads 2""")
    infer.add_argument("model", type=Path, help="a .onnx or .tflite model file")
    infer.add_argument("--input", dest="input_path", type=Path, required=True,
                       help=".json (a list, {input: list}, or the endpoint's "
                       "{\"inputs\": ...}), .npy or .npz")
    _add_engine_arguments(infer)
    return parser


def _add_label_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--label", action="append", dest="labels", metavar="KEY=VALUE",
        help="a label this device reports to its fleet, e.g. site=berlin (repeatable; "
        "default: env EDGE_AGENT_LABELS=site=berlin,ring=canary)",
    )


def _labels(args: argparse.Namespace) -> dict[str, str] | None:
    """The device's labels, or None after printing which one is wrong."""
    from agent.labels import LabelError, labels_from_env, parse_labels

    items = args.labels or labels_from_env(os.environ.get("EDGE_AGENT_LABELS"))
    source = "--label" if args.labels else "EDGE_AGENT_LABELS"
    try:
        return parse_labels(items)
    except LabelError as exc:
        print(f"error: {source}: {exc}", file=sys.stderr)
        return None


def _add_simulate_command(commands, common, state_dir_default: Path) -> None:
    from agent.simulate.options import add_arguments

    simulate = _command(
        commands, "simulate", common,
        "run many simulated devices in one process, on the agent's real code paths",
        "  edge-agent simulate --devices 50 --broker mqtt://127.0.0.1:1883 "
        "--fleet http://127.0.0.1:8000\n"
        "  edge-agent simulate --devices 500 --threads 1 --faults faults.json --label ring=sim\n"
        "  edge-agent simulate --devices 3 --brokers-file creds.json --fleet http://fleet:8000")
    add_arguments(simulate, state_dir_default)
    _add_label_argument(simulate)
    _add_engine_arguments(simulate)


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

    identity = _identity(args.state_dir)
    if identity is False:
        return 2
    if identity is not None:
        if args.device_id not in (None, identity.device_id):
            print(f"error: --device-id {args.device_id!r}: this state directory enrolled as "
                  f"{identity.device_id!r} (its broker account is that device's; enroll "
                  "again with --force to be another)", file=sys.stderr)
            return 2
        args.device_id = identity.device_id
        if args.fleet is None:
            args.fleet = identity.fleet_url
    elif args.device_id is None:
        args.device_id = _default_device_id()
    if not is_valid_device_id(args.device_id):
        print(
            f"error: --device-id {args.device_id!r}: use 1-64 letters, digits, '_', '.', '-'",
            file=sys.stderr,
        )
        return 2
    if args.interval <= 0:
        print("error: --interval must be greater than 0", file=sys.stderr)
        return 2
    broker_url, broker_source = _broker(args)
    try:
        broker = BrokerAddress.parse(broker_url)
    except ValueError as exc:
        print(f"error: {broker_source}: {exc}", file=sys.stderr)
        return 2
    if args.fleet_silence <= 0:
        print("error: --fleet-silence must be greater than 0", file=sys.stderr)
        return 2
    if not 0 < args.drift_window <= 86400:
        print("error: --drift-window must be in (0, 86400] seconds", file=sys.stderr)
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
    labels = _labels(args)
    if labels is None:
        return 2
    try:
        download = DownloadLimits(
            deadline_s=args.download_deadline, floor_bps=args.download_floor,
            window_s=args.download_window, max_rate_bps=args.max_download_kbps * 1000 / 8,
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
                reconnect_jitter=args.reconnect_jitter == "on",
                fleet_url=args.fleet,
                max_bundle_bytes=int(args.max_bundle_mb * 1024 * 1024),
                listen=listen,
                socket_path=args.socket,
                max_request_bytes=int(args.max_request_mb * 1024 * 1024),
                outbox_bytes=int(args.outbox_mb * 1024 * 1024),
                engine=engine,
                download=download,
                broker_source=broker_source,
                fleet_silence_s=args.fleet_silence,
                labels=labels,
                drift_window_s=args.drift_window,
            )
        )
    except (OSError, SlotsBusyError) as exc:  # state dir not writable, port taken, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: daemon.stop())
    daemon.run()
    return 0


def _broker(args: argparse.Namespace) -> tuple[str, str]:
    """The broker URL to use and where it came from: --broker, then EDGE_AGENT_BROKER,
    then what the fleet named at enrollment, then the local default."""
    from agent.daemon import DEFAULT_BROKER, DEFAULT_BROKER_SOURCE
    from agent.state import peek

    if args.broker:
        return args.broker, "--broker"
    if os.environ.get("EDGE_AGENT_BROKER"):
        return os.environ["EDGE_AGENT_BROKER"], "EDGE_AGENT_BROKER"
    identity = _identity(args.state_dir)
    if identity and identity.broker_url():
        account = f" as {identity.username}" if identity.username else ""
        return identity.broker_url(), f"given by {identity.fleet_url} at enrollment{account}"
    stored = peek(args.state_dir)
    if stored.get("broker_url"):
        return stored["broker_url"], f"named by {stored.get('fleet_url')} at enrollment"
    return DEFAULT_BROKER, DEFAULT_BROKER_SOURCE


def _enroll(args: argparse.Namespace) -> int:
    from agent.enroll_cmd import main

    return main(args)


def _identity(state_dir: Path):
    """The enrolled identity, None if there is none, False (after saying why) if it is
    unreadable."""
    from agent.identity import Identity

    try:
        return Identity.load(state_dir)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False


def _existing_state_dir(state_dir: Path) -> bool:
    """A command that reads or changes an agent's state refuses a directory that is not
    one (a typo must not become a new, empty agent); says why on stderr."""
    if not state_dir.is_dir():
        print(f"error: --state-dir {state_dir}: no such directory (check the path, or "
              "EDGE_AGENT_STATE_DIR; `edge-agent enroll` or `run` creates it)", file=sys.stderr)
        return False
    if not (state_dir / "agent.db").is_file():
        print(f"error: --state-dir {state_dir}: not an agent's state directory (no agent.db)",
              file=sys.stderr)
        return False
    return True


def _status(args: argparse.Namespace) -> int:
    import json

    from agent.status import collect, render

    if not _existing_state_dir(args.state_dir):
        return 2
    status = collect(args.state_dir)
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    """Ask the running agent to roll back (it reports ``rolled_back`` to the fleet); with
    no agent running, roll back on disk under the slots' lock (reported at its start)."""
    from agent.control import NoDaemonError, request, socket_path

    if not _existing_state_dir(args.state_dir):
        return 2
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


def _simulate(args: argparse.Namespace) -> int:
    from agent.simulate.options import run_from_args

    engine = _engine_options(args)
    if engine is None:
        return 2
    labels = _labels(args)
    if labels is None:
        return 2
    return run_from_args(args, engine, labels)


def _infer(args: argparse.Namespace) -> int:
    from agent.infer_cmd import infer_main

    engine = _engine_options(args, onnx_models=args.model.suffix.lower() != ".tflite")
    if engine is None:
        return 2
    return infer_main(args.model, args.input_path, engine)


def _add_config_option(parser: argparse.ArgumentParser,
                       common: argparse.ArgumentParser) -> None:
    from agent.config_file import CONFIG_ENV, DEFAULT_CONFIG

    config_help = (f"the agent's config file: run's options in an [agent] table (default: "
                   f"env {CONFIG_ENV}, else {DEFAULT_CONFIG} if it exists; 'none': no file); "
                   "the command line and the environment win over it")
    parser.add_argument("--config", type=Path, help=config_help)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=config_help)


def _with_config(
    parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace
) -> argparse.Namespace | None:
    """``args`` parsed again over the config file's values (agent.config_file), or None
    after saying why the file cannot be used. ``doctor`` goes on to report it."""
    from agent.config_file import ConfigError, load

    try:
        loaded = load(parser, args.config, os.environ)
    except ConfigError as exc:
        if args.command != "doctor":
            print(f"error: {exc}", file=sys.stderr)
            return None
        args.config_file, args.config_values, args.config_error = args.config, {}, str(exc)
        args.run_options = parser.parse_args(["run"])
        return args
    if loaded.warning:
        print(f"warning: {loaded.warning}", file=sys.stderr)
    if loaded.values:
        loaded.apply(parser, os.environ)
        args = parser.parse_args(argv)
        loaded.fill_lists(args, os.environ)
    args.config_file, args.config_values, args.config_error = loaded.path, loaded.values, None
    if args.command == "doctor":  # what the daemon would run with, for its checks
        args.run_options = parser.parse_args(["run"])
        loaded.fill_lists(args.run_options, os.environ)
    return args


def _add_doctor_command(commands, common: argparse.ArgumentParser, state_dir_default: Path,
                        state_dir_help: str) -> None:
    doctor = _command(
        commands, "doctor", common,
        "check this device's install: config, state dir, enrollment, trust, broker, slots, "
        "runtime, endpoint (exit 0: all pass)", """\
  edge-agent doctor                           # the state dir /etc/edgefleet/agent.toml names
  edge-agent doctor --state-dir /var/lib/edgefleet --json
  edge-agent --config /etc/edgefleet/agent.toml doctor""")
    doctor.add_argument("--state-dir", type=Path, default=state_dir_default, help=state_dir_help)
    doctor.add_argument("--json", action="store_true", help="print one JSON object instead")
    doctor.add_argument("--timeout", type=float, default=10.0,
                        help="seconds each network check may take (default 10)")


def _doctor(args: argparse.Namespace) -> int:
    from agent.doctor import DoctorInput, diagnose, render

    report = diagnose(DoctorInput.from_args(args, os.environ))
    print(report.to_json() if args.json else render(report))
    return 0 if report.ok else 1


_COMMANDS = {"run": _run, "enroll": _enroll, "status": _status, "rollback": _rollback,
             "infer": _infer, "simulate": _simulate, "doctor": _doctor}
SIGPIPE_EXIT = 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = _with_config(parser, argv, parser.parse_args(argv))
    if args is None:
        return 2
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code = _COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:
        # `edge-agent infer ... | head`: the reader has what it wanted. No traceback, and
        # no second error when Python flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return SIGPIPE_EXIT
    return code


if __name__ == "__main__":
    raise SystemExit(main())
