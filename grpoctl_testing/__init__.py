"""Test support, not part of the product: a private loopback sshd, the fake Cloud TPU API whose VMs are
loopback sshd workers, grpoctl wired to that fake, and the rehearsal (`make rehearsal`).

It lives outside the `orchestrator` package so that the wheel a user installs holds no fakes
(pyproject.toml's package list names orchestrator, trainer and grpoctl_contract only). Tests import it from
the checkout (pytest's `pythonpath`; tests/conftest.py also puts the checkout on PYTHONPATH for the
processes tests start).
"""
