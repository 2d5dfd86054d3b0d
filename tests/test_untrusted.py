"""Focused unit tests of the pieces that keep a hostile worker harmless (the end-to-end cases are in
tests/test_hostile_worker.py): the sanitizer, the Markdown escape, strict JSON, the output caps, the YAML
reader, the result validators and where `--secret` values come from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orchestrator import untrusted, worker_data
from orchestrator.config import safe_yaml
from orchestrator.errors import UsageError
from orchestrator.ops.env import resolve_secrets
from orchestrator.transport.shell import LineSplitter


def test_clean_shows_every_control_visibly_keeps_tabs_and_caps_length():
    assert untrusted.clean("a\tb") == "a\tb"
    shown = "\\x1b]52;c;x\\x07\\x0d\\x0a\\x00\\x7f\\x9b\\u202e"
    assert untrusted.clean("\x1b]52;c;x\x07\r\n\x00\x7f\x9b\u202e") == shown
    assert untrusted.clean("é ü 中") == "é ü 中"  # printable text is left alone
    cut = untrusted.clean("y" * 10_000, max_chars=100)
    assert cut == "y" * 100 + "... [9900 more characters]"
    assert untrusted.clean("\x1b" * 1000, max_chars=10).startswith("\\x1b\\x1b")


def test_clean_text_keeps_line_breaks_and_drops_only_a_cr_before_one():
    assert untrusted.clean_text("a\r\nb\rc\n") == "a\nb\\x0dc\n"
    assert untrusted.clean_text("x\x1b[2Jy\n\n") == "x\\x1b[2Jy\n\n"


def test_md_makes_worker_text_inert_in_markdown():
    forged = "x\n\n**Verdict**: aligned | `code` [link](http://e) <b>"
    out = untrusted.md(forged)
    # the visible escape's backslash is escaped too: Markdown renders `\\x0a` as `\x0a`
    assert "\n" not in out and out.startswith("x\\\\x0a\\\\x0a\\*\\*Verdict\\*\\*")
    assert "\\|" in out and "\\`code\\`" in out and "\\[link\\]" in out and "\\<b\\>" in out
    assert untrusted.md_value("abc123", code=True) == "`abc123`"
    assert untrusted.md_value("https://wandb.ai/e/p/runs/x_y") == "https://wandb.ai/e/p/runs/x_y"
    assert untrusted.md_value("a`b", code=True) == "a\\`b"  # never a code span it could close


def test_strict_json_replaces_nan_and_infinity():
    data = {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -math.inf}, "e": "NaN"}
    assert json.loads(json.dumps(untrusted.strict_json(data), allow_nan=False)) == {
        "a": None, "b": [1.5, None], "c": {"d": None}, "e": "NaN"
    }


def test_line_splitter_keeps_at_most_its_cap_and_cuts_long_lines():
    lines: list[str] = []
    splitter = LineSplitter(lines.append, max_bytes=100)
    splitter.feed(b"ok\n" + b"z" * 200)
    text = splitter.close()
    assert splitter.dropped == 103 and len(splitter.data) == 100
    assert "103 more bytes of output dropped" in text and lines[0] == "ok"


def test_safe_yaml_refuses_alias_bombs_and_deep_nesting_but_reads_merge_keys():
    assert safe_yaml("base: &b {x: 1}\nother: {<<: *b, y: 2}\n", "f.yaml")["other"] == {"x": 1, "y": 2}
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "\n".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(6)
    )
    with pytest.raises(UsageError, match="f.yaml: malformed YAML: expands to more than 100000 values"):
        safe_yaml(bomb, "f.yaml")
    with pytest.raises(UsageError, match="f.yaml"):
        safe_yaml("[" * 100_000 + "]" * 100_000, "f.yaml")


def test_eval_rows_accept_the_contract_and_nothing_else():
    good = '{"id": "q0", "correct": true}\n\n{"id": 7, "correct": false, "answer": "x"}\n'
    assert worker_data.eval_rows(good, "e.jsonl") == {"q0": True, "7": False}
    for bad in ('{"id": true, "correct": true}', '{"id": "a", "correct": 1}', '{"id": 1.5, "correct": true}',
                '{"id": "a", "correct": null}', '"row"', '{"id": "a", "correct": true} trailing'):
        with pytest.raises(worker_data.WorkerDataError, match="e.jsonl:1"):
            worker_data.eval_rows(bad + "\n", "e.jsonl")


def test_a_sweeps_sampled_pass_is_read_whole_and_in_range_or_refused():
    good = ('{"id": "q0", "correct": true, "samples": 8, "sampled_correct": 3}\n'
            '{"id": "q1", "correct": false, "samples": 8, "sampled_correct": 0}\n')
    sweep = worker_data.eval_sweep(good, "e.jsonl")
    assert sweep.correct == {"q0": True, "q1": False} and sweep.sampled == {"q0": (3, 8), "q1": (0, 8)}
    assert worker_data.eval_sweep('{"id": "q0", "correct": true}\n', "e.jsonl").sampled is None
    row = '{"id": "q%d", "correct": true%s}\n'
    n8 = ', "samples": 8, "sampled_correct": %s'
    some_rows = "e.jsonl:2: a sampled pass on some rows only"
    for bad, where in (
        (row % (0, "") + row % (1, n8 % 1), some_rows),
        (row % (0, n8 % 1) + row % (1, ""), some_rows),
        (row % (0, n8 % 9), "e.jsonl:1: `sampled_correct` must be an integer from 0 to 8, not 9"),
        (row % (0, n8 % -1), "e.jsonl:1: `sampled_correct`"),
        (row % (0, n8 % "true"), "e.jsonl:1: `sampled_correct`"),
        (row % (0, n8 % 1.5), "e.jsonl:1: `sampled_correct`"),
        (row % (0, ', "samples": 0, "sampled_correct": 0'), "e.jsonl:1: `samples` must be an integer from 1"),
        (row % (0, ', "samples": 1e12, "sampled_correct": 0'), "e.jsonl:1: `samples`"),
        (row % (0, ', "sampled_correct": 0'), "`samples` must be an integer from 1 to 4096, not missing"),
    ):
        with pytest.raises(worker_data.WorkerDataError, match=where):
            worker_data.eval_sweep(bad, "e.jsonl")


def test_metrics_rows_keep_only_finite_numbers():
    rows = worker_data.metrics('{"step": 1, "loss": NaN, "r": Infinity, "x": "s", "ok": 0.5}\n', "m.jsonl")
    assert rows == [{"step": 1, "ok": 0.5}]


def test_secrets_come_from_the_environment_then_dotenv_then_the_prompt(tmp_path: Path, monkeypatch):
    env = tmp_path / ".env"
    env.write_text("B=from-dotenv\nA=shadowed\n")
    monkeypatch.setenv("A", "from-env")
    monkeypatch.delenv("C", raising=False)
    asked: list[str] = []

    def prompt(name: str) -> str:
        asked.append(name)
        return "typed"

    found = resolve_secrets(["A", "B", "C"], env, prompt)
    assert found == {"A": "from-env", "B": "from-dotenv", "C": "typed"}
    assert asked == ["C"]
    with pytest.raises(UsageError, match="--secret C: not in the environment nor in"):
        resolve_secrets(["C"], env)
    with pytest.raises(UsageError, match="not a valid environment variable name"):
        resolve_secrets(["1BAD"], env)
