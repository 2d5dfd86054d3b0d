"""The one `.env` parser: the pusher, the redactor, the job launcher and the trainer all read with it.

Format (one `KEY=VALUE` per line):
- blank lines and lines starting with `#` are skipped; an optional `export ` prefix is allowed;
- spaces around `=` are ignored; an unquoted value is stripped and ends at ` #` (an inline comment);
- a value in matching single or double quotes is taken literally (no escapes), spaces included;
- anything else (no `=`, a bad name, an unterminated quote, text after the closing quote, a NUL byte) is
  an error that names the line number, never the line: it may hold a secret.
The file must be UTF-8. Value lengths are compared in UTF-8 BYTES on both ends.

Run as a script on a worker (it needs only a python3, no checkout):
    python3 envfile.py verify PATH          prints MODE=<octal> and KEYLEN=<key>:<bytes> lines, no value
    python3 -m grpoctl_contract.envfile exec PATH -- CMD...   exports PATH's values, then execs CMD
Kept compatible with older worker pythons (3.8+): no syntax newer than that at run time.
"""

from __future__ import annotations

import os
import re
import stat
import sys

_LINE = re.compile(r"(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*(.*)\Z", re.DOTALL)
_INLINE_COMMENT = re.compile(r"[ \t]#")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

EXIT_BAD_FILE = 65  # `verify`/`exec` on a file that does not parse


class EnvFileError(ValueError):
    """A `.env` that does not parse; the message names the file and line, never a value."""


def parse(data: bytes | str, source: str = ".env") -> dict[str, str]:
    """KEY -> value for every assignment in `data` (the last one wins for a repeated key)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise EnvFileError(f"{source}: not UTF-8 (byte {err.start})") from None
    if data.startswith("\ufeff"):
        data = data[1:]
    out: dict[str, str] = {}
    for number, raw in enumerate(data.split("\n"), start=1):
        line = raw.rstrip("\r").strip(" \t")
        if not line or line.startswith("#"):
            continue
        if "\0" in line:  # no environment can hold it: a C string ends there
            raise EnvFileError(f"{source}: line {number}: holds a NUL byte")
        m = _LINE.match(line)
        if not m:
            raise EnvFileError(f"{source}: line {number}: expected KEY=VALUE")
        out[m.group(1)] = _value(m.group(2), source, number)
    return out


def _value(text: str, source: str, number: int) -> str:
    if text[:1] in ("'", '"'):
        end = text.find(text[0], 1)
        if end < 0:
            raise EnvFileError(f"{source}: line {number}: unterminated quote")
        rest = text[end + 1 :].strip(" \t")
        if rest and not rest.startswith("#"):
            raise EnvFileError(f"{source}: line {number}: text after the closing quote")
        return text[1:end]
    cut = _INLINE_COMMENT.search(text)
    return (text[: cut.start()] if cut else text).strip(" \t")


def read(path: str | os.PathLike[str]) -> dict[str, str]:
    """The parsed file; {} when it does not exist."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    return parse(data, str(path))


def byte_lengths(values: dict[str, str]) -> dict[str, int]:
    return {k: len(v.encode("utf-8")) for k, v in values.items()}


def render(values: dict[str, str]) -> bytes:
    """A file that `parse` reads back as exactly `values` (ValueError names a value it cannot hold)."""
    lines = []
    for key, value in values.items():
        if not _NAME.match(key):
            raise ValueError(f"not a valid environment variable name: {key!r}")
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"{key}: the value holds a line break or NUL byte")
        quote = "'" if "'" not in value else '"'
        if quote in value:
            raise ValueError(f"{key}: the value holds both kinds of quote")
        lines.append(f"{key}={quote}{value}{quote}\n")
    text = "".join(lines)
    if parse(text) != dict(values):  # the contract: what is written is what every reader sees
        raise ValueError("the values do not survive a round trip through the .env format")
    return text.encode("utf-8")


def _verify(path: str) -> int:
    """MODE= and KEYLEN= lines for `path`: enough to check a push without any value leaving the worker."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        values = read(path)
    except (OSError, EnvFileError) as err:
        print(f"ERROR={err}")
        return EXIT_BAD_FILE
    print(f"MODE={mode:o}")
    for key, length in byte_lengths(values).items():
        print(f"KEYLEN={key}:{length}")
    return 0


def _exec(path: str, argv: list[str]) -> int:
    """Put `path`'s values into the environment (they win over inherited ones), then become `argv`."""
    try:
        values = read(path)
    except (OSError, EnvFileError) as err:
        print(f"grpoctl: {err}", file=sys.stderr)
        return EXIT_BAD_FILE
    os.environ.update(values)
    os.execvp(argv[0], argv)
    return 127  # not reached


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "verify":
        return _verify(argv[1])
    if len(argv) >= 4 and argv[0] == "exec" and argv[2] == "--":
        return _exec(argv[1], argv[3:])
    print("usage: envfile.py verify PATH | exec PATH -- CMD...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
