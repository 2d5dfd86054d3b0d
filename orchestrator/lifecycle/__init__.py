"""A run's lifecycle, in one place: its states (`states`), one monitor that turns a poll of the workers
(and, when needed, one look at the machine) into a decision (`monitor`), and the recovery policy that acts
on decisions with its own budgets, persisting each one before acting (`recovery`).

Kept import-free on purpose: `recipes` imports `lifecycle.states`, and `monitor` imports `recipes`.
"""
