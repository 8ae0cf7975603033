"""Where bytes live: the fsspec/s3fs options for `s3://` URLs, built in one place from the manifest's
`data.s3` section, which the shards, the checkpoints and the frozen networks' weights all share.

Credentials stay in the environment or the AWS profile; nothing here is ever written to the run directory.
"""

from __future__ import annotations


def s3_options(endpoint_url: str | None, profile: str | None, anon: bool) -> dict:
    """fsspec/s3fs options for an endpoint (None: AWS's), a named profile and anonymous access."""
    opts: dict = {"anon": anon}
    if profile:
        opts["profile"] = profile
    if endpoint_url:
        opts["client_kwargs"] = {"endpoint_url": endpoint_url}
    return opts


def storage_options(s3) -> dict:
    """The options of a manifest's `data.s3` section (an S3Config)."""
    return s3_options(s3.endpoint_url, s3.profile, s3.anon)
