"""What a Cloud TPU API failure means for the user: one table, `classify(err) -> Failure`.

Each failure has a kind, the exit code (2: the user's to fix; 3: infrastructure) and one line of advice.
`api_error` turns it into the grpoctl error the CLI prints; `is_transient` says whether a read (or a
metadata update that met a concurrent one) is worth another try. Anything that chooses what to do next
from an API failure (retry, another zone, wait) reads `Failure.kind` rather than parsing messages again.

Facts this encodes (Cloud TPU v2 REST, google-api-core's error classes):
- a create's long-running operation fails with a google.rpc.Status: code 3 INVALID_ARGUMENT "...not
  supported while in state PREEMPTED" (the spot VM was taken back while it was being created), code 8
  RESOURCE_EXHAUSTED (no capacity: a stockout; or a quota), code 9 FAILED_PRECONDITION "Insufficient
  reserved capacity";
- quota can also fail the create call itself: HTTP 429 with a `google.rpc.QuotaFailure` detail naming the
  quota (`violations[].subject`, `.description`);
- reads see 500/502/503/504 and 429 (rate limits) now and then: transient;
- 409 on an update: another operation on the node is running ("unable to queue the operation");
- google.auth's RefreshError / TransportError (expired or revoked login, token endpoint unreachable) are
  neither GoogleAPICallError nor OSError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc

from orchestrator.errors import GrpoctlError, InfraError, UsageError

QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
QUOTAS_PAGE = "https://console.cloud.google.com/iam-admin/quotas"
TRANSIENT_HTTP = (408, 429, 500, 502, 503, 504)


class TransientApiError(InfraError):
    """A read kept failing with errors that are usually transient (503, 429, a dropped connection).
    Nothing is known to be wrong with the node: never delete capacity because of one."""


@dataclass(frozen=True)
class Failure:
    kind: str  # a stable name callers may branch on (see KINDS)
    exit_code: int  # 2 the user's to fix, 3 infrastructure
    advice: str  # one clause: what happened and what to do


KINDS = (
    "transient",  # 5xx, 429 on a read, network: retried
    "conflict",  # 409: another update runs on the node: retried
    "preempted_while_creating",  # op code 3, "... in state PREEMPTED"
    "stockout",  # op code 8 without a quota: no capacity in the zone now
    "reserved_capacity",  # op code 9 "Insufficient reserved capacity"
    "quota",  # a quota named by QuotaFailure details or the message
    "api_disabled",  # 403: the Cloud TPU API is not enabled in the project (SERVICE_DISABLED)
    "permission",  # 401 / 403
    "credentials",  # google.auth RefreshError / TransportError
    "queue_expired",  # a queued resource FAILED at its validUntil without capacity
    "os_login_required",  # 400: constraints/compute.requireOsLogin refuses enable-oslogin=FALSE
    "bad_request",  # 400 INVALID_ARGUMENT / FAILED_PRECONDITION (the request is wrong)
    "not_found",
    "unreachable",  # OSError, api_core RetryError
    "other",
)


def _message(err: BaseException) -> str:
    """The server's own message on one line, without the `METHOD URL:` prefix REST errors carry."""
    text = str(getattr(err, "message", "") or err)
    text = re.sub(r"^(GET|POST|PATCH|PUT|DELETE) \S+: ", "", text).strip()
    return " ".join(text.split()) or type(err).__name__


def quota_violations(err: BaseException) -> list[str]:
    """`subject: description` of each QuotaFailure violation the error carries (REST details are dicts)."""
    out = []
    for detail in getattr(err, "details", None) or []:
        if isinstance(detail, dict) and detail.get("@type") == QUOTA_FAILURE:
            for v in detail.get("violations", []):
                out.append(": ".join(x for x in (v.get("subject", ""), v.get("description", "")) if x))
    return [x for x in out if x]


def _quota_named(msg: str) -> str | None:
    m = re.search(r"[Qq]uota (?:limit |metric )?'([^']+)'", msg)
    return m.group(1) if m else None


def is_transient(err: BaseException) -> bool:
    """Worth another try of an idempotent call (a read, an update that met a concurrent one)."""
    if isinstance(err, gexc.GoogleAPICallError):
        return (
            err.code in TRANSIENT_HTTP or isinstance(err, gexc.Conflict) and "already exists" not in str(err)
        )
    return isinstance(err, OSError | gexc.RetryError | auth_exc.TransportError)


