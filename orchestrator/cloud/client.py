"""Building a Cloud TPU API client, and turning its errors into one-line grpoctl errors.

Credentials come from Application Default Credentials, except for a plain `http://` endpoint (the fake
API in tests, or a local proxy), which gets anonymous credentials. Under pytest a client is never built
for Google's own endpoint: a test that forgets `api_endpoint` fails instead of reaching the network.
"""

from __future__ import annotations

import os
import re

from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import tpu_v2

from orchestrator.errors import GrpoctlError, InfraError, UsageError

# pytest sets this for the duration of every test; we use it as the "no real cloud here" signal.
PYTEST_ENV = "PYTEST_CURRENT_TEST"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


class RealEndpointUnderTest(AssertionError):
    """A test tried to build a client for Google's endpoint. Deliberately not a GrpoctlError."""


def default_credentials() -> Credentials:
    """ADC (gcloud auth application-default login, a service-account file, or the metadata server)."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, _project = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
    except DefaultCredentialsError:
        raise UsageError(
            "no Google credentials found: run `gcloud auth application-default login` "
            "or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file"
        ) from None
    return credentials


def build_client(api_endpoint: str | None = None) -> tpu_v2.TpuClient:
    """A REST `TpuClient` for `api_endpoint` (default: Google's public endpoint)."""
    if api_endpoint is None and os.environ.get(PYTEST_ENV):
        raise RealEndpointUnderTest(
            "refusing to build a Cloud TPU client for Google's endpoint under pytest: pass api_endpoint"
        )
    options = ClientOptions(api_endpoint=api_endpoint) if api_endpoint else None
    if api_endpoint and api_endpoint.startswith("http://"):
        credentials: Credentials = AnonymousCredentials()
    else:
        credentials = default_credentials()
    return tpu_v2.TpuClient(transport="rest", credentials=credentials, client_options=options)


_REST_PREFIX = re.compile(r"^(GET|POST|PATCH|PUT|DELETE) \S+: ")


def _api_message(err: gexc.GoogleAPICallError) -> str:
    """The server's own message, on one line, without the `METHOD URL:` prefix REST errors carry."""
    text = _REST_PREFIX.sub("", str(err.message or err)).strip()
    return " ".join(text.split()) or type(err).__name__


def api_error(err: gexc.GoogleAPICallError, action: str) -> GrpoctlError:
    """Map an API error from `action` (e.g. "create node v6e-test") to a one-line grpoctl error.

    Bad requests (INVALID_ARGUMENT: an accelerator type the zone does not offer, a bad runtime
    version) and permission problems are the user's to fix: exit 2. Quota and capacity
    (RESOURCE_EXHAUSTED) and everything else are infrastructure: exit 3.
    """
    msg = _api_message(err)
    if isinstance(err, gexc.BadRequest):  # INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE
        return UsageError(f"{action}: rejected by the Cloud TPU API: {msg}")
    if isinstance(err, gexc.TooManyRequests):  # RESOURCE_EXHAUSTED
        return InfraError(f"{action}: quota or capacity exhausted: {msg}")
    if isinstance(err, gexc.Forbidden | gexc.Unauthorized):
        return UsageError(
            f"{action}: permission denied ({msg}); check the project, that the TPU API is enabled, "
            "and that your account has roles/tpu.admin"
        )
    if isinstance(err, gexc.NotFound):
        return InfraError(f"{action}: not found: {msg}")
    return InfraError(f"{action}: Cloud TPU API error: {msg}")
