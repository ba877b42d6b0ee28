"""Shards in S3-protocol object stores (AWS S3, MinIO, Ceph, R2...), through boto3 (the ``s3`` extra).

Two ways to train from a bucket, both streaming (nothing is downloaded first):

* ``s3://bucket/prefix/train-000000.tar`` URLs, read in the process by :func:`open_object`;
* ``pipe:python -m tldist.s3 s3://bucket/prefix/train-000000.tar``: this module as a ``cat`` that
  writes the object to stdout (the same as ``pipe:aws s3 cp s3://... -`` without the AWS CLI).

The client is boto3's default: credentials, region and endpoint come from the usual ``AWS_*`` variables
and files (``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` for a store other than AWS). A stream that breaks
off mid-object is re-opened by :func:`tldist.data.stream.read_shard` (see :mod:`tldist.data.retry`). The module
sits outside :mod:`tldist.data` and imports nothing but boto3, so ``python -m tldist.s3`` starts in a fraction of a
second (a ``pipe:`` command runs once per shard read).
"""

from __future__ import annotations

import os
import sys
from typing import Any, BinaryIO, Optional

from tldist.errors import DataError

CHUNK = 1 << 20
"""Bytes per read when copying an object to stdout."""

_client: Optional[tuple[int, Any]] = None  # (pid, client): a forked loader worker makes its own


def split_url(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``; :class:`DataError` naming the URL when it has no key."""
    bucket, _, key = url[len("s3://"):].partition("/") if url.startswith("s3://") else ("", "", "")
    if not bucket or not key:
        raise DataError(f"'{url}' is not an S3 object URL: write s3://BUCKET/KEY")
    return bucket, key


def client() -> Any:
    """This process's boto3 S3 client (one per process: boto3 clients must not cross a fork)."""
    global _client
    if _client is None or _client[0] != os.getpid():
        try:
            import boto3
        except ImportError:
            raise DataError("s3:// shards need boto3: pip install 'tldist[s3]'") from None
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        _client = (os.getpid(), boto3.session.Session().client("s3", region_name=region))
    return _client[1]


def open_object(url: str, offset: int = 0) -> BinaryIO:
    """A read-only, non-seekable stream of the object at ``s3://bucket/key``, from byte ``offset`` on.

    Raises :class:`DataError` naming the URL when the object cannot be opened (missing, forbidden, no
    endpoint); errors while reading (a dropped connection) propagate from ``read``.
    """
    bucket, key = split_url(url)
    extra = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        return client().get_object(Bucket=bucket, Key=key, **extra)["Body"]
    except DataError:
        raise
    except Exception as e:  # botocore's ClientError, EndpointConnectionError, NoCredentialsError...
        raise DataError(f"cannot open '{url}': {type(e).__name__}: {e}") from None


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m tldist.s3 s3://bucket/key``: write the object to stdout (exit 1 with one line on error)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tldist.s3 s3://BUCKET/KEY  (writes the object to stdout)", file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    try:
        body = open_object(args[0])
        while True:
            chunk = body.read(CHUNK)
            if not chunk:
                break
            out.write(chunk)
        out.flush()
    except BrokenPipeError:  # the reader stopped early (it had what it needed)
        return 0
    except Exception as e:  # DataError, or the connection breaking off mid-object
        print(f"tldist.s3: error: {args[0]}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
