"""``edge-fleet``: run the service and talk to it.

Commands that talk to a running fleet use ``--url`` and a token from ``--token``,
``EDGEFLEET_TOKEN`` or, on the fleet's own host, the admin token file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.table import Table

from fleet.models import Role
from fleet.settings import Settings

app = typer.Typer(help="edgefleet fleet service", no_args_is_help=True)
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
err = Console(stderr=True)

UrlOption = Annotated[
    str, typer.Option("--url", envvar="EDGEFLEET_URL", help="fleet API base URL")
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", envvar="EDGEFLEET_TOKEN", help="API token", show_default=False),
]


PortOption = Annotated[int, typer.Option(envvar="EDGEFLEET_PORT")]
HostOption = Annotated[str, typer.Option(envvar="EDGEFLEET_HOST")]
BrokerOption = Annotated[
    str | None,
    typer.Option(envvar="EDGEFLEET_BROKER_URL", help="mqtt://HOST:PORT; default: start one"),
]
DataDirOption = Annotated[Path | None, typer.Option(envvar="EDGEFLEET_DATA_DIR")]
LogLevelOption = Annotated[str, typer.Option(envvar="EDGEFLEET_LOG_LEVEL")]


def _run_service(
    port: int,
    host: str,
    broker: str | None,
    data_dir: Path | None,
    log_level: str,
    local_agent_id: str | None = None,
) -> None:
    from fleet.data_dir import DataDirBusy
    from fleet.local_broker import BrokerNotFound
    from fleet.serve import ServeError
    from fleet.serve import serve as run_service
    from fleet.tokens import AdminTokenConflict

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides: dict = {"port": port, "host": host, "broker_url": broker}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        settings = Settings(**overrides)
        run_service(
            settings,
            say=lambda line: console.print(line, highlight=False, soft_wrap=True),
            local_agent_id=local_agent_id,
        )
    except (BrokerNotFound, DataDirBusy, ServeError, AdminTokenConflict, ValueError) as exc:
        err.print(f"error: {exc}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def serve(
    port: PortOption = 8000,
    host: HostOption = "127.0.0.1",
    broker: BrokerOption = None,
    data_dir: DataDirOption = None,
    log_level: LogLevelOption = "INFO",
) -> None:
    """Run the fleet service: REST API, telemetry ingest and (by default) a local broker."""
    _run_service(port, host, broker, data_dir, log_level)


@app.command()
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


@token_app.command("create")
def token_create(
    role: Annotated[Role, typer.Option(help="what the token may do")],
    name: Annotated[str, typer.Option(help="who or what uses it")] = "cli",
) -> None:
    """Create a token in the fleet's database and print it once (it is stored hashed)."""
    from sqlmodel import Session

    from fleet.db import init_db, make_engine
    from fleet.tokens import create_token

    settings = Settings()
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    with Session(engine) as session:
        row, token = create_token(session, role=role, name=name)
    err.print(f"created {row.role} token #{row.id} ({row.name}); it is shown only this once:")
    print(token)


def _resolve_token(token: str | None) -> str:
    if token:
        return token
    token_file = Settings().admin_token_file
    if token_file.exists():
        return token_file.read_text().strip()
    err.print("error: no token: pass --token or set EDGEFLEET_TOKEN")
    raise typer.Exit(2)


def _request(url: str, token: str | None, method: str, path: str, body=None) -> object:
    try:
        response = httpx.request(
            method,
            url.rstrip("/") + path,
            headers={"Authorization": f"Bearer {_resolve_token(token)}"},
            json=body,
            timeout=30,
        )
    except httpx.HTTPError as exc:
        err.print(f"error: cannot reach the fleet at {url}: {exc}")
        raise typer.Exit(1) from None
    if response.status_code >= 400:
        detail = response.json().get("detail") if response.content else response.reason_phrase
        err.print(f"error: {response.status_code} {detail}")
        raise typer.Exit(1)
    return response.json()


def _get(url: str, token: str | None, path: str) -> object:
    return _request(url, token, "GET", path)


@devices_app.command("list")
def devices_list(
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON")] = False,
) -> None:
    """List devices with their online state, versions and last heartbeat."""
    rows = _get(url, token, "/api/v1/devices")
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


