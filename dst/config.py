"""``--config FILE``: a TOML file standing for a set of command-line flags.

The keys are the long flag names of the subcommand (``listen = "0.0.0.0:7410"``,
``volume = ["vol0=100G"]``, ``insecure = true``; ``page-size`` and ``page_size`` are the same
key).  Nothing here lists dst's flags: every key is looked up among the argparse actions of the
subcommand's parser, so a flag added to ``dst/cli.py`` works in config files at once.

Layout.  A file is either *flat* (every key is a flag of the command it is given to) or
*sectioned*: one table per subcommand, so one file holds a host's services::

    [serve]                         # dst serve --config host.toml
    listen = "10.0.0.1:7410"
    volume = ["vol0=100G"]
    tls = "/etc/dst/pki/a"

    [nbd]                           # dst nbd --config host.toml
    server = ["10.0.0.1:7410", "10.0.0.2:7410"]

A sectioned file may not have keys outside its tables (which table would they belong to?),
and every table is named after a subcommand.  A command given a sectioned file without its
table is refused, except ``dst status``, which reads the other tables to find the servers.
Paths are taken as given (relative ones from the working directory, ``/`` under systemd).

Precedence.  Flags on the command line override the file: a flag given there drops the
file's value for it (for repeatable flags too: ``--volume`` on the command line replaces the
file's ``volume`` list), and so does any flag of the same mutually exclusive group
(``--insecure`` on the command line drops the file's ``tls``).

Errors.  An unknown key, a table that is not a subcommand, a value of the wrong TOML type,
or a value the flag's own type or choices reject: exit 2 with one line naming the file, the
key and the value (a ConfigError; ``dst`` prints it like every configuration mistake).
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dst.errors import ConfigError

CONFIG_FLAG = "--config"
#: Commands that may take a sectioned file without their own table: ``dst status`` reads the
#: servers named in the other tables.
TABLE_OPTIONAL = frozenset({"status"})


def find_config_path(argv: Sequence[str]) -> Path | None:
    """The FILE of ``--config FILE`` / ``--config=FILE`` in ``argv``, before parsing (the
    file supplies flags that the parse then requires)."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == CONFIG_FLAG and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith(CONFIG_FLAG + "="):
            return Path(arg[len(CONFIG_FLAG) + 1 :])
    return None


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from exc


def section(
    doc: Mapping[str, Any], command: str, commands: Sequence[str], path: Path
) -> dict[str, Any]:
    """The keys of ``doc`` that belong to ``command`` (see the module docstring's layout)."""
    tables = {k for k, v in doc.items() if isinstance(v, dict)}
    if not tables:
        return dict(doc)
    for name in sorted(tables):
        if name not in commands:
            raise ConfigError(
                f"config file {path}: table [{name}] is not a dst command "
                f"(one of {', '.join(commands)})"
            )
    loose = sorted(set(doc) - tables)
    if loose:
        raise ConfigError(
            f"config file {path}: key {loose[0]!r} is outside a table; a file with "
            f"[{'] ['.join(sorted(tables))}] tables keeps every key in one of them"
        )
    if command not in doc and command not in TABLE_OPTIONAL:
        raise ConfigError(
            f"config file {path} has no [{command}] table (it has [{'] ['.join(sorted(tables))}])"
        )
    return dict(doc.get(command, {}))


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _long_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``name`` (without ``--``) → action, for every long flag the file may set."""
    flags: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        for option in action.option_strings:
            if option.startswith("--") and option != CONFIG_FLAG:
                flags[option[2:]] = action
    return flags


def _given_on_command_line(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> set[argparse.Action]:
    """The actions that the command-line tokens name, including argparse's unique-prefix
    abbreviations (``--vol`` for ``--volume``)."""
    options = {o: a for a in parser._actions for o in a.option_strings}
    given: set[argparse.Action] = set()
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("-"):
            continue
        name = arg.split("=", 1)[0]
        if name in options:
            given.add(options[name])
        elif name.startswith("--"):
            matches = {a for o, a in options.items() if o.startswith(name)}
            if len(matches) == 1:
                given |= matches
    return given


def _check_value(path: Path, key: str, action: argparse.Action, value: Any) -> None:
    """Fail here, naming the file and key, rather than in argparse with only the flag."""
    where = f"config file {path}: {key} = {value!r}"
    if isinstance(value, bool) or isinstance(value, int | float | str):
        pass
    elif isinstance(value, list) and isinstance(action, argparse._AppendAction):
        for item in value:
            if isinstance(item, list | dict):
                raise ConfigError(f"{where}: a list of strings or numbers expected")
            _check_value(path, key, action, item)
        return
    else:
        raise ConfigError(f"{where}: a string, number or boolean expected")
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: true or false expected")
        return
    if isinstance(value, bool):
        raise ConfigError(f"{where}: a value expected, not true/false")
    text = str(value)
    try:
        converted = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError, TypeError, ConfigError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{where}: not one of {choices}")


def config_argv(
    parser: argparse.ArgumentParser, keys: Mapping[str, Any], argv: Sequence[str], path: Path
) -> list[str]:
    """Flags standing for ``keys`` (the command's section of the file at ``path``), minus
    those the command line ``argv`` overrides; to be placed before ``argv``."""
    flags = _long_flags(parser)
    given = _given_on_command_line(parser, argv)
    for group in parser._mutually_exclusive_groups:
        if given & set(group._group_actions):
            given |= set(group._group_actions)
    out: list[str] = []
    for raw_key, value in keys.items():
        key = raw_key.replace("_", "-")
        action = flags.get(key)
        if action is None:
            known = ", ".join(sorted(flags))
            raise ConfigError(f"config file {path}: unknown key {raw_key!r} (known: {known})")
        _check_value(path, raw_key, action, value)
        if action in given:
            continue
        option = "--" + key
        if action.nargs == 0:
            if value:
                out.append(option)
        elif isinstance(value, list):
            out += [f"{option}={item}" for item in value]
        else:
            out.append(f"{option}={value}")
    return out


def apply_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with the flags of its ``--config FILE`` (if any) spliced in after the
    subcommand name."""
    path = find_config_path(argv)
    if path is None or not argv or argv[0].startswith("-"):
        return list(argv)
    commands = subparsers(parser)
    command = argv[0]
    sub = commands.get(command)
    if sub is None:
        return list(argv)  # argparse reports the unknown command
    keys = section(load_toml(path), command, sorted(commands), path)
    return [command, *config_argv(sub, keys, argv[1:], path), *argv[1:]]


def servers_in_file(path: Path) -> tuple[list[str], str | None]:
    """The dst servers a config file names, for ``dst status --config``: ``server`` of its
    ``[status]`` table, ``listen`` and ``peer`` of ``[serve]``, ``server`` of ``[nbd]`` (a flat
    file is read as whichever it is), in order, without repeats; and the first ``tls``."""
    doc = load_toml(path)
    if any(isinstance(v, dict) for v in doc.values()):
        tables = [(name, doc[name]) for name in ("status", "serve", "nbd") if name in doc]
    else:
        tables = [("serve" if "data" in doc else "nbd", doc)]
    servers: list[str] = []
    tls: str | None = None
    for name, table in tables:
        named = [table.get("listen"), table.get("peer")] if name == "serve" else []
        listed = table.get("server", [])
        named += listed if isinstance(listed, list) else [listed]
        servers += [str(s) for s in named if s and str(s) not in servers]
        if tls is None and isinstance(table.get("tls"), str):
            tls = table["tls"]
    return servers, tls
