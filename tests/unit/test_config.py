"""``--config FILE``: TOML keys become the subcommand's flags, checked against the real parser
(dst/config.py).  These run the real ``build_parser`` and ``apply_config``; nothing listens."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dst.cli import main
from dst.config import apply_config, config_argv, subparsers
from dst.errors import ConfigError
from dst.options import build_parser


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    return parser.parse_args(apply_config(parser, argv))


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_flat_file_stands_for_the_flags(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        'listen = "127.0.0.1:7410"\ndata = "/srv/dst"\nvolume = ["a=1G", "b=64M"]\n'
        'insecure = true\npage_size = "8K"\nmax-inflight = 16\nrole = "primary"\n'
        'peer = "127.0.0.1:7411"\n',
    )
    args = parse(["serve", "--config", str(cfg)])
    assert args.listen == "127.0.0.1:7410"
    assert args.data == Path("/srv/dst")
    assert args.volume == ["a=1G", "b=64M"]
    assert args.insecure is True and args.tls is None
    assert args.page_size == 8192 and args.max_inflight == 16
    assert (args.role, args.peer) == ("primary", "127.0.0.1:7411")


def test_sectioned_file_gives_each_command_its_table(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        '[serve]\nlisten = "127.0.0.1:7410"\ndata = "d"\nvolume = ["vol0=1G"]\ninsecure = true\n'
        '[nbd]\nlisten = "127.0.0.1:10809"\nserver = ["127.0.0.1:7410", "127.0.0.1:7411"]\n'
        'volume = "vol0"\ninsecure = true\n',
    )
    serve = parse(["serve", f"--config={cfg}"])
    nbd = parse(["nbd", "--config", str(cfg)])
    assert serve.volume == ["vol0=1G"] and serve.listen == "127.0.0.1:7410"
    assert nbd.server == ["127.0.0.1:7410", "127.0.0.1:7411"] and nbd.volume == "vol0"
    assert nbd.listen == "127.0.0.1:10809"


def test_command_line_wins_including_lists_and_exclusive_groups(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    cfg = write(
        tmp_path,
        '[serve]\nlisten = "127.0.0.1:7410"\ndata = "d"\nvolume = ["a=1G"]\n'
        f'tls = "{tmp_path / "pki"}"\n',
    )
    args = parse(
        ["serve", "--config", str(cfg), "--listen", "127.0.0.1:9", "--vol", "b=2G", "--insecure"]
    )
    assert args.listen == "127.0.0.1:9"
    assert args.volume == ["b=2G"]  # replaced, not appended to the file's list
    assert args.insecure and args.tls is None  # --insecure drops the file's tls


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ('listen = "x:1"\nbogus = 1\n', ["unknown key 'bogus'", "c.toml"]),
        ('[serve]\npage-size = "3K"\n', ["page-size = '3K'", "power of two"]),
        ('[serve]\nrole = "boss"\n', ["role = 'boss'", "not one of primary, secondary"]),
        ('[serve]\ninsecure = "yes"\n', ["insecure = 'yes'", "true or false"]),
        ("[serve]\nlisten = true\n", ["listen = True", "not true/false"]),
        ('[serve]\nvolume = [["a"]]\n', ["volume", "list of strings"]),
        ("[serve]\nvolume = { a = 1 }\n", ["volume = {'a': 1}", "a string, number"]),
        ('[serf]\nlisten = "x:1"\n', ["table [serf] is not a dst command"]),
        ('listen = "x:1"\n[nbd]\nvolume = "v"\n', ["key 'listen' is outside a table"]),
        ("listen = \n", ["not valid TOML"]),
    ],
)
def test_bad_files_name_the_file_key_and_value(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    cfg = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        apply_config(build_parser(), ["serve", "--config", str(cfg)])
    for needle in needles:
        assert needle in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        apply_config(build_parser(), ["serve", "--config", str(tmp_path / "nope.toml")])


def test_main_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, '[nbd]\nvolume = "v"\nlisten_port = 5\n')
    assert main(["nbd", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'listen_port'" in err and str(cfg) in err


def test_a_flag_added_later_works_with_no_config_code(tmp_path: Path) -> None:
    parser = build_parser()
    serve = subparsers(parser)["serve"]
    serve.add_argument("--future-knob", metavar="BYTES")
    serve.add_argument("--verbose-thing", action="store_true")
    out = config_argv(serve, {"future-knob": "10M", "verbose_thing": True}, [], tmp_path / "x.toml")
    assert out == ["--future-knob=10M", "--verbose-thing"]


def test_a_command_without_its_table(tmp_path: Path) -> None:
    cfg = write(tmp_path, '[nbd]\nvolume = "v"\nserver = ["127.0.0.1:1"]\n')
    argv = apply_config(build_parser(), ["status", "--config", str(cfg)])
    assert argv == ["status", "--config", str(cfg)]  # status reads the servers itself
    with pytest.raises(ConfigError, match=r"has no \[serve\] table \(it has \[nbd\]\)"):
        apply_config(build_parser(), ["serve", "--config", str(cfg)])
