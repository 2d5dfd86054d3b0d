"""python -m trainer --config CONFIG --run-dir DIR [--set key=value ...]

Exit codes: 0 done, 2 bad config or inputs (one line on stderr naming the key), 143 stopped by SIGTERM
after checkpointing the step it finished, 1 anything else.
"""

from __future__ import annotations

import argparse
import signal
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors: one line, exit 2
        print(f"usage error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m trainer", description="GRPO trainer (see docs/trainer-config.md)")
    parser.add_argument("--config", required=True, help="YAML config file (configs/*.yaml)")
    parser.add_argument("--run-dir", required=True, help="run directory; restarting with it resumes")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key (dotted for sections, value parsed as YAML), repeatable",
    )
    args = parser.parse_args(argv)

    # Imports after argument parsing: `--help` and config errors stay fast and never touch jax.
    from trainer.config import ConfigError, load, load_dotenv

    try:
        load_dotenv()  # first: the env flags in the worker's .env are part of the config
        cfg = load(args.config, args.overrides)
    except ConfigError as err:
        print(str(err), file=sys.stderr, flush=True)
        return 2

    from trainer.data import DataError
    from trainer.hf_io import CheckpointError
    from trainer.tokenizer import TokenizerError
    from trainer.train import Stopped, run

    # SIGTERM (spot preemption, `grpoctl stop`) ends the run at the next step boundary, checkpointed;
    # a second SIGTERM kills at once (the default action comes back after the first).
    term = {"requested": False}

    def on_term(*_: object) -> None:
        term["requested"] = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, on_term)
    try:
        run(cfg, args.run_dir, should_stop=lambda: term["requested"])
    except ConfigError as err:
        print(str(err), file=sys.stderr, flush=True)
        return 2
    except (DataError, TokenizerError, CheckpointError) as err:  # inputs named by the config
        print(f"input error: {err}", file=sys.stderr, flush=True)
        return 2
    except Stopped as err:
        print(str(err), file=sys.stderr, flush=True)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
