"""The agent's config file: ``edge-agent run``'s options, written down once per device.

``/etc/edgefleet/agent.toml`` (or ``--config PATH``, or ``$EDGE_AGENT_CONFIG``) holds one
flat table::

    [agent]
    state_dir = "/var/lib/edgefleet"
    listen = "127.0.0.1:8470"
    interval = 10.0
    providers = ["CPUExecutionProvider"]
    max_download_kbps = 2000.0  # the rest of a cellular link stays the application's

    [agent.labels]
    site = "berlin"

Its keys are ``run``'s options as the parser stores them (``--max-bundle-mb`` is
``max_bundle_mb``, the repeatable ``--label``/``--provider`` are ``labels``/``providers``),
and nothing else: the schema is derived from the ``run`` parser itself, so a new option is
a new key with no second list to keep in step. A value is checked as the command line
would check it (its type, its ``choices``, the option's own converter), and the error
names the file and the key; a key the parser does not know, a wrong type, a table other
than ``[agent]`` or a file over 64 KiB are refused, never skipped (exit 2): a typo in a
device's config must not silently become a default.

Precedence: command line > environment > this file > built-in defaults. The file's values
become the parser's defaults (so anything on the command line wins), except for an option
whose environment variable is set: the variable an option reads is the one its ``--help``
names (``env EDGE_AGENT_LISTEN``), and that text is where :func:`apply` reads it from.
A value applies to every command that has the option (``state_dir`` also to ``status``,
``rollback``, ``enroll``, ``doctor``; ``providers`` to ``infer``), except ``simulate``,
whose options describe simulated devices.

Where the file is: ``--config PATH`` (``none`` for no file), else ``$EDGE_AGENT_CONFIG``,
else ``/etc/edgefleet/agent.toml`` if it exists. A default file this user may not read
(0640 root:edgefleet, read by someone else) is skipped with a warning; a named one is
an error.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "MAX_CONFIG_BYTES",
    "ConfigError",
    "ConfigUnreadableError",
    "Loaded",
    "Setting",
    "load",
    "locate",
    "read",
    "settings_of",
]

DEFAULT_CONFIG = Path("/etc/edgefleet/agent.toml")
CONFIG_ENV = "EDGE_AGENT_CONFIG"
MAX_CONFIG_BYTES = 64 * 1024
TABLE = "agent"
_NOT_SETTINGS = frozenset({"help", "config", "version"})
# Its options describe simulated devices, not this one.
_NOT_FOR_COMMANDS = frozenset({"simulate"})
_ENV_IN_HELP = re.compile(r"\benv (EDGE_AGENT_[A-Z0-9_]+)")


class ConfigError(ValueError):
    """The config file cannot be used; the message names the file and, if one, the key."""


class ConfigUnreadableError(ConfigError):
    """The file is there but this user may not read it."""


@dataclass(frozen=True)
class Setting:
    """One key of the ``[agent]`` table, derived from one option of ``run``."""

    key: str
    flag: str  # the option as typed, for messages: --max-bundle-mb
    kind: str  # "bool", "int", "float", "str", "list" (repeatable option) or "table"
    action: argparse.Action
    env: str | None  # the environment variable that wins over the file, if any

    @property
    def repeatable(self) -> bool:
        return self.kind in ("list", "table")

    def overridden(self, environ: Mapping[str, str]) -> bool:
        """Its environment variable is set: that wins over the file."""
        return bool(self.env and environ.get(self.env))

    def convert(self, value: Any, where: str) -> Any:
        """``value`` as the parsed command line would hold it; ConfigError if it is not one."""
        kind = self.kind
        if kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, given {_shown(value)}")
            return value
        if kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(
                    value, (int, float) if kind == "float" else int):
                wanted = "a number" if kind == "float" else "a whole number"
                raise ConfigError(f"{where}: expected {wanted}, given {_shown(value)}")
            return float(value) if kind == "float" else value
        if kind in ("list", "table"):
            return self._items(value, where)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, given {_shown(value)}")
        return self._typed(value, where)

    def _typed(self, value: str, where: str) -> Any:
        """A string through the option's own converter and choices, as argparse does."""
        converter = self.action.type
        if converter is not None and converter is not str:
            try:
                value = converter(value)
            except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: {exc}") from None
        if self.action.choices is not None and value not in self.action.choices:
            choices = ", ".join(map(str, self.action.choices))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value

    def _items(self, value: Any, where: str) -> list[str]:
        """A repeatable option: a list of strings; ``KEY=VALUE`` ones also take a table."""
        if isinstance(value, dict) and self.kind == "table":
            items = []
            for name, item in value.items():
                if not isinstance(item, str):
                    raise ConfigError(f"{where}.{name}: expected a string, given {_shown(item)}")
                items.append(f"{name}={item}")
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            items = list(value)
        else:
            wanted = "a table of strings" if self.kind == "table" else "a list of strings"
            raise ConfigError(f"{where}: expected {wanted}, given {_shown(value)}")
        if self.key == "labels":  # checked against the contract here, named as the file's
            from agent.labels import LabelError, parse_labels

            try:
                parse_labels(items)
            except LabelError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return [self._typed(item, where) for item in items]


