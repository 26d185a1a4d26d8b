"""Objects in S3-compatible storage (AWS S3, MinIO, Ceph, R2, GCS's S3 API): ``s3://bucket/key``
addresses, one client, and the transfers the tools make, each verified and each failing in one
line that names the object.

The client is boto3's with the standard credential chain (environment, shared files, instance
roles) and endpoint settings (``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` for a store that
is not AWS), connect and read timeouts, and botocore's standard retry mode, which backs off and
retries throttling (503 SlowDown), server errors and refused connections. What botocore does not
retry, a connection dropped while a body streams, is retried here from the byte it reached. A
permanent fault (no such object or bucket, access denied, a size or digest that is not the
manifest's) is a ``StoreError``. boto3 is imported on first use: it is the optional ``s3`` extra.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from .files import sha256_of

__all__ = ["SCHEME", "StoreError", "ObjectURL", "Store", "is_url", "in_parallel"]

SCHEME = "s3://"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_CHUNK = 8 << 20
_WHOLE_READS = 3
_MISSING = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}


class StoreError(ValueError):
    """An object that cannot be read or written for good (retries spent or a permanent fault)."""


def in_parallel(jobs: int, calls: Iterable[tuple[Callable, tuple]]) -> Iterator[Any]:
    """``function(*args)`` of each call on ``jobs`` threads, results as they finish, with at most
    ``2 * jobs`` calls in flight (a listing of any length is never held whole). The first
    failure is raised and the calls still waiting are cancelled."""
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        pending: set[concurrent.futures.Future] = set()
        try:
            for function, args in calls:
                while len(pending) >= 2 * jobs:
                    done, pending = concurrent.futures.wait(
                        pending, return_when=concurrent.futures.FIRST_COMPLETED
                    )
                    yield from (future.result() for future in done)
                pending.add(pool.submit(function, *args))
            for future in concurrent.futures.as_completed(pending):
                yield future.result()
        finally:
            for future in pending:
                future.cancel()


def is_url(text: str | os.PathLike) -> bool:
    return str(text).startswith(SCHEME)


@dataclass(frozen=True)
class ObjectURL:
    """``s3://bucket/key``; a key without a trailing slash names a prefix as well."""

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, text: str) -> "ObjectURL":
        if not is_url(text):
            raise StoreError(f"{text}: not an s3:// address")
        bucket, _, key = text[len(SCHEME) :].partition("/")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise StoreError(f"{text}: {bucket!r} is not an S3 bucket name")
        if any(ord(c) < 32 for c in key) or len(key.encode()) > 1024:
            raise StoreError(f"{text}: not an S3 key (control characters, or over 1024 bytes)")
        return cls(bucket, key.strip("/"))

    def child(self, name: str) -> "ObjectURL":
        return ObjectURL(self.bucket, f"{self.key}/{name}" if self.key else name)

    def file(self, name: str) -> "ObjectURL":
        """``child(name)`` for a name a manifest gives: a plain file of this folder (no folder,
        not hidden), which is also safe as a local file name; anything else is a StoreError."""
        if Path(name).name != name or name.startswith("."):
            raise StoreError(f"{self}: the manifest names {name!r}, not a file of its folder")
        return self.child(name)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"


