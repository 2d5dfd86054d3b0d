"""The library layer under the CLI and SOP replay: each step fans out to every worker of a target.

One small module per step: sync (and bootstrap), env (push), launch, watch (poll, wait, kill), logs,
fetch; `session` opens a config + target + run store, `dryrun` scripts answers for `--dry-run`.
"""
