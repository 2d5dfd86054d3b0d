"""How patient grpoctl is with the Cloud TPU API: the production retry policies, as values.

`TpuApi(read_retry=...)` and `TpuWiring(read_retry=..., conflict_retry=...)` default to these; a stand-in
service that answers in milliseconds passes quicker ones (the same code path, a shorter policy). Stdlib
only (with orchestrator.retry), so the CLI can carry a TpuWiring without importing google-cloud-tpu.
"""

from __future__ import annotations

from orchestrator.retry import Backoff

# Reads (get, list, guest attributes, operation polls): 6 tries over ~30 s at most (1, 2, 4, 8, 16 s caps,
# full jitter) on transient errors (5xx, 429, a dropped connection).
READ_RETRY = Backoff(attempts=6, first_s=1.0, max_s=16.0)
# Metadata updates that meet a concurrent one (409) are tried again after a pause.
CONFLICT_RETRY = Backoff(attempts=6, first_s=2.0, max_s=20.0)
