"""``edge-fleet``: run the service and talk to it.

Two kinds of commands. Local ones work on a fleet's data directory (``--data-dir`` /
``EDGEFLEET_DATA_DIR``: its database, keys, repository and admin token), all through one
``Settings`` built once per call. Remote ones talk to a running fleet at ``--url`` with a
token from ``--token``, ``EDGEFLEET_TOKEN`` or, on the fleet's own host, the data
directory's admin token file; they say on stderr which fleet they talk to.

Heavy libraries (the ORM, the HTTP client, the runtimes) are imported inside the commands
that need them, so ``--help`` and remote commands start fast.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fleet.roles import Role

if TYPE_CHECKING:
    from fleet.settings import Settings

app = typer.Typer(help="edgefleet fleet service", no_args_is_help=True,
                  epilog="Example: edge-fleet serve --port 8000   (then: edge-fleet devices list)")
token_app = typer.Typer(help="API tokens", no_args_is_help=True)
devices_app = typer.Typer(help="devices", no_args_is_help=True)
keys_app = typer.Typer(help="signing keys (TUF roles and the desired-state director)",
                       no_args_is_help=True)
bundle_app = typer.Typer(help="model bundles", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(devices_app, name="devices")
app.add_typer(keys_app, name="keys")
app.add_typer(bundle_app, name="bundle")

console = Console()
err = Console(stderr=True, soft_wrap=True)  # an error is one line, whatever the width

UrlOption = Annotated[
    str, typer.Option("--url", envvar="EDGEFLEET_URL", help="the running fleet's API base URL")
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", envvar="EDGEFLEET_TOKEN", help="API token", show_default=False),
]


PortOption = Annotated[int, typer.Option(envvar="EDGEFLEET_PORT", help="API port")]
HostOption = Annotated[str, typer.Option(
    envvar="EDGEFLEET_HOST", help="API address (0.0.0.0: every interface)")]
BrokerOption = Annotated[
    str | None,
    typer.Option(envvar="EDGEFLEET_BROKER_URL",
                 help="mqtt://USER:PASSWORD@HOST:PORT; default: a local broker of its own"),
]
DataDirOption = Annotated[Path | None, typer.Option(
    envvar="EDGEFLEET_DATA_DIR", show_default=False,
    help="the fleet's data directory (database, keys, admin token) "
         "[default: ~/.local/share/edgefleet]")]
LogLevelOption = Annotated[str, typer.Option(
    envvar="EDGEFLEET_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR")]


def _settings(data_dir: Path | None, **overrides) -> Settings:
    """The one settings object of a command: environment, then the command's options."""
    from fleet.settings import Settings

    if data_dir is not None:
        overrides["data_dir"] = data_dir
    return Settings(**overrides)


def _show_version(value: bool) -> None:
    if value:
        from fleet import __version__

        print(f"edge-fleet {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_show_version, is_eager=True, help="print the version and exit",
    )] = False,
) -> None:
    """edgefleet fleet service"""


def _run_service(
    port: int,
    host: str,
    broker: str | None,
    data_dir: Path | None,
    log_level: str,
    local_agent_id: str | None = None,
) -> None:
    from fleet.data_dir import DataDirBusy
    from fleet.db import SchemaError
    from fleet.local_broker import BrokerNotFound
    from fleet.serve import ServeError
    from fleet.serve import serve as run_service
    from fleet.tokens import AdminTokenConflict

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = _settings(data_dir, port=port, host=host, broker_url=broker)
        run_service(
            settings,
            say=lambda line: console.print(line, highlight=False, soft_wrap=True),
            local_agent_id=local_agent_id,
        )
    except (BrokerNotFound, DataDirBusy, ServeError, AdminTokenConflict, SchemaError,
            ValueError) as exc:
        err.print(f"error: {exc}", highlight=False)
        raise typer.Exit(2) from None


@app.command(epilog="Example: edge-fleet serve --port 8000 --data-dir /var/lib/edgefleet")
def serve(
    port: PortOption = 8000,
    host: HostOption = "127.0.0.1",
    broker: BrokerOption = None,
    data_dir: DataDirOption = None,
    log_level: LogLevelOption = "INFO",
) -> None:
    """Run the fleet service: REST API, telemetry ingest and (by default) a local broker."""
    _run_service(port, host, broker, data_dir, log_level)


@app.command(epilog="Example: edge-fleet quickstart --data-dir /tmp/demo-fleet")
def quickstart(
    port: PortOption = 8000,
    host: HostOption = "127.0.0.1",
    broker: BrokerOption = None,
    data_dir: DataDirOption = None,
    log_level: LogLevelOption = "INFO",
    device_id: Annotated[str, typer.Option(help="id of the local agent")] = "local-agent",
) -> None:
    """Run the fleet with embedded defaults plus one local agent: a fleet in one command."""
    _run_service(port, host, broker, data_dir, log_level, local_agent_id=device_id)


def _local_engine(settings: Settings, migrate: bool = True):
    """The fleet's database, if this data directory holds a fleet: a mistyped
    ``--data-dir`` must not quietly become a new, empty fleet."""
    from fleet.db import SchemaError, init_db, make_engine

    if settings.database_url is None and not settings.data_dir.is_dir():
        raise _fail(f"no fleet in {settings.data_dir} (no such directory): start "
                    f"`edge-fleet serve --data-dir {settings.data_dir}` once, or check "
                    "--data-dir / EDGEFLEET_DATA_DIR")
    engine = make_engine(settings.resolved_database_url)
    if migrate:
        try:
            init_db(engine)
        except SchemaError as exc:
            raise _fail(str(exc)) from None
    return engine


@token_app.command("create", epilog="Example: edge-fleet token create --role viewer --name grafana")
def token_create(
    role: Annotated[Role, typer.Option(help="what the token may do")],
    name: Annotated[str, typer.Option(help="who or what uses it")] = "cli",
    data_dir: DataDirOption = None,
) -> None:
    """Create a token in the fleet's database and print it once (it is stored hashed)."""
    from sqlmodel import Session

    from fleet.audit import cli_actor
    from fleet.tokens import create_token

    with Session(_local_engine(_settings(data_dir))) as session:
        row, token = create_token(session, role=role, name=name, actor=cli_actor())
    err.print(f"created {row.role} token #{row.id} ({row.name}); it is shown only this once:")
    print(token)


