"""One place for local paths and ``s3://bucket/prefix`` URIs.

Objects go through boto3; Parquet through :func:`pyarrow_fs`. Credentials come only from the environment (the
standard AWS chain: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, or an instance
role), never from a fabdistill config file. A custom endpoint (a local S3-compatible server such as moto or
MinIO) is taken from ``FABDISTILL_S3_ENDPOINT`` or, failing that, ``AWS_ENDPOINT_URL``; the region from
``AWS_DEFAULT_REGION`` / ``AWS_REGION`` (default ``us-east-1``).

A "directory" on S3 is a key prefix ending in ``/``; :func:`makedirs` is a no-op there.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from typing import Any
from urllib.parse import urlparse

_S3 = "s3://"


def is_s3(uri: str) -> bool:
    """True for ``s3://bucket/key`` URIs."""
    return str(uri).startswith(_S3)


def absolute(uri: str) -> str:
    """A local path made absolute (sweep trials run in their own folders, where relative paths would not
    resolve); s3:// URIs as they are."""
    return uri if is_s3(uri) else os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts; ``/`` for S3 URIs, ``os.path.join`` for local paths."""
    uri = str(uri)
    if is_s3(uri):
        out = uri.rstrip("/")
        for p in parts:
            p = str(p).strip("/")
            if p:
                out = out + "/" + p
        return out
    return os.path.join(uri, *[str(p) for p in parts])


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")`` (key without leading/trailing slash)."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len(_S3) :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    return bucket, key.strip("/")


def s3_endpoint() -> str | None:
    """The endpoint override from the environment, or None for AWS itself."""
    return os.environ.get("FABDISTILL_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _client() -> Any:
    # One client per (endpoint, region, credentials) seen in the environment: building a client costs
    # ~0.1-0.5 s, and keying on the environment keeps us right when it changes (tests, re-configured workers).
    import boto3

    key = (
        s3_endpoint(),
        _region(),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_SECRET_ACCESS_KEY"),
        os.environ.get("AWS_SESSION_TOKEN"),
        os.environ.get("AWS_PROFILE"),
        os.getpid(),
    )
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=key[0], region_name=key[1])
        return _CLIENTS[key]


# ------------------------------------------------------------------------------------------------------------
# bytes
# ------------------------------------------------------------------------------------------------------------


def read_bytes(uri: str) -> bytes:
    """Whole object / file as bytes. Raises FileNotFoundError when missing."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        cli = _client()
        try:
            return cli.get_object(Bucket=bucket, Key=key)["Body"].read()
        except cli.exceptions.NoSuchKey as e:
            raise FileNotFoundError(uri) from e
    with open(uri, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write bytes; atomic locally (temp file in the same folder + ``os.replace``), as an S3 PUT is."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
        return
    folder = os.path.dirname(os.path.abspath(uri))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, uri)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _s3_keys(bucket: str, prefix: str) -> list[str]:
    cli = _client()
    keys: list[str] = []
    for page in cli.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def exists(uri: str) -> bool:
    """True if a file/object or a non-empty directory/prefix exists at ``uri``."""
    uri = str(uri)
    if not is_s3(uri):
        return os.path.exists(uri)
    bucket, key = split_s3(uri)
    cli = _client()
    if key:
        try:
            cli.head_object(Bucket=bucket, Key=key)
            return True
        except cli.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
    prefix = key + "/" if key else ""
    resp = cli.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return resp.get("KeyCount", 0) > 0


def listdir(uri: str) -> list[str]:
    """Sorted names (not paths) of the immediate children of a directory / prefix."""
    uri = str(uri)
    if not is_s3(uri):
        return sorted(os.listdir(uri))
    bucket, key = split_s3(uri)
    prefix = key + "/" if key else ""
    names: set[str] = set()
    cli = _client()
    for page in cli.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        names.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
        names.update(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
    names.discard("")
    return sorted(names)


def makedirs(uri: str) -> None:
    """Create a local directory (and parents); no-op for S3, where prefixes need no creation."""
    if not is_s3(uri):
        os.makedirs(uri, exist_ok=True)


def remove_tree(uri: str) -> None:
    """Remove a file or directory tree / every object under a prefix (and the key itself). Missing is fine."""
    uri = str(uri)
    if not is_s3(uri):
        if os.path.isdir(uri) and not os.path.islink(uri):
            shutil.rmtree(uri)
        elif os.path.lexists(uri):
            os.remove(uri)
        return
    bucket, key = split_s3(uri)
    if not key:
        raise ValueError(f"refusing to remove a whole bucket: {uri!r}")
    keys = _s3_keys(bucket, key + "/")
    cli = _client()
    try:
        cli.head_object(Bucket=bucket, Key=key)
        keys.append(key)
    except cli.exceptions.ClientError:
        pass
    for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        cli.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
        )


# ------------------------------------------------------------------------------------------------------------
# directories
# ------------------------------------------------------------------------------------------------------------


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (local path or S3 prefix), keeping relative paths."""
    if not os.path.isdir(local_dir):
        raise NotADirectoryError(local_dir)
    if not is_s3(uri):
        shutil.copytree(local_dir, uri, dirs_exist_ok=True)
        return
    bucket, key = split_s3(uri)
    cli = _client()
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            cli.upload_file(path, bucket, posixpath.join(key, rel) if key else rel)


def download_dir(uri: str, local_dir: str) -> None:
    """Copy everything under ``uri`` (local directory or S3 prefix) into ``local_dir``."""
    if not is_s3(uri):
        shutil.copytree(uri, local_dir, dirs_exist_ok=True)
        return
    bucket, key = split_s3(uri)
    prefix = key + "/" if key else ""
    keys = _s3_keys(bucket, prefix)
    if not keys:
        raise FileNotFoundError(f"no objects under {uri}")
    cli = _client()
    for k in keys:
        rel = k[len(prefix) :]
        if not rel or rel.endswith("/"):
            continue
        dest = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
        cli.download_file(bucket, k, tmp)
        os.replace(tmp, dest)


# ------------------------------------------------------------------------------------------------------------
# pyarrow
# ------------------------------------------------------------------------------------------------------------


def pyarrow_fs(uri: str) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path)`` for ``uri``; for S3 the path is ``bucket/key`` (no scheme).

    The S3 filesystem gets ``endpoint_override`` / ``scheme`` from the endpoint in the environment when one is
    set, so the same call works against AWS and against a local S3 server.
    """
    import pyarrow.fs as pafs

    uri = str(uri)
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    bucket, key = split_s3(uri)
    kwargs: dict[str, Any] = {"region": _region()}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else "http://" + endpoint)
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "http"
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}" if key else bucket
