"""The object-store client against a real S3 endpoint (moto's server on 127.0.0.1) through a
proxy that throttles, cuts bodies off, flips bytes and denies: transient faults are ridden
out, permanent ones end in one line naming the object."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from moco_dali.common.store import ObjectURL, Store, StoreError


def _object(s3, tmp_path, size=3 << 20) -> tuple[ObjectURL, bytes]:
    bucket, _ = s3
    data = os.urandom(size)
    (tmp_path / "src").write_bytes(data)
    url = ObjectURL.parse(f"s3://{bucket}/data/blob.bin")
    Store().upload(tmp_path / "src", url)
    return url, data


def test_a_download_rides_out_throttling_and_a_body_cut_off(s3, tmp_path):
    url, data = _object(s3, tmp_path)
    _, faults = s3
    faults.log.clear()
    faults.throttle, faults.cut = 2, 1
    dest = tmp_path / "got.bin"
    Store(attempts=5).download(url, dest, len(data), hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data and list(tmp_path.glob(".*partial")) == []
    gets = [path for method, path in faults.log if method == "GET"]
    assert len(gets) >= 4  # two throttled, one cut off, the rest read from where it broke
    assert faults.throttle == 0 and faults.cut == 0


def test_a_corrupted_object_is_refused_by_name_and_nothing_is_left(s3, tmp_path):
    url, data = _object(s3, tmp_path, size=1000)
    s3[1].corrupt = True
    dest = tmp_path / "got.bin"
    with pytest.raises(StoreError) as error:
        Store().download(url, dest, len(data), hashlib.sha256(data).hexdigest())
    message = str(error.value)
    assert message.startswith(f"{url}: its bytes do not match (") and "in 3 reads" in message
    assert message.endswith("the object is damaged or changed") and "\n" not in message
    assert not dest.exists() and list(tmp_path.glob(".*partial")) == []
    with pytest.raises(StoreError, match="more than the 999 bytes the manifest says"):
        s3[1].corrupt = False
        Store().download(url, dest, 999, "0" * 64)


def test_permanent_faults_are_one_line_naming_the_object(s3, tmp_path, monkeypatch):
    bucket, faults = s3
    missing = ObjectURL.parse(f"s3://{bucket}/no/such.tar")
    with pytest.raises(StoreError, match=f"^{missing}: no such object$"):
        Store().read(missing, 100)
    url, _ = _object(s3, tmp_path, size=5000)
    with pytest.raises(StoreError, match=f"^{url}: 5000 bytes, over the 100 read for it$"):
        Store().read(url, 100)
    faults.deny = True
    with pytest.raises(StoreError, match=rf"^{url}: access denied \(.*\); check the credentials$"):
        Store(attempts=2).read(url, 10_000)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StoreError) as error:
        Store(attempts=2, connect_timeout=1).read(url, 10_000)
    message = str(error.value)
    assert message.startswith(f"{url}: ") and "after 2 tries" in message and "\n" not in message
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    "text, message",
    [
        ("/data/shards", "not an s3:// address"),
        ("s3://Bucket/x", "is not an S3 bucket name"),
        ("s3://ab/x", "is not an S3 bucket name"),
        ("s3://a..b/x", "is not an S3 bucket name"),
        ("s3://bucket/a\nb", "not an S3 key"),
    ],
)
def test_addresses_are_checked(text, message):
    with pytest.raises(StoreError, match=message):
        ObjectURL.parse(text)


def test_an_address_names_its_objects():
    url = ObjectURL.parse("s3://my-bucket/some/prefix/")
    assert (url.bucket, url.key) == ("my-bucket", "some/prefix")
    assert str(url.child("manifest.json")) == "s3://my-bucket/some/prefix/manifest.json"
    assert str(ObjectURL.parse("s3://my-bucket").child("a.tar")) == "s3://my-bucket/a.tar"
    # What a manifest names is a plain file of the folder, in the store and on local disk alike
    assert str(url.file("shard-000001.tar")) == "s3://my-bucket/some/prefix/shard-000001.tar"
    for bad in ("../other/shard.tar", "sub/shard.tar", ".hidden.tar", "/etc/passwd"):
        with pytest.raises(StoreError, match=r"^s3://my-bucket/some/prefix: the manifest names"):
            url.file(bad)