class Store:
    """One client for the process (boto3's clients are thread-safe); ``attempts`` counts the
    first try, for botocore's retries and for a body read again from where it broke
    (``AWS_MAX_ATTEMPTS`` in the environment overrides it)."""

    def __init__(
        self, attempts: int = 8, connect_timeout: float = 10.0, read_timeout: float = 60.0
    ):
        try:  # the optional s3 extra; imported here so that local runs never load it
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreError("s3:// needs boto3: pip install 'moco-dali[s3]'") from None
        # The tools log at INFO; the SDK's INFO lines (where it found credentials) are not theirs.
        for name in ("boto3", "botocore", "s3transfer", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # AWS_MAX_ATTEMPTS, the SDKs' own setting, wins over the default, as in every AWS tool
        given = os.environ.get("AWS_MAX_ATTEMPTS", "")
        if given and not (given.isascii() and given.isdigit() and 1 <= int(given) <= 100):
            raise StoreError(f"AWS_MAX_ATTEMPTS={given[:20]!r}: not a number of tries in 1..100")
        attempts = self.attempts = int(given or attempts)
        config = Config(
            retries={"mode": "standard", "max_attempts": attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        self.client = boto3.session.Session().client("s3", config=config)

    # ------------------------------------------------------------------ errors

    def _error(self, url: ObjectURL, exc: Exception) -> StoreError:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _MISSING:
                return StoreError(f"{url}: no such object")
            if code == "NoSuchBucket":
                return StoreError(f"{url}: no such bucket {url.bucket!r}")
            if code in _DENIED:
                return StoreError(f"{url}: access denied ({code}); check the credentials")
            message = str(error.get("Message", "")).splitlines()[0] if error.get("Message") else ""
            return StoreError(f"{url}: {code or 'error'}{f': {message}' if message else ''}")
        if isinstance(exc, BotoCoreError):
            endpoint = self.client.meta.endpoint_url
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return StoreError(f"{url}: {reason} (endpoint {endpoint}, after {self.attempts} tries)")
        return StoreError(f"{url}: {exc}")

    # ------------------------------------------------------------------ reads

    def head(self, url: ObjectURL) -> Optional[dict]:
        """``{"size", "sha256"}`` of an object (sha256 as its writer recorded it, or None);
        None when there is no such object."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            reply = self.client.head_object(Bucket=url.bucket, Key=url.key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _MISSING:
                return None
            raise self._error(url, exc) from None
        except BotoCoreError as exc:
            raise self._error(url, exc) from None
        return {"size": reply["ContentLength"], "sha256": reply.get("Metadata", {}).get("sha256")}

    def read(self, url: ObjectURL, max_bytes: int) -> bytes:
        """A whole small object (a manifest), refused unread when it is over ``max_bytes``."""
        found = self.head(url)
        if found is None:
            raise StoreError(f"{url}: no such object")
        if found["size"] > max_bytes:
            raise StoreError(f"{url}: {found['size']} bytes, over the {max_bytes} read for it")
        from botocore.exceptions import FlexibleChecksumError

        for _ in range(_WHOLE_READS):  # bytes the store's checksum refuses are read again
            try:
                return b"".join(self._stream(url, found["size"]))
            except FlexibleChecksumError:
                continue
        raise StoreError(
            f"{url}: its bytes do not match (the store's checksum) in {_WHOLE_READS} reads; the "
            "object is damaged or changed"
        )

    def download(
        self,
        url: ObjectURL,
        dest: Path,
        size: Optional[int],
        sha256: str,
        *,
        limit: Optional[int] = None,
    ) -> Path:
        """``url`` into ``dest``, named only once its size and sha256 are the ones given.

        A ``size`` of None (an index: the manifest records its digest only) takes any size up
        to ``limit``; more is refused as it streams.

        Written to ``dest``'s folder under a temporary name; a body cut off is read on from
        the byte it reached (``attempts`` times in all); bytes that are not the ones wanted
        (the store's checksum or the manifest's sha256) are read again whole, up to three
        times, as a flip on the wire would be; a mismatch that stays removes what was read.
        """
        from botocore.exceptions import FlexibleChecksumError

        partial = dest.with_name(f".{dest.name}.partial")
        try:
            for _ in range(_WHOLE_READS):
                digest, got = hashlib.sha256(), 0
                try:
                    with open(partial, "wb") as f:
                        for block in self._stream(url, size, limit):
                            digest.update(block)
                            f.write(block)
                            got += len(block)
                except FlexibleChecksumError:
                    found = "the store's checksum"
                else:
                    if size is not None and got != size:
                        raise StoreError(f"{url}: {got} bytes, the manifest says {size}")
                    if digest.hexdigest() == sha256:
                        os.replace(partial, dest)
                        return dest
                    found = f"sha256 {digest.hexdigest()[:16]}..., the manifest's {sha256[:16]}..."
            raise StoreError(
                f"{url}: its bytes do not match ({found}) in {_WHOLE_READS} reads; the object is "
                "damaged or changed"
            )
        finally:
            partial.unlink(missing_ok=True)

    def _stream(
        self, url: ObjectURL, size: Optional[int], limit: Optional[int] = None
    ) -> Iterator[bytes]:
        """The object's bytes in blocks; a broken body is asked for again from where it broke."""
        from botocore.exceptions import BotoCoreError, ClientError, FlexibleChecksumError

        got, failures = 0, 0
        while True:
            try:
                extra = {"Range": f"bytes={got}-"} if got else {}
                reply = self.client.get_object(Bucket=url.bucket, Key=url.key, **extra)
                body = reply["Body"]
                while block := body.read(_CHUNK):
                    if size is not None and got + len(block) > size:
                        raise StoreError(f"{url}: more than the {size} bytes the manifest says")
                    if limit is not None and got + len(block) > limit:
                        raise StoreError(f"{url}: more than the {limit} bytes allowed for it")
                    got += len(block)
                    yield block
                return  # a body that ends short is the caller's size mismatch
            except ClientError as exc:
                raise self._error(url, exc) from None
            except FlexibleChecksumError:
                raise  # the bytes read are wrong, not short: the caller reads the object again
            except BotoCoreError as exc:  # a body cut off, or the connection refused after retries
                failures += 1
                if failures >= self.attempts:
                    raise self._error(url, exc) from None
                time.sleep(min(2.0, 0.05 * 2**failures))

    def list(self, prefix: ObjectURL) -> Iterator[tuple[str, int]]:
        """``(key, size)`` under ``prefix/``, a page at a time."""
        from botocore.exceptions import BotoCoreError, ClientError

        pages = self.client.get_paginator("list_objects_v2")
        try:
            for page in pages.paginate(Bucket=prefix.bucket, Prefix=f"{prefix.key}/".lstrip("/")):
                for item in page.get("Contents", []):
                    yield item["Key"], item["Size"]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(prefix, exc) from None

    # ------------------------------------------------------------------ writes

    def upload(self, path: Path, url: ObjectURL, sha256: Optional[str] = None) -> None:
        """``path`` as ``url``, its sha256 recorded in the object's metadata.

        An object is complete before it has a name (a single PUT, or a multipart upload that
        the store names only when its last part is in), so a reader never sees half of one.
        """
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        sha256 = sha256 or sha256_of(path)
        try:
            self.client.upload_file(
                str(path),
                url.bucket,
                url.key,
                ExtraArgs={"Metadata": {"sha256": sha256}},
                Config=TransferConfig(multipart_threshold=64 << 20, use_threads=False),
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(url, exc) from None
        except Exception as exc:  # s3transfer wraps the client's errors in its own
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, (ClientError, BotoCoreError)):
                raise self._error(url, cause) from None
            raise
        found = self.head(url)
        if found is None or found["size"] != path.stat().st_size:
            raise StoreError(f"{url}: the store holds {found and found['size']} bytes after upload")
