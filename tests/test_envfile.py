"""The one `.env` parser (grpoctl_contract/envfile.py) and every place that reads a `.env` with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpoctl_contract import envfile
from orchestrator import recipes
from orchestrator.errors import UsageError
from orchestrator.ops import env as env_ops

SECRET = "s3cret-9f8e7d"


def test_format_rules():
    text = (
        "# a comment\n"
        "\n"
        f"TOKEN= {SECRET} \n"  # unquoted: stripped
        "export QUOTED=' a b '\n"  # quoted: literal, spaces kept
        'DQ="x # not a comment" # a comment\n'
        "INLINE=value # comment\n"
        "HASH=a#b\n"
        "SPACED = v\r\n"
        "EMPTY=\n"
        "UNI=pässwörd\n"
        "TOKEN2=first\nTOKEN2=second\n"
    )
    assert envfile.parse(text) == {
        "TOKEN": SECRET,
        "QUOTED": " a b ",
        "DQ": "x # not a comment",
        "INLINE": "value",
        "HASH": "a#b",
        "SPACED": "v",
        "EMPTY": "",
        "UNI": "pässwörd",
        "TOKEN2": "second",
    }
    assert envfile.byte_lengths({"UNI": "pässwörd"}) == {"UNI": 10}  # bytes, not characters


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (f"GOOD=1\n{SECRET}\n", "line 2: expected KEY=VALUE"),
        (f"1BAD={SECRET}\n", "line 1: expected KEY=VALUE"),
        (f"K='{SECRET}\n", "line 1: unterminated quote"),
        (f"K='{SECRET}' trailing\n", "line 1: text after the closing quote"),
    ],
)
def test_errors_name_the_line_never_the_value(text: str, problem: str):
    with pytest.raises(envfile.EnvFileError, match=problem) as err:
        envfile.parse(text, "my.env")
    assert SECRET not in str(err.value) and str(err.value).startswith("my.env: ")
    with pytest.raises(UsageError) as usage:  # the orchestrator's one-line error
        env_ops.parse_dotenv(text)
    assert SECRET not in str(usage.value)


def test_non_utf8_is_an_error():
    with pytest.raises(envfile.EnvFileError, match="not UTF-8"):
        envfile.parse(b"K=\xff\xfe\n")


def test_render_round_trips_and_refuses_what_the_format_cannot_hold():
    values = {"A": "it's", "B": 'say "hi"', "C": " pad ", "D": "", "E": "x # y", "F": "ü"}
    assert envfile.parse(envfile.render(values)) == values
    for bad in ({"A": "a\nb"}, {"A": "both ' and \""}, {"1A": "x"}):
        with pytest.raises(ValueError):
            envfile.render(bad)


def test_every_reader_sees_the_same_value(tmp_path: Path):
    """`TOKEN= s3cret ` and a non-ASCII value: the pusher, the worker-side check, the redactor, the job
    launcher and the trainer agree (they disagreed before: ' s3cret ' for redaction, 's3cret' elsewhere)."""
    env = tmp_path / ".env"
    env.write_bytes(f"TOKEN= {SECRET} \nUNI=pässwörd\n".encode())
    env.chmod(0o600)
    expected = {"TOKEN": SECRET, "UNI": "pässwörd"}
    # The pusher (laptop side) and its length check.
    assert env_ops.read_dotenv(env) == expected
    # The worker-side check: the recipe runs the same module as program text under a plain python3.
    verify = recipes.env_verify(str(env), envfile.__file__)
    out = subprocess.run(["bash", "-c", verify], capture_output=True, text=True, check=True)
    assert recipes.parse_env_verify(out.stdout) == ("600", envfile.byte_lengths(expected))
    assert SECRET not in out.stdout + out.stderr
    # The redactor (`grpoctl logs`).
    assert env_ops.redactor(list(expected.values()))(f"key={SECRET}.") == "key=***."
    # The job launcher (`-e` values): exec with the file's values in the environment.
    shown = subprocess.run(
        [sys.executable, "-m", "grpoctl_contract.envfile", "exec", str(env), "--", sys.executable, "-c",
         "import os; print(repr(os.environ['TOKEN']), len(os.environ['UNI'].encode()))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert shown == f"{SECRET!r} 10"


def test_the_trainer_reads_dotenv_with_the_shared_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(Separate: importing the trainer costs jax's import, shared with the trainer tests in a full run.)"""
    load_dotenv = pytest.importorskip("trainer.train", reason="trainer test: needs jax").load_dotenv

    env = tmp_path / ".env"
    env.write_bytes(f"TOKEN= {SECRET} \nUNI=pässwörd\n".encode())
    monkeypatch.delenv("TOKEN", raising=False)
    monkeypatch.delenv("UNI", raising=False)
    assert sorted(load_dotenv(env)) == ["TOKEN", "UNI"]
    assert os.environ["TOKEN"] == SECRET and os.environ["UNI"] == "pässwörd"
    # A line the pusher would refuse is not silently skipped here either.
    from trainer.config import ConfigError

    env.write_text(f"GOOD=1\n{SECRET}\n")
    with pytest.raises(ConfigError, match="line 2: expected KEY=VALUE") as err:
        load_dotenv(env)
    assert SECRET not in str(err.value)


def test_contract_package_imports_without_the_heavy_halves():
    code = (
        "import sys, grpoctl_contract.envfile; "
        "bad = [m for m in ('jax', 'typer', 'pydantic', 'orchestrator', 'trainer') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
