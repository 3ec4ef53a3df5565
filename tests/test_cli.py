"""The command line as a person meets it first: --version, and every command's --help."""

import re
import subprocess
import sys

import pytest

import gqtok
from gqtok.cli import build_parser


def gqtok_cli(*args):
    return subprocess.run([sys.executable, "-m", "gqtok.cli", *args], capture_output=True, text=True, timeout=120)


def commands() -> list[list[str]]:
    """Every command and subcommand path of the parser, e.g. ['serve'], ['data', 'fetch']."""
    def walk(parser, prefix):
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            return [prefix]
        return [path for name, child in subs[0].choices.items() for path in walk(child, prefix + [name])]
    return walk(build_parser([]), [])


def test_version():
    out = gqtok_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"gqtok {gqtok.__version__}"


@pytest.mark.parametrize("command", commands(), ids=" ".join)
def test_every_help_prints(command):
    out = gqtok_cli(*command, "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: gqtok " + " ".join(command))


def test_train_help_shows_the_chosen_presets_values():
    from gqtok.training.model import PRESETS

    def shown(*args, flag):
        text = re.sub(r"\s+", " ", gqtok_cli("train", *args, "--help").stdout)
        return re.search(rf"{flag} \S+ \(default ([^)]*)\)", text).group(1)

    assert shown(flag="--steps") == str(PRESETS["default"]["train"]["steps"])
    assert shown(flag="--crop-window-max") == str(PRESETS["default"]["train"]["crop_window_max"])
    assert shown("--preset", "tiny", flag="--steps") == str(PRESETS["tiny"]["train"]["steps"])
    assert shown("--preset=codec", flag="--quantizer") == "'uniform'"
