"""Building a Cloud TPU API client (and a session for the one Compute Engine read grpoctl makes).

Credentials come from Application Default Credentials, except for a plain `http://` endpoint (the fake
API in tests, or a local proxy), which gets anonymous credentials. (The tests' conftest makes every ADC
lookup fail, so a test that forgets `api_endpoint` gets the no-credentials error, never Google.)
"""

from __future__ import annotations

import requests
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import tpu_v2

from orchestrator.cloud.errors import api_error  # noqa: F401 - re-exported: the mapping lives there
from orchestrator.errors import UsageError

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


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
    options = ClientOptions(api_endpoint=api_endpoint) if api_endpoint else None
    if api_endpoint and api_endpoint.startswith("http://"):
        credentials: Credentials = AnonymousCredentials()
    else:
        credentials = default_credentials()
    return tpu_v2.TpuClient(transport="rest", credentials=credentials, client_options=options)


def compute_base(api_endpoint: str | None) -> str:
    """Where Compute Engine's API is (project metadata): a plain `http://` endpoint (the fake API, a local
    proxy) serves it too; otherwise Google's."""
    if api_endpoint and api_endpoint.startswith("http://"):
        return api_endpoint.rstrip("/")
    return "https://compute.googleapis.com"


def build_session(api_endpoint: str | None = None) -> requests.Session:
    """An HTTP session for Google REST calls the TPU client does not make (Compute's projects.get): the
    same credentials as `build_client` (none for a plain `http://` endpoint)."""
    if api_endpoint and api_endpoint.startswith("http://"):
        return requests.Session()
    from google.auth.transport.requests import AuthorizedSession

    return AuthorizedSession(default_credentials())