@token_app.command("list", epilog="Example: edge-fleet token list")
def token_list(data_dir: DataDirOption = None) -> None:
    """List the fleet's tokens (never the tokens themselves: only their ids and names)."""
    from sqlmodel import Session

    from fleet.tokens import list_tokens

    table = Table("id", "name", "role", "created", "revoked")
    with Session(_local_engine(_settings(data_dir))) as session:
        for row in list_tokens(session):
            table.add_row(str(row.id), row.name, row.role, f"{row.created_at:%Y-%m-%d %H:%M}",
                          f"{row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "-")
    console.print(table)


@token_app.command("revoke", epilog="Example: edge-fleet token revoke 3")
def token_revoke(
    token_id: Annotated[int, typer.Argument(help="the token's id (edge-fleet token list)")],
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a token for good: the API refuses it from now on."""
    from sqlmodel import Session

    from fleet.audit import cli_actor
    from fleet.errors import NotFoundError
    from fleet.tokens import revoke_token

    try:
        with Session(_local_engine(_settings(data_dir))) as session:
            row = revoke_token(session, token_id, actor=cli_actor())
    except NotFoundError as exc:
        raise _fail(str(exc)) from None
    console.print(f"revoked token #{row.id} ({row.name}, {row.role})", highlight=False)


def _resolve_token(token: str | None) -> tuple[str, str]:
    """The token and where it came from."""
    if token:
        return token, "--token / EDGEFLEET_TOKEN"
    token_file = _settings(None).admin_token_file
    if token_file.exists():
        return token_file.read_text().strip(), f"admin token file {token_file}"
    err.print("error: no token: pass --token or set EDGEFLEET_TOKEN "
              f"(no admin token file at {token_file} either)")
    raise typer.Exit(2)


def _request(url: str, token: str | None, method: str, path: str, body=None) -> object:
    import httpx

    secret, source = _resolve_token(token)
    err.print(f"[dim]fleet {url} (token: {source})[/]", highlight=False)
    try:
        response = httpx.request(
            method,
            url.rstrip("/") + path,
            headers={"Authorization": f"Bearer {secret}"},
            json=body,
            timeout=30,
        )
    except httpx.HTTPError as exc:
        err.print(f"error: cannot reach the fleet at {url}: {exc}", highlight=False)
        raise typer.Exit(1) from None
    if response.status_code >= 400:
        err.print(f"error: {response.status_code} {_error_text(response)}", highlight=False)
        raise typer.Exit(1)
    return response.json() if response.content else None


def _error_text(response) -> str:
    """The API's error in one line: its message, or each schema problem with its place."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.reason_phrase
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', [])[1:])}: {item.get('msg')}"
            for item in detail if isinstance(item, dict)
        )
    return str(detail)


def _get(url: str, token: str | None, path: str) -> object:
    return _request(url, token, "GET", path)


@devices_app.command("list",
                     epilog="Example: edge-fleet devices list --selector 'site=berlin,ring!=lab'")
def devices_list(
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON")] = False,
    selector: Annotated[str | None, typer.Option(
        help="only devices whose labels/tags match: k=v, k!=v, k, !k, comma-separated",
    )] = None,
) -> None:
    """List devices with their online state, versions and last heartbeat."""
    from urllib.parse import quote

    from fleet.selectors import Selector, SelectorError

    query = ""
    if selector is not None:
        try:
            query = "?selector=" + quote(str(Selector.parse(selector)))
        except SelectorError as exc:
            raise _fail(str(exc)) from None
    rows = _get(url, token, "/api/v1/devices" + query)
    if as_json:
        console.print_json(data=rows)
        return
    table = Table("device", "online", "last seen", "agent", "model", "desired", "in sync",
                  "cpu %", "rss MB")
    for row in rows:  # type: ignore[union-attr]
        model = row["active_model"]
        desired = row.get("desired")
        beat = row["heartbeat"] or {}
        table.add_row(
            row["id"],
            "[green]yes[/]" if row["online"] else "[red]no[/]",
            row["last_seen"] or "-",
            row["agent_version"] or "-",
            f"{model['name']} v{model['version']}" if model else "-",
            _desired_label(desired),
            {True: "[green]yes[/]", False: "[yellow]no[/]"}.get(row.get("in_sync"), "-"),
            str(beat.get("cpu_percent", "-")),
            str(beat.get("rss_mb", "-")),
        )
    console.print(table)


def _desired_label(desired: dict | None) -> str:
    if not desired:
        return "-"
    what = f"{desired['bundle']} v{desired['version']}" if desired["bundle"] else "no model"
    return f"{what} (gen {desired['generation']})"


DeviceArgument = Annotated[str, typer.Argument(help="the device's id")]


@devices_app.command("show", epilog="Example: edge-fleet devices show cam-01")
def devices_show(
    device_id: DeviceArgument, url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None
) -> None:
    """Show one device as JSON: what it runs, what it was told, its last heartbeat."""
    console.print_json(data=_get(url, token, f"/api/v1/devices/{device_id}"))


@devices_app.command("events", epilog="Example: edge-fleet devices events cam-01 --limit 20")
def devices_events(
    device_id: DeviceArgument,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
    limit: Annotated[int, typer.Option(help="the newest N events", min=1, max=1000)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON")] = False,
) -> None:
    """The device's deployment steps and refusals, oldest first."""
    rows = _get(url, token, f"/api/v1/devices/{device_id}/events?limit={limit}")
    if as_json:
        console.print_json(data=rows)
        return
    table = Table("seq", "sent", "event", "detail")
    for row in rows:  # type: ignore[union-attr]
        detail = ", ".join(f"{k}={v}" for k, v in row["detail"].items())
        table.add_row(str(row["seq"]), row["sent_at"], row["event"], detail)
    console.print(table)


@devices_app.command("tag", epilog="Example: edge-fleet devices tag cam-01 site=berlin "
                                   "ring=canary --remove lab")
def devices_tag(
    device_id: DeviceArgument,
    tags: Annotated[list[str] | None, typer.Argument(help="KEY=VALUE tags to set")] = None,
    remove: Annotated[list[str] | None, typer.Option(
        "--remove", help="a tag key to remove (repeatable)")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Set or remove an operator's tags on a device (rollout selectors match them, over the
    labels the device reports itself)."""
    from fleet.selectors import SelectorError, parse_keys, parse_labels

    try:
        add = parse_labels(tags or [])
        removed = parse_keys(remove or [])
    except SelectorError as exc:
        raise _fail(str(exc)) from None
    if not add and not removed:
        raise _fail("nothing to do: give KEY=VALUE tags and/or --remove KEY")
    row = _request(url, token, "PATCH", f"/api/v1/devices/{device_id}/tags",
                   {"add": add, "remove": removed})
    shown = ", ".join(f"{k}={v}" for k, v in sorted(row["tags"].items())) or "none"  # type: ignore[index]
    console.print(f"{device_id}: tags {shown}", highlight=False)


def _duration_s(text: str) -> float:
    """'90s', '30m', '24h', '7d' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise _fail(f"--expires {text!r}: expected e.g. 90s, 30m, 24h or 7d") from None
    if value <= 0:
        raise _fail(f"--expires {text!r}: must be more than 0")
    return value


@devices_app.command("add", epilog="Example: edge-fleet devices add cam-01 --tag site=berlin")
def devices_add(
    device_id: DeviceArgument,
    tags: Annotated[list[str] | None, typer.Option(
        "--tag", help="KEY=VALUE tag to set on the device (repeatable)")] = None,
    expires: Annotated[str, typer.Option(
        help="how long the code stays valid: 90s, 30m, 24h, 7d (at most 30d)")] = "24h",
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Register a device and print its one-time enrollment code (it also names this
    fleet's root keys). Run the printed command on the device; the code works once. Adding
    a known device (re-flashed, replaced) gives it a new code."""
    from fleet.selectors import SelectorError, parse_labels

    try:
        parsed = parse_labels(tags or [])
    except SelectorError as exc:
        raise _fail(str(exc)) from None
    row = _request(url, token, "POST", "/api/v1/devices",
                   {"id": device_id, "tags": parsed, "expires_in_s": _duration_s(expires)})
    console.print(f"{row['device_id']}: enrollment code (valid until {row['expires_at']}, "  # type: ignore[index]
                  "once):", highlight=False)
    console.print(f"  {row['code']}", highlight=False)  # type: ignore[index]
    console.print("on the device, run:", highlight=False)
    console.print(f"  {row['command']}", highlight=False, soft_wrap=True)  # type: ignore[index]


@devices_app.command("revoke", epilog="Example: edge-fleet devices revoke cam-01")
def devices_revoke(
    device_id: DeviceArgument, url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None
) -> None:
    """Shut a device out: its broker account is removed (its connection is closed and it
    cannot connect again) and its unused codes are void. Its history stays; enrolling it
    again takes a new code (devices add)."""
    row = _request(url, token, "POST", f"/api/v1/devices/{device_id}/revoke")
    console.print(f"revoked {device_id}: {row['detail']}", highlight=False)  # type: ignore[index]


@devices_app.command("remove", epilog="Example: edge-fleet devices remove cam-01")
def devices_remove(
    device_id: DeviceArgument, url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None
) -> None:
    """Forget a device (its row, desired state, events, heartbeats). A device that still
    runs registers again with its next message: revoke its broker account to keep it out."""
    _request(url, token, "DELETE", f"/api/v1/devices/{device_id}")
    console.print(f"removed {device_id}", highlight=False)


def _repository(settings: Settings):
    from fleet.trust.repository import RepositoryConfigError, open_repository

    try:
        return open_repository(settings)
    except RepositoryConfigError as exc:  # EDGEFLEET_STORE_URL: its URL, the s3 extra
        raise _fail(str(exc)) from None


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"error: {message}", highlight=False)
    return typer.Exit(code)


@keys_app.command("init", epilog="Example: edge-fleet keys init --root-keys 3 --root-threshold 2")
def keys_init(
    root_keys: Annotated[int, typer.Option(help="number of root keys")] = 1,
    root_threshold: Annotated[int, typer.Option(help="root signatures required")] = 1,
    data_dir: DataDirOption = None,
) -> None:
    """Create root keys (to move offline) and online keys, and sign version 1 metadata."""
    from fleet.trust.repository import RepositoryConfigError

    repository = _repository(_settings(data_dir))
    try:
        repository.init(root_keys=root_keys, root_threshold=root_threshold)
    except RepositoryConfigError as exc:
        raise _fail(str(exc)) from None
    console.print(f"root keys:   {repository.keys_dir / 'root'}  <- move these offline")
    console.print(f"online keys: {repository.keys_dir / 'online'}")
    console.print(f"metadata:    {repository.metadata_dir}")


class KeyRole(enum.StrEnum):
    ROOT = "root"
    TARGETS = "targets"
    SNAPSHOT = "snapshot"
    TIMESTAMP = "timestamp"
    DIRECTOR = "director"


@keys_app.command("rotate",
                  epilog="Example: edge-fleet keys rotate targets --root-key-dir /media/usb/root")
def keys_rotate(
    role: Annotated[KeyRole, typer.Argument(help="the role whose key is replaced")],
    root_key_dir: Annotated[
        Path | None, typer.Option(help="where the (offline) root keys are mounted")
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Replace a role's key; root signs the change (root rotation: old and new root keys)."""
    from fleet.trust.repository import RepositoryConfigError

    try:
        version = _repository(_settings(data_dir)).rotate(role.value, root_key_dir)
    except RepositoryConfigError as exc:
        raise _fail(str(exc)) from None
    console.print(f"rotated {role.value}: root is now version {version}")


@bundle_app.command("build", epilog="Example: edge-fleet bundle build model.onnx --name detector "
                                     "--version 3 --baseline train.npy --out dist/\n\n"
                                     "Example: edge-fleet bundle build vad.onnx --name vad "
                                     "--version 1 --input-shape input=1,512 "
                                     "--input-value sr=16000")
def bundle_build(
    model: Annotated[Path, typer.Argument(help=".onnx or .tflite model file")],
    name: Annotated[str, typer.Option(help="bundle name")],
    version: Annotated[int, typer.Option(help="integer version, higher is newer")],
    baseline: Annotated[Path | None, typer.Option(
        help="training inputs: .npy (one input), .npz keyed by input name, or a folder of "
             ".npy files (one input); rows on axis 0. The model runs on them too, for its "
             "output baseline")] = None,
    drift_threshold: Annotated[list[str] | None, typer.Option(
        help="STAT=VALUE: this model's drift threshold (psi, js, wasserstein, missing), "
             "carried in the bundle; operators may override it (edge-fleet drift settings); "
             "repeatable")] = None,
    summary: Annotated[list[str] | None, typer.Option(
        help="NAME=KIND[:LAYOUT]: how drift summarises a tensor (values, image, audio, stats, "
             "classes, scores, none; an image may add :nchw, :nhwc or :gray); repeatable. "
             "Default: chosen by shape and dtype")] = None,
    samples: Annotated[
        Path | None, typer.Option(help="health-check inputs .npy/.npz (.npz keyed by input name)")
    ] = None,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(help="NAME=D1,D2,...: the shape of an input's health-check sample, for "
                          "its dynamic dims (repeatable; NAME= for a scalar)"),
    ] = None,
    input_value: Annotated[
        list[str] | None,
        typer.Option(help="NAME=NUMBER: fill an input's health-check sample with this value, "
                          "e.g. sr=16000 (repeatable)"),
    ] = None,
    max_samples_mb: Annotated[
        float, typer.Option(help="refuse health-check samples larger than this, compressed")
    ] = 8.0,
    out: Annotated[Path, typer.Option(help="directory to write the bundle into")] = Path("."),
    allow_nan: Annotated[bool, typer.Option(help="let requests carry NaN inputs")] = False,
) -> None:
    """Build a bundle: model + manifest + health-check samples + baseline histograms.

    Without --samples, the health-check inputs are made from the model's schema: give the
    sizes and values it cannot say with --input-shape and --input-value; what is guessed is
    named in a warning."""
    from fleet.baseline_build import parse_summary_hints
    from fleet.bundle_build import BuildError, build_bundle, parse_hints

    try:
        shapes, values = parse_hints(input_shape or (), input_value or ())
        built = build_bundle(
            model, name=name, version=version, out_dir=out, baseline=baseline, samples=samples,
            allow_nan=allow_nan, input_shapes=shapes, input_values=values,
            max_samples_bytes=int(max_samples_mb * 1024 * 1024),
            summaries=parse_summary_hints(summary or ()) or None,
            drift_thresholds=_drift_thresholds(drift_threshold or ()),
        )
    except (BuildError, ValueError) as exc:  # one line, however long: not wrapped by rich
        err.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for warning in built.warnings:
        err.print(f"warning: {warning}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"{built.path}  {built.size} bytes  sha256 {built.sha256}", highlight=False)


def _drift_thresholds(given: Sequence[str]) -> dict[str, float] | None:
    """``--drift-threshold psi=0.3``: ValueError naming a bad one."""
    thresholds: dict[str, float] = {}
    for item in given:
        stat, sep, value = item.partition("=")
        if not sep or stat not in ("psi", "js", "wasserstein", "missing"):
            raise ValueError(f"--drift-threshold {item!r}: expected psi|js|wasserstein|missing"
                             "=NUMBER")
        try:
            thresholds[stat] = float(value)
        except ValueError:
            raise ValueError(f"--drift-threshold {item!r}: {value!r} is not a number") from None
    return thresholds or None


@bundle_app.command("publish", epilog="Example: edge-fleet bundle publish dist/detector-3.bundle")
def bundle_publish(
    file: Annotated[Path, typer.Argument(help="a built bundle (edge-fleet bundle build)")],
    data_dir: DataDirOption = None,
) -> None:
    """Add a bundle to the signed repository (targets, snapshot and timestamp re-signed)."""
    from sqlmodel import Session

    from fleet.bundle_build import BuildError
    from fleet.registry import BundleExistsError, publish_bundle
    from fleet.trust.repository import RepositoryConfigError

    if file.is_dir():
        found = sorted(file.glob("*.bundle"))
        hint = f" (it holds {', '.join(p.name for p in found[:3])})" if found else ""
        raise _fail(f"{file} is a directory: give the .bundle file to publish{hint}")
    if not file.is_file():
        raise _fail(f"{file}: no such file")
    settings = _settings(data_dir)
    where = (f"fleet data directory {settings.data_dir}" if settings.store_dir is None else
             f"fleet store {settings.store_dir} (EDGEFLEET_STORE_DIR)")
    err.print(f"[dim]{where}[/]", highlight=False)
    repository = _repository(settings)
    if not repository.exists:
        raise _fail(f"no repository in {settings.repository_dir}: start `edge-fleet serve` "
                    "there once, or run `edge-fleet keys init` (both take --data-dir; a "
                    "shared store is EDGEFLEET_STORE_DIR)")
    try:
        with Session(_local_engine(settings)) as session:
            row = publish_bundle(session, repository, file)
    except (BuildError, BundleExistsError, RepositoryConfigError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"published {row.name} v{row.version} as {row.target_name} "
                  f"({row.size} bytes, sha256 {row.sha256[:16]}…)", highlight=False)


@bundle_app.command("list", epilog="Example: edge-fleet bundle list --json")
def bundle_list(
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON")] = False,
) -> None:
    """List published bundles."""
    rows = _get(url, token, "/api/v1/bundles")
    if as_json:
        console.print_json(data=rows)
        return
    table = Table("name", "version", "runtime", "size", "sha256", "published")
    for row in rows:  # type: ignore[union-attr]
        table.add_row(row["name"], str(row["version"]), row["runtime"], str(row["size"]),
                      row["sha256"][:16], row["published_at"])
    console.print(table)


@app.command(epilog="Example: edge-fleet deploy detector --version 3 --device cam-01 "
                     "--device cam-02")
def deploy(
    bundle: Annotated[str, typer.Argument(help="bundle name")],
    version: Annotated[int, typer.Option(help="bundle version")],
    device: Annotated[list[str], typer.Option("--device", help="device id (repeatable)")],
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
    allow_unknown: Annotated[bool, typer.Option(
        "--allow-unknown", help="also deploy to ids this fleet has never seen (pre-provision)",
    )] = False,
) -> None:
    """Assign a bundle to devices directly (signed desired state per device)."""
    result = _request(
        url, token, "POST", "/api/v1/deployments",
        {"bundle": bundle, "version": version, "devices": device,
         "allow_unknown": allow_unknown},
    )
    for device_id, generation in result["generations"].items():  # type: ignore[index]
        console.print(f"{device_id}: {bundle} v{version} (generation {generation})",
                      highlight=False)
    if not result.get("published", True):  # type: ignore[union-attr]
        err.print(f"warning: not published yet: {result.get('note')}",  # type: ignore[union-attr]
                  highlight=False)


audit_app = typer.Typer(help="the audit log: who did what, when and why (hash-chained)",
                        no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("list", epilog="Example: edge-fleet audit list --action token "
                                  "--since 2026-12-01T00:00:00Z --limit 20\n\n"
                                  "Example: edge-fleet audit list --subject bundle:detector "
                                  "--json")
def audit_list(
    action: Annotated[str | None, typer.Option(
        help="an action or its family, e.g. deploy, or token (token.create, token.revoke)",
        show_default=False)] = None,
    actor: Annotated[str | None, typer.Option(
        help="who: an actor or its prefix up to a colon, e.g. token:3, cli:alice, "
             "system:controller", show_default=False)] = None,
    subject: Annotated[str | None, typer.Option(
        help="what: a subject or its prefix up to a colon, e.g. device:cam-01, "
             "bundle:detector", show_default=False)] = None,
    since: Annotated[str | None, typer.Option(
        help="only entries at or after this ISO 8601 time (UTC if no offset), "
             "e.g. 2026-12-01T08:00:00Z", show_default=False)] = None,
    limit: Annotated[int, typer.Option(help="the newest N entries (shown oldest first)",
                                       min=1, max=1000)] = 100,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON")] = False,
) -> None:
    """List audit entries: operator actions and the fleet's automatic decisions."""
    from datetime import datetime
    from urllib.parse import urlencode

    if since is not None:
        try:
            datetime.fromisoformat(since)
        except ValueError:
            raise _fail(f"--since {since!r} is not an ISO 8601 time "
                        "(e.g. 2026-12-01T08:00:00Z)") from None
    query = {"action": action, "actor": actor, "subject": subject, "since": since,
             "limit": limit}
    rows = _get(url, token, "/api/v1/audit?" + urlencode(
        {key: value for key, value in query.items() if value is not None}))
    if as_json:
        console.print_json(data=rows)
        return
    table = Table("seq", "time", "actor", "action", "subject", "reason")
    for row in rows:  # type: ignore[union-attr]
        table.add_row(str(row["seq"]), row["at"], row["actor"], row["action"], row["subject"],
                      row["reason"])
    console.print(table, highlight=False)


@audit_app.command("verify", epilog="Example: edge-fleet audit verify --data-dir "
                                    "/var/lib/edgefleet\n\n"
                                    "Example: edge-fleet audit verify --expect 1200:3f9a0c1d2e4b")
def audit_verify(
    data_dir: DataDirOption = None,
    expect: Annotated[str | None, typer.Option(
        help="SEQ:HASH an earlier verify printed (kept outside the database): the entry "
             "must still have that hash (12 hex digits or more)", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Check the audit log's hash chain in the fleet's database: every edited, removed or
    reordered entry is named. Exit 0 if intact, 1 if not."""
    import json

    from sqlmodel import Session

    from fleet.audit import verify

    anchor = None
    if expect is not None:
        seq_text, _, digest = expect.partition(":")
        if not (seq_text.isdigit() and len(digest) >= 12
                and all(c in "0123456789abcdefABCDEF" for c in digest)):
            raise _fail(f"--expect {expect!r} is not SEQ:HASH (e.g. 1200:3f9a0c1d2e4b)")
        anchor = (int(seq_text), digest)
    with Session(_local_engine(_settings(data_dir))) as session:
        report = verify(session, expect=anchor)
    if as_json:
        print(json.dumps({"ok": report.ok, "entries": report.entries,
                          "head_seq": report.head_seq, "head_hash": report.head_hash,
                          "problems": [{"seq": p.seq, "problem": p.problem,
                                        "detail": p.detail} for p in report.problems]}))
    else:
        for problem in report.problems:
            print(f"{problem}")
    if report.problems:
        err.print(f"audit log NOT intact: {len(report.problems)} problem(s) in "
                  f"{report.entries} entries", highlight=False)
        raise typer.Exit(1)
    if not as_json:
        console.print(f"audit log intact: {report.entries} entries, head {report.head_seq} "
                      f"{report.head_hash}", highlight=False)


class OnFailure(enum.StrEnum):
    ROLLBACK_WAVE = "rollback-wave"
    ROLLBACK_ALL = "rollback-all"
    HALT = "halt"


rollout_app = typer.Typer(help="staged rollouts: waves, bake times, health gates",
                          no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")
RolloutArgument = Annotated[str, typer.Argument(help="the rollout's id (edge-fleet rollout list)")]


@rollout_app.command("create", epilog="Example: edge-fleet rollout create detector --version 4 "
                                      "--selector 'site=berlin' --waves 1,10%,100% --bake 600")
def rollout_create(
    bundle: Annotated[str, typer.Argument(help="bundle name")],
    version: Annotated[int, typer.Option(help="bundle version")],
    selector: Annotated[str | None, typer.Option(help="devices whose labels/tags match")] = None,
    device: Annotated[list[str] | None, typer.Option(
        "--device", help="a device id (repeatable), instead of --selector")] = None,
    waves: Annotated[str, typer.Option(help="cumulative wave sizes")] = "1,10%,50%,100%",
    bake: Annotated[float, typer.Option(help="seconds each wave bakes before the next")] = 300,
    max_failure_rate: Annotated[float, typer.Option(help="install failures a wave may have")]
    = 0.1,
    max_error_rate: Annotated[float, typer.Option(
        help="model errors per inference (client errors never count)")] = 0.01,
    max_latency_ratio: Annotated[float, typer.Option(
        help="p95 latency against the previous version on the same devices")] = 1.5,
    max_offline_rate: Annotated[float, typer.Option(
        help="share of a wave's devices gone offline or restarted since their install")]
    = 0.2,
    offline_grace: Annotated[float, typer.Option(
        help="seconds a device must be offline before the offline gate counts it")] = 60,
    min_devices: Annotated[int, typer.Option(
        help="devices with an outcome before a gate may judge a wave")] = 1,
    min_inferences: Annotated[int, typer.Option(
        help="inferences per device before its errors and latency count")] = 20,
    max_output_drift: Annotated[float | None, typer.Option(
        help="halt when the new version's outputs are further than this (median JS "
        "distance, 0-1) from the previous version's on the same devices; off by default")]
    = None,
    stuck_timeout: Annotated[float, typer.Option(
        help="seconds a notified device may make no progress before it is re-driven")] = 600,
    max_redrives: Annotated[int, typer.Option(
        help="re-drives of a silent device before it is reported stuck")] = 2,
    rate: Annotated[int | None, typer.Option(
        help="devices notified per minute at most (default: a whole wave at once)")] = None,
    on_failure: Annotated[OnFailure, typer.Option(
        help="on a failing gate: roll the wave's updated devices back, every device the "
        "rollout updated, or halt only")] = OnFailure.ROLLBACK_WAVE,
    paused: Annotated[bool, typer.Option(
        "--paused", help="create it paused: look at its waves (rollout status --devices), "
        "then rollout resume")] = False,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Start a staged rollout of a published bundle."""
    body = {"bundle": bundle, "version": version, "selector": selector,
            "devices": device or None, "waves": waves, "bake_s": bake,
            "max_install_failure_rate": max_failure_rate, "max_model_error_rate": max_error_rate,
            "max_latency_ratio": max_latency_ratio, "max_offline_rate": max_offline_rate,
            "offline_grace_s": offline_grace,
            "min_devices": min_devices, "min_inferences": min_inferences,
            "max_output_drift": max_output_drift,
            "stuck_timeout_s": stuck_timeout, "max_redrives": max_redrives,
            "notify_per_minute": rate,
            "roll_back_on_failure": on_failure is not OnFailure.HALT,
            "roll_back_scope": "all" if on_failure is OnFailure.ROLLBACK_ALL else "wave",
            "paused": paused}
    row = _request(url, token, "POST", "/api/v1/rollouts", body)
    _print_rollout(row)  # type: ignore[arg-type]


@rollout_app.command("list", epilog="Example: edge-fleet rollout list --json")
def rollout_list(
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON")] = False,
) -> None:
    """The newest rollouts and how far each has come."""
    rows = _get(url, token, "/api/v1/rollouts")
    if as_json:
        console.print_json(data=rows)
        return
    table = Table("id", "bundle", "status", "wave", "devices", "created by", "created")
    for row in rows:  # type: ignore[union-attr]
        table.add_row(row["id"], f"{row['bundle']} v{row['version']}", row["status"],
                      f"{row['wave']}/{len(row['waves'])}",
                      str(sum(w["devices"] for w in row["waves"])), row["created_by"],
                      row["created_at"])
    console.print(table)


@rollout_app.command("status", epilog="Example: edge-fleet rollout status 3f2a9c1d0b7e --watch")
def rollout_status(
    rollout_id: RolloutArgument,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON")] = False,
    watch: Annotated[bool, typer.Option(
        help="redraw in place every 2 s until the rollout ends (Ctrl-C stops)")] = False,
    devices: Annotated[bool, typer.Option(
        "--devices", help="also list each device: its wave, state and re-drives")] = False,
    state: Annotated[str | None, typer.Option(
        help="with --devices: only devices in this state (failed, stuck, ...)")] = None,
) -> None:
    """Each wave's device states and each gate's value against its threshold."""
    import time

    from rich.live import Live

    def fetch() -> tuple[dict, list[dict] | None]:
        row = _get(url, token, f"/api/v1/rollouts/{rollout_id}")
        listed = None
        if devices:
            listed = _get(url, token, f"/api/v1/rollouts/{rollout_id}/devices"
                          + (f"?state={state}" if state else ""))
        return row, listed  # type: ignore[return-value]

    row, listed = fetch()
    if as_json:
        console.print_json(data={**row, "devices": listed} if devices else row)
        return
    if not watch or row["status"] not in _ROLLOUT_LIVE:
        console.print(_rollout_view(row, listed))
        return
    with Live(_rollout_view(row, listed), console=console, auto_refresh=False) as live:
        while row["status"] in _ROLLOUT_LIVE:
            time.sleep(2)
            row, listed = fetch()
            live.update(_rollout_view(row, listed), refresh=True)


_ROLLOUT_LIVE = ("running", "paused", "awaiting_approval")


def _print_rollout(row: dict) -> None:
    console.print(_rollout_view(row, None))


def _rollout_view(row: dict, devices: list[dict] | None):
    """The rollout as the operator reads it: a headline, the waves, the gates, and (asked
    for) the devices."""
    from rich.console import Group
    from rich.text import Text

    headline = Text(f"rollout {row['id']}: {row['bundle']} v{row['version']} {row['status']}, "
                    f"wave {row['wave']} of {len(row['waves'])}"
                    + (f" ({row['reason']})" if row.get("reason") else ""))
    waves = Table("wave", "devices", "states")
    for wave in row["waves"]:
        waves.add_row(str(wave["wave"]), str(wave["devices"]),
                      ", ".join(f"{k} {v}" for k, v in sorted(wave["states"].items())))
    gates = Table("gate", "verdict", "value", "threshold", "devices", "detail")
    for gate in row["gates"]:
        value = "-" if gate["value"] is None else f"{gate['value']:.4g}"
        gates.add_row(gate["gate"], gate["verdict"], value, f"{gate['threshold']:g}",
                      str(gate["devices"]), gate["detail"])
    parts: list = [headline, waves, gates]
    if devices is not None:
        table = Table("device", "wave", "state", "re-drives", "previous", "notified")
        for each in devices:
            table.add_row(each["device_id"], str(each["wave"]), each["state"]
                          + (" (by itself)" if each["rolled_back_by_device"] else ""),
                          str(each["redrives"]), each["previous"] or "-",
                          (each["notified_at"] or "-")[:19])
        parts.append(table)
    return Group(*parts)


def _rollout_action(action: str, rollout_id: str, reason: str, url: str,
                    token: str | None) -> None:
    row = _request(url, token, "POST", f"/api/v1/rollouts/{rollout_id}/{action}",
                   {"reason": reason})
    console.print(f"rollout {rollout_id}: {row['status']}", highlight=False)  # type: ignore[index]


ReasonOption = Annotated[str, typer.Option(help="why, for the audit log")]


@rollout_app.command("pause", epilog="Example: edge-fleet rollout pause 3f2a9c1d0b7e")
def rollout_pause(rollout_id: RolloutArgument, reason: ReasonOption = "",
                  url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None) -> None:
    """Stop notifying devices; what was sent stays sent."""
    _rollout_action("pause", rollout_id, reason, url, token)


@rollout_app.command("resume", epilog="Example: edge-fleet rollout resume 3f2a9c1d0b7e")
def rollout_resume(rollout_id: RolloutArgument, reason: ReasonOption = "",
                   url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None) -> None:
    """Go on from where the rollout was paused."""
    _rollout_action("resume", rollout_id, reason, url, token)


@rollout_app.command("abort", epilog="Example: edge-fleet rollout abort 3f2a9c1d0b7e "
                                     "--reason 'wrong bundle'")
def rollout_abort(rollout_id: RolloutArgument, reason: ReasonOption = "",
                  url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None) -> None:
    """End the rollout for good (devices keep what they run; deploy to move them)."""
    _rollout_action("abort", rollout_id, reason, url, token)


@rollout_app.command("approve", epilog="Example: edge-fleet rollout approve 3f2a9c1d0b7e "
                                       "--token $SECOND_PERSONS_TOKEN")
def rollout_approve(rollout_id: RolloutArgument, url: UrlOption = "http://127.0.0.1:8000",
                    token: TokenOption = None) -> None:
    """Start a rollout that reaches a protected group (not with its creator's token)."""
    row = _request(url, token, "POST", f"/api/v1/rollouts/{rollout_id}/approve")
    console.print(f"rollout {rollout_id}: {row['status']}", highlight=False)  # type: ignore[index]


@rollout_app.command("protect", epilog="Example: edge-fleet rollout protect production "
                                       "--selector 'ring=prod'")
def rollout_protect(
    name: Annotated[str, typer.Argument(help="the group's name")],
    selector: Annotated[str, typer.Option(help="its devices (labels/tags)")],
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Protect a group (admin): a rollout reaching any of its devices waits for a second
    person's approval."""
    row = _request(url, token, "POST", "/api/v1/groups/protected",
                   {"name": name, "selector": selector})
    console.print(f"protected {row['name']}: {row['selector']}", highlight=False)  # type: ignore[index]



drift_app = typer.Typer(help="model drift: which devices drift, on which features, since when")
app.add_typer(drift_app, name="drift")

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_HOT_SEVERITY = 0.8  # a feature this close to its threshold is worth naming on a device
_FEATURE_COLUMNS = 8  # drift show: the features with the highest severity get a column
_SETTING_ROWS = ("psi", "js", "wasserstein", "missing", "clear_ratio", "min_rows",
                 "reduction", "weights")

SinceOption = Annotated[str | None, typer.Option(
    help="from this ISO 8601 time (UTC if no offset) or this long ago: 30m, 2h, 7d "
         "[default: 24 hours ago]", show_default=False)]


def _since_query(since: str | None) -> str | None:
    """``--since`` as the API takes it: an ISO time, a duration (2h) counted back from now."""
    from datetime import UTC, datetime, timedelta

    if since is None:
        return None
    text = since.strip()
    unit = _DURATION_UNITS.get(text[-1:].lower())
    if unit is not None:
        try:
            amount = float(text[:-1])
            if amount >= 0:  # NaN is not
                return (datetime.now(UTC) - timedelta(seconds=amount * unit)).isoformat()
        except (ValueError, OverflowError):  # not a number, or before the year 1
            pass
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise _fail(f"--since {since!r} is neither an ISO 8601 time "
                    "(e.g. 2026-12-01T08:00:00Z) nor a duration (30m, 2h, 7d)") from None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).isoformat()


def _short_time(value: str | None) -> str:
    """An API time as the tables show it: UTC to the minute."""
    from datetime import UTC, datetime

    if not value:
        return "-"
    at = datetime.fromisoformat(value)
    return f"{(at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC):%Y-%m-%d %H:%M}"


def _model_label(model: str, version: int | None) -> str:
    return model if version is None else f"{model} v{version}"


def _score_text(score: float | None) -> str:
    return "-" if score is None else f"{score:.2f}"


def _severity_cell(severity: float | None):
    """A feature's severity: red and marked ``!`` above 1 (it crosses its threshold), so
    the mark survives without colour."""
    from rich.text import Text

    if severity is None:
        return Text("-", style="dim")
    if severity > 1.0:
        return Text(f"{severity:.2f}!", style="bold red")
    return Text(f"{severity:.2f}")


def _crossing_text(item: dict):
    """What a device drifts on: its open alert's features (worst first), or else the
    latest window's features close to their threshold, dim."""
    from rich.text import Text

    alert = item.get("alert")
    if item["drifting"] and alert:
        names = alert["features"]
        shown = ", ".join(names[:5]) + (f" (+{len(names) - 5})" if len(names) > 5 else "")
        return Text(shown or "-")
    window = item.get("latest_window") or {}
    near = sorted(
        ((name, stats["severity"]) for name, stats in window.get("features", {}).items()
         if stats.get("severity") is not None and stats["severity"] > _HOT_SEVERITY),
        key=lambda pair: -pair[1])[:3]
    if not near:
        return Text("-", style="dim")
    return Text(", ".join(f"{name} {severity:.2f}" for name, severity in near), style="dim")


@drift_app.callback(invoke_without_command=True,
                    epilog="Example: edge-fleet drift --since 2h --model detector\n\n"
                           "Example: edge-fleet drift show cam-01 --since 7d\n\n"
                           "Example: edge-fleet drift settings detector --set psi=0.3")
def drift_fleet(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="only this model", show_default=False)]
    = None,
    since: SinceOption = None,
    all_devices: Annotated[bool, typer.Option(
        "--all", help="every device that sent a window, not only the drifting ones")] = False,
    limit: Annotated[int, typer.Option(help="the N most drifted devices", min=1, max=10_000)]
    = 100,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON")] = False,
) -> None:
    """The most drifted devices: their model, score, the features that cross and since
    when (with a subcommand: that instead)."""
    from urllib.parse import urlencode

    from rich.text import Text

    if ctx.invoked_subcommand is not None:
        return
    query = {"model": model, "since": _since_query(since),
             "all": "true" if all_devices else None, "limit": limit}
    view = _get(url, token, "/api/v1/drift?" + urlencode(
        {key: value for key, value in query.items() if value is not None}))
    if as_json:
        console.print_json(data=view)
        return
    rows: list[dict] = view["devices"]  # type: ignore[index]
    since_text = _short_time(view["since"])  # type: ignore[index]
    if not rows:
        what = "sent a drift window" if all_devices else "drifts"
        console.print(f"no device {what} since {since_text} UTC"
                      + (f" on model {model}" if model else ""), highlight=False, markup=False)
        return
    table = Table("device", "model", "state", "score", "features crossing", "since",
                  "last window", caption=f"since {since_text} UTC; times in UTC")
    for item in rows:
        alert = item.get("alert")
        if item["drifting"]:
            state = Text("DRIFTING", style="bold red")
        else:
            state = Text("ok (cleared)" if alert else "ok")
        window = item.get("latest_window") or {}
        table.add_row(
            Text(item["device_id"]), Text(_model_label(item["model"], item["version"])),
            state, _score_text(item["score"]), _crossing_text(item),
            _short_time(alert["raised_at"]) if item["drifting"] and alert else "-",
            _short_time(window.get("window_ended_at")),
        )
    console.print(table)


@drift_app.command("show", epilog="Example: edge-fleet drift show cam-01 --since 7d\n\n"
                                  "Example: edge-fleet drift show cam-01 --feature 'x[0]'")
def drift_show(
    device_id: DeviceArgument,
    since: SinceOption = None,
    feature: Annotated[str | None, typer.Option(
        help="only this feature's statistics", show_default=False)] = None,
    limit: Annotated[int, typer.Option(help="the newest N windows", min=1, max=5000)] = 50,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON")] = False,
) -> None:
    """A device's drift alerts, then its windows (newest first) with each feature's
    severity: its worst statistic over that statistic's threshold (above 1: it crosses)."""
    from urllib.parse import quote, urlencode

    from rich.text import Text

    query = {"since": _since_query(since), "feature": feature, "limit": limit}
    history = _get(url, token, f"/api/v1/devices/{quote(device_id, safe='')}/drift?"
                   + urlencode({k: v for k, v in query.items() if v is not None}))
    if as_json:
        console.print_json(data=history)
        return
    alerts: list[dict] = history["alerts"]  # type: ignore[index]
    windows: list[dict] = history["windows"]  # type: ignore[index]
    if alerts:
        table = Table("alert", "model", "state", "raised", "cleared", "score", "peak",
                      "features crossing", title=Text(f"{device_id}: drift alerts"))
        for alert in alerts:
            table.add_row(
                str(alert["id"]), Text(_model_label(alert["model"], alert["version"])),
                Text("open", style="bold red") if alert["state"] == "open" else "cleared",
                _short_time(alert["raised_at"]), _short_time(alert["cleared_at"]),
                _score_text(alert["score"]), _score_text(alert["peak_score"]),
                Text(", ".join(alert["features"]) or "-"))
        console.print(table)
    else:
        console.print(f"{device_id}: no drift alerts", highlight=False, markup=False)
    if not windows:
        console.print(f"{device_id}: no drift windows since "
                      f"{_short_time(query['since']) if since else '24 hours ago'}",
                      highlight=False, markup=False)
        return
    worst: dict[str, float] = {}
    for window in windows:
        for name, stats in window["features"].items():
            severity = stats.get("severity")
            worst[name] = max(worst.get(name, -1.0), -1.0 if severity is None else severity)
    shown = sorted(worst, key=lambda name: (-worst[name], name))[:_FEATURE_COLUMNS]
    hidden = len(worst) - len(shown)
    table = Table("window end", "model", "rows", "score",
                  title=Text(f"{device_id}: drift windows, newest first (severity per "
                             "feature)"),
                  caption="severity: worst statistic / its threshold; ! above 1 (crosses)")
    for name in shown:  # a Text header: a feature's name is never read as markup
        table.add_column(Text(name), justify="right")
    for window in windows:
        table.add_row(
            _short_time(window["window_ended_at"]),
            Text(_model_label(window["model"], window["version"])),
            "-" if window["rows"] is None else str(window["rows"]),
            _score_text(window["score"]),
            *(_severity_cell(window["features"].get(name, {}).get("severity"))
              for name in shown))
    console.print(table)
    if hidden:
        console.print(f"{hidden} more feature(s) hidden (the {len(shown)} with the highest "
                      "severity are shown; --feature NAME shows one)", highlight=False,
                      markup=False)


def _parse_drift_settings(entries: list[str]) -> dict:
    """``--set NAME=VALUE`` entries as the API's object: numbers parsed (an int stays an
    int, for min_rows), ``weight.FEATURE=N`` into ``weights``; the fleet judges the rest
    (unknown names, ranges), so its rules live in one place."""
    settings: dict = {}
    weights: dict[str, float | int | str] = {}
    for entry in entries:
        name, sep, text = entry.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name or not text:
            raise _fail(f"--set {entry!r} is not NAME=VALUE (e.g. psi=0.3, weight.x[0]=2)")
        value: float | int | str = text
        for parse in (int, float):
            try:
                value = parse(text)
                break
            except ValueError:
                pass
        if name.startswith("weight."):
            feature = name[len("weight."):]
            if not feature or feature in weights:
                raise _fail(f"--set {entry!r}: "
                            + ("no feature name after weight." if not feature
                               else f"the weight of {feature!r} is given twice"))
            weights[feature] = value
        elif name in settings or name == "weights":
            raise _fail(f"--set {entry!r}: " + (f"{name} is given twice" if name in settings
                                                 else "give weights as weight.FEATURE=N"))
        else:
            settings[name] = text if name == "reduction" else value
    if weights:
        settings["weights"] = weights
    return settings


def _settings_view(row: dict, version: int | None):
    from rich.text import Text

    def shown(value) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{k}={v:g}" if isinstance(v, int | float) else f"{k}={v}"
                             for k, v in sorted(value.items())) or "-"
        return f"{value:g}" if isinstance(value, float) else str(value)

    operator, in_force = row["operator"], row["in_force"]
    table = Table("setting", "in force", "operator",
                  title=Text(f"drift settings of {_model_label(row['model'], version)}"),
                  caption="-: not set by an operator")
    for name in (*_SETTING_ROWS, *sorted(set(in_force) - set(_SETTING_ROWS))):
        table.add_row(name, Text(shown(in_force.get(name, "-"))),
                      Text(shown(operator[name]) if name in operator else "-"))
    return table


@drift_app.command("settings", epilog="Example: edge-fleet drift settings detector "
                                      "--version 4\n\n"
                                      "Example: edge-fleet drift settings detector --set psi=0.3 "
                                      "--set reduction=mean --set 'weight.x[0]=2' "
                                      "--reason 'noisy sensor'\n\n"
                                      "Example: edge-fleet drift settings detector --reset")
def drift_settings(
    model: Annotated[str, typer.Argument(help="the model (bundle) name")],
    version: Annotated[int | None, typer.Option(
        help="include this bundle version's own thresholds in what is in force", min=1,
        show_default=False)] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="NAME=VALUE (repeatable): psi, js, wasserstein, missing, clear_ratio, "
        "min_rows, reduction (max or mean), weight.FEATURE; replaces every setting an "
        "operator made for the model", show_default=False)] = None,
    reset: Annotated[bool, typer.Option(
        "--reset", help="remove the operator's settings: back to the defaults")] = False,
    reason: Annotated[str | None, typer.Option(
        help="why, for the audit log", show_default=False)] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON")] = False,
) -> None:
    """Show a model's drift settings (in force, and what an operator set), or replace what
    an operator set with --set (all of it: settings not given go back to the defaults) or
    --reset."""
    from urllib.parse import quote, urlencode

    if set_ and reset:
        raise _fail("give --set or --reset, not both")
    path = f"/api/v1/drift/settings/{quote(model, safe='')}"
    if set_ or reset:
        body = {} if reset else _parse_drift_settings(set_ or [])
        row = _request(url, token, "PUT", path + (
            "?" + urlencode({"reason": reason}) if reason is not None else ""), body)
        if version is not None:  # the PUT answers without a bundle's own thresholds
            row = _get(url, token, f"{path}?version={version}")
        if not as_json:
            done = ("reset to the defaults" if reset else "operator settings replaced: "
                    + ", ".join(set_ or []))
            console.print(f"{model}: {done}", highlight=False, markup=False)
    else:
        row = _get(url, token, path + (f"?version={version}" if version is not None else ""))
    if as_json:
        console.print_json(data=row)
        return
    console.print(_settings_view(row, version))  # type: ignore[arg-type]


db_app = typer.Typer(help="the fleet database's schema (migrations)", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("current", epilog="Example: edge-fleet db current")
def db_current(data_dir: DataDirOption = None) -> None:
    """Print the database's schema revision beside this edge-fleet's newest. Exit code 1
    while a migration is pending (`edge-fleet db upgrade`, or the next start, applies it)."""
    from fleet.migrations import SchemaTooNewError, current_revision, head_revision, known_revisions

    engine = _local_engine(_settings(data_dir), migrate=False)
    try:
        found = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    if found is not None and found not in known_revisions():
        raise _fail(str(SchemaTooNewError(found, head)))
    state = "up to date" if found == head else "migration pending"
    console.print(f"{found or 'none'} (newest: {head}): {state}", highlight=False)
    if found != head:
        raise typer.Exit(1)


@db_app.command("upgrade", epilog="Example: EDGEFLEET_DATABASE_URL=postgresql://fleet@db/fleet "
                "edge-fleet db upgrade")
def db_upgrade(data_dir: DataDirOption = None) -> None:
    """Migrate the database's schema to this edge-fleet's newest revision, as a start of
    the fleet would (under the same lock: safe while other workers start)."""
    from fleet.migrations import SchemaError, upgrade

    engine = _local_engine(_settings(data_dir), migrate=False)
    try:
        done = upgrade(engine)
    except SchemaError as exc:
        raise _fail(str(exc)) from None
    finally:
        engine.dispose()
    if not done.changed:
        console.print(f"{done.after}: up to date", highlight=False)
        return
    if done.adopted:
        said = f"took over the database made before migrations: {done.after}"
    elif done.before is None:
        said = f"created the schema: {done.after}"
    else:
        said = f"migrated from {done.before} to {done.after}"
    console.print(said, highlight=False)


def main() -> None:
    os.environ.setdefault("COLUMNS", "120")
    app()


if __name__ == "__main__":
    main()