def classify(err: BaseException, *, project: str = "", zone: str = "") -> Failure:
    """The kind, exit code and advice of an API failure (an HTTP error or a failed operation's status)."""
    msg = _message(err)
    where = zone or "the zone"
    quotas = quota_violations(err)
    named = _quota_named(msg)
    if quotas or (isinstance(err, gexc.ResourceExhausted | gexc.TooManyRequests) and named):
        which = "; ".join(quotas) or named or "a quota"
        page = f"{QUOTAS_PAGE}?project={project}" if project else QUOTAS_PAGE
        return Failure("quota", 3, f"quota exceeded ({which}): request more at {page}, or pick another zone")
    if isinstance(err, auth_exc.RefreshError):
        return Failure(
            "credentials",
            3,
            "Google credentials cannot be refreshed (expired or revoked login): "
            "run `gcloud auth application-default login`",
        )
    if isinstance(err, auth_exc.TransportError):
        return Failure(
            "credentials", 3, "cannot reach Google's token endpoint to refresh credentials (network)"
        )
    if isinstance(err, gexc.InvalidArgument) and "PREEMPTED" in msg:
        return Failure(
            "preempted_while_creating",
            3,
            "the spot VM was preempted while it was being created: `grpoctl up` again, or use queued: true "
            "to wait for capacity",
        )
    if isinstance(err, gexc.FailedPrecondition) and "reserved capacity" in msg.lower():
        return Failure(
            "reserved_capacity",
            3,
            f"the reservation has no free capacity in {where}: wait for it, or set spot: true / another zone",
        )
    if isinstance(err, gexc.ResourceExhausted):
        # gRPC code 8 (a failed operation's status; an HTTP 429 is plain TooManyRequests): a stockout
        return Failure(
            "stockout",
            3,
            f"no capacity in {where} right now: try later, another zone, or queued: true "
            "(waits for capacity)",
        )
    if isinstance(err, gexc.DeadlineExceeded) and ("validUntil" in msg or "expired" in msg):
        return Failure(
            "queue_expired",
            3,
            f"no capacity came in {where} before valid_until_s: raise valid_until_s, try "
            "later or another zone",
        )
    if isinstance(err, gexc.Conflict) and "already exists" not in msg:
        return Failure("conflict", 3, "another operation on the node is running; try again when it ends")
    if isinstance(err, gexc.GoogleAPICallError) and err.code in TRANSIENT_HTTP:
        return Failure("transient", 3, "the Cloud TPU API kept failing (transient errors); try again")
    disabled = "SERVICE_DISABLED" in msg or "has not been used in project" in msg
    if isinstance(err, gexc.Forbidden) and disabled:
        enable = f"gcloud services enable tpu.googleapis.com --project {project or 'PROJECT'}"
        return Failure(
            "api_disabled", 2, f"the Cloud TPU API is not enabled in project {project or '?'}: {enable}"
        )
    denied = re.search(r"[Pp]ermission '([\w.]+)' denied", msg)
    if isinstance(err, gexc.Forbidden | gexc.Unauthorized) and denied:
        return Failure(
            "permission",
            2,
            f"your account lacks the permission {denied.group(1)} in project {project or '?'}: grant it a "
            "role that has it (roles/tpu.admin has every tpu.* one: gcloud projects add-iam-policy-binding)",
        )
    if isinstance(err, gexc.Forbidden | gexc.Unauthorized):
        return Failure(
            "permission",
            2,
            "check the project, that the TPU API is enabled, and that your account has roles/tpu.admin",
        )
    if isinstance(err, gexc.BadRequest) and "requireOsLogin" in msg:
        return Failure(
            "os_login_required",
            2,
            "OS Login is required by the org policy constraints/compute.requireOsLogin, so the node's "
            "ssh-keys cannot be used: use a target of kind ssh with your OS Login user and key "
            "(`gcloud compute os-login describe-profile`, `gcloud compute os-login ssh-keys add`)",
        )
    if isinstance(err, gexc.BadRequest):  # INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE
        return Failure("bad_request", 2, "rejected by the Cloud TPU API")
    if isinstance(err, gexc.NotFound):
        return Failure("not_found", 3, "not found")
    if isinstance(err, OSError | gexc.RetryError):
        return Failure("unreachable", 3, "cannot reach the Cloud TPU API")
    return Failure("other", 3, "Cloud TPU API error")


def status_error(code: int, message: str) -> gexc.GoogleAPICallError:
    """A google.rpc.Status (a failed operation's `error`, a queued resource's `failedData.error`) as the
    exception class google-api-core gives it, ready for `classify`."""
    return gexc.from_grpc_status(code, message)


def api_error(err: BaseException, action: str, **context: Any) -> GrpoctlError:
    """The one-line grpoctl error for `err` met while doing `action` (e.g. "create node grpo-v6e8").
    The error carries `kind` (see KINDS) for callers that choose what to do next."""
    failure = classify(err, **context)
    msg = _message(err)
    if failure.kind == "transient":
        out: GrpoctlError = TransientApiError(f"{action}: {failure.advice} ({msg})")
    elif failure.kind in ("bad_request", "not_found", "other", "unreachable"):
        out = (UsageError if failure.exit_code == 2 else InfraError)(f"{action}: {failure.advice}: {msg}")
    else:
        out = (UsageError if failure.exit_code == 2 else InfraError)(f"{action}: {failure.advice} ({msg})")
    out.kind = failure.kind  # type: ignore[attr-defined]
    return out


def kind_of(err: BaseException) -> str:
    """The `kind` an `api_error` carries ("" for any other error)."""
    return str(getattr(err, "kind", ""))
