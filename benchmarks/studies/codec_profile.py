"""Where a shard build's time goes, per image: the profile behind the build figures.

Times each stage of the baseline (PIL decode, convert, encode, ShardWriter) and of
the builder (header parse, the pass-through path's strict 1/8-scale decode, the
re-encode path's full decode and encode, tar members and sha256) on the same
photographs, in one process, as the median over repetitions after a warm-up.

    python -m benchmarks.studies.codec_profile --photos DIR --out RESULT.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import simplejpeg
import webdataset
from PIL import Image

from moco_dali.tools.bench.machine import describe
from moco_dali.tools.shards.imageprep import PrepSettings, parse_jpeg_header
from moco_dali.tools.shards.inputs import InputRef
from moco_dali.tools.shards.tar import encode_sample
from moco_dali.tools.shards.writer import ShardWriter, process_input, read_input


def per_image_ms(fn, items, reps: int) -> float:
    for item in items[:20]:
        fn(item)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for item in items:
            fn(item)
        times.append((time.perf_counter() - start) / len(items) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    data = [p.read_bytes() for p in sorted(args.photos.glob("*.jpg"))[: args.count]]
    pixels = [simplejpeg.decode_jpeg(d, "RGB") for d in data]
    pil_rgb = [Image.fromarray(p) for p in pixels]
    encoded = [simplejpeg.encode_jpeg(p, 90, "RGB", "420") for p in pixels]
    scratch = tempfile.mkdtemp()
    sink = webdataset.ShardWriter(f"{scratch}/p-%06d.tar", maxcount=10**9, verbose=0)
    counter = iter(range(10**9))

    def pil_save(image):
        image.save(io.BytesIO(), "JPEG", quality=90)

    def members_and_hash(jpeg):
        blob, _ = encode_sample("0000000000", [("jpg", jpeg), ("json", b"{}")])
        hashlib.sha256(blob).digest()

    paths = [str(p) for p in sorted(args.photos.glob("*.jpg"))[: args.count]]
    refs = [(f"{i:010d}", InputRef(p, p, name=p), None) for i, p in enumerate(paths)]
    shard = ShardWriter(Path(scratch), "profile")
    passthrough, reencode = PrepSettings(), PrepSettings(reencode="always")

    def whole(item, prep):
        result = process_input(item, prep, 1 << 28)
        shard.add(result[1], result[2])

    stages = {
        "baseline: PIL open + decode": (lambda d: Image.open(io.BytesIO(d)).load(), data),
        "baseline: convert('RGB')": (lambda im: im.convert("RGB"), pil_rgb),
        "baseline: PIL save JPEG q90": (pil_save, pil_rgb),
        "baseline: ShardWriter.write": (
            lambda j: sink.write({"__key__": f"{next(counter):08d}", "jpg": j}),
            encoded,
        ),
        "ours: parse JPEG header": (parse_jpeg_header, data),
        "ours: strict 1/8-scale decode (pass-through check)": (
            lambda d: simplejpeg.decode_jpeg(d, "GRAY", min_factor=8, strict=True),
            data,
        ),
        "ours: strict full decode to RGB (re-encode path)": (
            lambda d: simplejpeg.decode_jpeg(d, "RGB", strict=True),
            data,
        ),
        "ours: encode q90 4:2:0 (re-encode path)": (
            lambda p: simplejpeg.encode_jpeg(p, 90, "RGB", "420"),
            pixels,
        ),
        "ours: tar members + sha256": (members_and_hash, encoded),
        "ours: strict full decode, fast DCT and upsampling": (
            lambda d: simplejpeg.decode_jpeg(
                d, "RGB", fastdct=True, fastupsample=True, strict=True
            ),
            data,
        ),
        "ours: read the file (page cache, size-capped)": (
            lambda p: read_input(InputRef(p, p), 1 << 28),
            paths,
        ),
        "ours: whole pass-through path, one process (read, check, members, sha256, tar write)": (
            lambda item: whole(item, passthrough),
            refs,
        ),
        "ours: whole re-encode path, one process": (lambda item: whole(item, reencode), refs),
    }
    results = {name: per_image_ms(fn, items, args.reps) for name, (fn, items) in stages.items()}
    sink.close()
    shard.abandon()
    record = {
        "benchmark": "codec_profile",
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe(),
        "photos": {"count": len(data), "mean_kb": round(sum(map(len, data)) / len(data) / 1000, 1)},
        "reps": args.reps,
        "ms_per_image": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"per-image cost, {len(data)} photos of {record['photos']['mean_kb']} KB, median of {args.reps}"
    )
    for name, ms in results.items():
        print(f"  {name:52s} {ms:6.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
