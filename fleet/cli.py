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
app.add_typer(token_app, name="token")
app.add_typer(devices_app, name="devices")

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
    from fleet.local_broker import BrokerNotFound
    from fleet.serve import serve as run_service

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
    except (BrokerNotFound, ValueError) as exc:
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


def _get(url: str, token: str | None, path: str) -> object:
    try:
        response = httpx.get(
            url.rstrip("/") + path,
            headers={"Authorization": f"Bearer {_resolve_token(token)}"},
            timeout=10,
        )
    except httpx.HTTPError as exc:
        err.print(f"error: cannot reach the fleet at {url}: {exc}")
        raise typer.Exit(1) from None
    if response.status_code >= 400:
        detail = response.json().get("detail") if response.content else response.reason_phrase
        err.print(f"error: {response.status_code} {detail}")
        raise typer.Exit(1)
    return response.json()


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
    table = Table("device", "online", "last seen", "agent", "model", "cpu %", "rss MB")
    for row in rows:  # type: ignore[union-attr]
        model = row["active_model"]
        beat = row["heartbeat"] or {}
        table.add_row(
            row["id"],
            "[green]yes[/]" if row["online"] else "[red]no[/]",
            row["last_seen"] or "-",
            row["agent_version"] or "-",
            f"{model['name']} v{model['version']}" if model else "-",
            str(beat.get("cpu_percent", "-")),
            str(beat.get("rss_mb", "-")),
        )
    console.print(table)


@devices_app.command("show")
def devices_show(
    device_id: str, url: UrlOption = "http://127.0.0.1:8000", token: TokenOption = None
) -> None:
    """Show one device as JSON."""
    console.print_json(data=_get(url, token, f"/api/v1/devices/{device_id}"))


def main() -> None:
    os.environ.setdefault("COLUMNS", "120")
    app()


if __name__ == "__main__":
    main()
