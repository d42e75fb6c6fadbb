"""The CLI's argument types live once, in driftlock_cli/arguments.py, and every command module uses them."""

import re
from pathlib import Path

import pytest

from driftlock_cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
# What a hand-written copy of a shared argument type contains.
COPIED = re.compile(r"uuid\.UUID\(text\)|parse_duration\(|keys\.parse_scopes\(|<= 10_000")


def test_no_command_module_copies_an_argument_type():
    copies = {
        str(path.relative_to(ROOT)): COPIED.findall(path.read_text())
        for path in (ROOT / "driftlock_cli").glob("*.py")
        if path.name != "arguments.py" and COPIED.search(path.read_text())
    }
    assert copies == {}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["keys", "list", "--org", "nope"], "argument --org: malformed organisation id 'nope': expected a UUID"),
        (["keys", "show", "nope"], "argument key_id: malformed key id 'nope': expected a UUID"),
        (["webhooks", "events", "--org", "x"], "argument --org: malformed organisation id 'x': expected a UUID"),
        (["webhooks", "events", "--limit", "0"], "argument --limit: expected a whole number from 1 to 10000, got '0'"),
        (["stripe", "exports", "list", "--limit", "10001"], "expected a whole number from 1 to 10000, got '10001'"),
        (["stripe", "sync", "--org", "x"], "argument --org: malformed organisation id 'x': expected a UUID"),
        (["prune", "all", "--older-than", "soon"], "argument --older-than: malformed duration 'soon'"),
        (["webhooks", "prune", "--older-than", "2d"], "must be at least 3d, got '2d'"),
        (["dev", "--backend", "nowhere"], "argument --backend: --backend: expected host:port, got 'nowhere'"),
        (["plans", "upsert", "p", "--included-units", "-1"], "expected a whole number, got '-1'"),
    ],
)
def test_each_shared_type_refuses_in_one_line_naming_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    error = capsys.readouterr().err
    assert exited.value.code != 0
    assert message in error and error.count("\n") == 1, error


def test_the_shared_options_parse_what_they_did():
    args = build_parser().parse_args(
        ["webhooks", "events", "--org", "6f1c1f6e-2b7c-4d53-9d2e-2d0f5b1c7e10", "--limit", "7"]
    )
    assert (str(args.org), args.limit) == ("6f1c1f6e-2b7c-4d53-9d2e-2d0f5b1c7e10", 7)
    assert build_parser().parse_args(["webhooks", "events"]).limit == 50
    assert build_parser().parse_args(["stripe", "exports", "list"]).limit == 100