def _shown(value: Any) -> str:
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} ({text[:60]}{'…' if len(text) > 60 else ''})"


def _kind(action: argparse.Action) -> str | None:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "bool"
    if isinstance(action, argparse._AppendAction):
        return "table" if "=" in str(action.metavar or "") else "list"
    if type(action) is not argparse._StoreAction or action.nargs not in (None, "?"):
        return None  # nothing a config file can say (help, version, counters, lists)
    if action.type in (int, float):
        return action.type.__name__
    return "str"


def settings_of(run: argparse.ArgumentParser) -> dict[str, Setting]:
    """The keys the ``[agent]`` table may hold: ``run``'s long options."""
    settings = {}
    for action in run._actions:
        flags = [flag for flag in action.option_strings if flag.startswith("--")]
        kind = _kind(action)
        if not flags or kind is None or action.dest in _NOT_SETTINGS:
            continue
        found = _ENV_IN_HELP.search(action.help or "")
        settings[action.dest] = Setting(action.dest, flags[0], kind, action,
                                        found.group(1) if found else None)
    return settings


def locate(given: Path | None, environ: Mapping[str, str]) -> tuple[Path | None, bool]:
    """The config file to read and whether it was asked for (``--config``, the variable)
    rather than found at the default place; (None, _) for none."""
    if given is not None:
        return (None, True) if str(given) == "none" else (given, True)
    named = environ.get(CONFIG_ENV)
    if named:
        return (None, True) if named == "none" else (Path(named), True)
    return (DEFAULT_CONFIG, False) if DEFAULT_CONFIG.exists() else (None, False)


def read(path: Path, settings: Mapping[str, Setting]) -> dict[str, Any]:
    """The ``[agent]`` table of ``path``, every value checked and converted."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except PermissionError as exc:
        raise ConfigUnreadableError(f"config file {path}: cannot read it: {exc.strerror}"
                                    ) from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path}: larger than {MAX_CONFIG_BYTES // 1024} KiB: "
                          "not an agent config")
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    for name, value in document.items():
        if name != TABLE:
            what = f"table [{name}]" if isinstance(value, dict) else f"key {name!r}"
            raise ConfigError(f"config file {path}: unknown {what}: settings go in the "
                              f"[{TABLE}] table")
    table = document.get(TABLE, {})
    values = {}
    for key, value in table.items():
        setting = settings.get(key)
        if setting is None:
            known = ", ".join(sorted(settings))
            raise ConfigError(f"config file {path}: unknown setting {key!r} in [{TABLE}] "
                              f"(known: {known})")
        values[key] = setting.convert(value, f"config file {path}: [{TABLE}] {key}")
    return values


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


@dataclass
class Loaded:
    """The config file in force (``path`` None: none) and its checked values."""

    path: Path | None
    values: dict[str, Any]
    settings: dict[str, Setting]
    warning: str | None = None  # a default file this user may not read, skipped

    def apply(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        """Make the values the defaults of every command that has the option, unless its
        environment variable is set (that wins). Repeatable options are left to
        :meth:`fill_lists`: argparse would add the command line's items to a default list."""
        for key, value in self.values.items():
            setting = self.settings[key]
            if setting.repeatable or setting.overridden(environ):
                continue
            commands = [each for name, each in _commands(parser).items()
                        if name not in _NOT_FOR_COMMANDS]
            for each in (parser, *commands):
                for action in each._actions:
                    # SUPPRESS: an option every command shares (--log-level after it) keeps
                    # the top-level value unless given there; the top level takes the default.
                    if action.dest == key and action.default is not argparse.SUPPRESS:
                        each.set_defaults(**{key: value})

    def fill_lists(self, args: argparse.Namespace, environ: Mapping[str, str]) -> None:
        """Repeatable options the command line and the environment left empty."""
        for key, value in self.values.items():
            setting = self.settings[key]
            if not setting.repeatable or setting.overridden(environ):
                continue
            if hasattr(args, key) and getattr(args, key) is None:
                setattr(args, key, list(value))


def load(
    parser: argparse.ArgumentParser, given: Path | None, environ: Mapping[str, str]
) -> Loaded:
    """Find and read the config file for ``parser`` (``edge-agent``'s, with a ``run``
    command); ConfigError if it cannot be used."""
    settings = settings_of(_commands(parser)["run"])
    path, asked = locate(given, environ)
    if path is None:
        return Loaded(None, {}, settings)
    try:
        return Loaded(path, read(path, settings), settings)
    except ConfigError as exc:
        if asked or not isinstance(exc, ConfigUnreadableError):
            raise
        return Loaded(None, {}, settings, warning=(
            f"{exc}; going on without it (run as root or the agent's user, or give "
            "--config PATH, or --config none)"))