@devices_app.command("show")
def devices_show(
    device_id: str, url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None
) -> None:
    """Show one device as JSON."""
    console.print_json(data=_get(url, token, f"/api/v1/devices/{device_id}"))


def _repository():
    from fleet.trust.repository import FleetRepository

    return FleetRepository(Settings().data_dir)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"error: {message}", highlight=False)
    return typer.Exit(code)


@keys_app.command("init")
def keys_init(
    root_keys: Annotated[int, typer.Option(help="number of root keys")] = 1,
    root_threshold: Annotated[int, typer.Option(help="root signatures required")] = 1,
) -> None:
    """Create root keys (to move offline) and online keys, and sign version 1 metadata."""
    from fleet.trust.repository import RepositoryConfigError

    repository = _repository()
    try:
        repository.init(root_keys=root_keys, root_threshold=root_threshold)
    except RepositoryConfigError as exc:
        raise _fail(str(exc)) from None
    console.print(f"root keys:   {repository.keys_dir / 'root'}  <- move these offline")
    console.print(f"online keys: {repository.keys_dir / 'online'}")
    console.print(f"metadata:    {repository.metadata_dir}")


@keys_app.command("rotate")
def keys_rotate(
    role: Annotated[str, typer.Argument(help="root, targets, snapshot, timestamp or director")],
    root_key_dir: Annotated[
        Path | None, typer.Option(help="where the (offline) root keys are mounted")
    ] = None,
) -> None:
    """Replace a role's key; root signs the change (root rotation: old and new root keys)."""
    from fleet.trust.repository import RepositoryConfigError

    try:
        version = _repository().rotate(role, root_key_dir)
    except RepositoryConfigError as exc:
        raise _fail(str(exc)) from None
    console.print(f"rotated {role}: root is now version {version}")


@bundle_app.command("build")
def bundle_build(
    model: Annotated[Path, typer.Argument(help=".onnx or .tflite model file")],
    name: Annotated[str, typer.Option(help="bundle name")],
    version: Annotated[int, typer.Option(help="integer version, higher is newer")],
    baseline: Annotated[Path | None, typer.Option(help="training inputs .npy (rows, features)")]
    = None,
    samples: Annotated[Path | None, typer.Option(help="health-check inputs .npy/.npz")] = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("."),
    allow_nan: Annotated[bool, typer.Option(help="let requests carry NaN inputs")] = False,
) -> None:
    """Build a bundle: model + manifest + health-check samples + baseline histograms."""
    from fleet.bundle_build import BuildError, build_bundle

    try:
        built = build_bundle(
            model, name=name, version=version, out_dir=out, baseline=baseline, samples=samples,
            allow_nan=allow_nan,
        )
    except (BuildError, ValueError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"{built.path}  {built.size} bytes  sha256 {built.sha256}", highlight=False)


@bundle_app.command("publish")
def bundle_publish(file: Annotated[Path, typer.Argument(help="a built bundle")]) -> None:
    """Add a bundle to the signed repository (targets, snapshot and timestamp re-signed)."""
    from sqlmodel import Session

    from fleet.bundle_build import BuildError
    from fleet.db import init_db, make_engine
    from fleet.registry import BundleExistsError, publish_bundle
    from fleet.trust.repository import RepositoryConfigError

    if not file.is_file():
        raise _fail(f"{file}: no such file")
    engine = make_engine(Settings().resolved_database_url)
    init_db(engine)
    try:
        with Session(engine) as session:
            row = publish_bundle(session, _repository(), file)
    except (BuildError, BundleExistsError, RepositoryConfigError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"published {row.name} v{row.version} as {row.target_name} "
                  f"({row.size} bytes, sha256 {row.sha256[:16]}…)", highlight=False)


@bundle_app.command("list")
def bundle_list(url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None) -> None:
    """List published bundles."""
    table = Table("name", "version", "runtime", "size", "sha256", "published")
    for row in _get(url, token, "/api/v1/bundles"):  # type: ignore[union-attr]
        table.add_row(row["name"], str(row["version"]), row["runtime"], str(row["size"]),
                      row["sha256"][:16], row["published_at"])
    console.print(table)


@app.command()
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


def main() -> None:
    os.environ.setdefault("COLUMNS", "120")
    app()


if __name__ == "__main__":
    main()
