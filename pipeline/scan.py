"""Walk every sample of a shard folder, in stored order, through DALI's reader and decoder.

Used by ``moco-shards verify``: it proves that the shards read and decode exactly as
training will read them (same reader, index files, sample check and decoder), rather than
through a second implementation of the format. DALI is imported when a scan starts,
not with this module, so a caller can locate undecodable samples (and fork a child
to scan) without loading DALI into its own process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from .samplecheck import PLACEHOLDER_JPEG, SampleCheck
from .shards import MAX_PIXELS

__all__ = ["DecodedSample", "scan_shards", "first_undecodable"]


@dataclass(frozen=True)
class DecodedSample:
    height: int
    width: int
    channels: int
    metadata: bytes
    label: bytes


def _scan_pipeline(
    tars: Sequence[str], indexes: Sequence[str], decode_device: str, check: SampleCheck, **kwargs
):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=True)
    def scan():
        jpeg, metadata, label = fn.readers.webdataset(
            paths=list(tars),
            index_paths=list(indexes),
            ext=["jpg", "json", "cls"],
            missing_component_behavior="empty",
            random_shuffle=False,
            pad_last_batch=True,
            name="reader",
        )
        source = fn.get_property(jpeg, key="source_info")
        # As training does: a header that does not parse, or declares more pixels than a
        # reader decodes, never reaches the decoder (samplecheck.py says why).
        if fn.python_function(jpeg, source, function=check, batch_processing=True):
            image = fn.decoders.image(jpeg, device=decode_device, output_type=types.RGB)
        else:
            placeholder = types.Constant(PLACEHOLDER_JPEG, device="cpu")
            image = fn.decoders.image(placeholder, device=decode_device, output_type=types.RGB)
        return image.shape(), metadata, label

    return scan(**kwargs)


def scan_shards(
    tars: Sequence[Path],
    indexes: Sequence[Path],
    *,
    batch_size: int = 64,
    num_threads: Optional[int] = None,
    device_id: Optional[int] = None,
) -> Iterator[DecodedSample]:
    """Yield every sample of the given shards, in order, after DALI decoded it.

    Args:
        tars, indexes: the shards and their index files, in reading order.
        batch_size: samples per DALI batch.
        num_threads: DALI CPU threads (default: all cores).
        device_id: a GPU to decode on with the ``mixed`` decoder; None decodes on the CPU.

    Raises:
        RuntimeError: DALI's own error when a sample fails to read or decode, or the sample
            check's finding (shard and key) when its header is unsound or declares too many pixels.
    """
    check = SampleCheck(classes=0)
    pipe = _scan_pipeline(
        [str(t) for t in tars],
        [str(i) for i in indexes],
        "cpu" if device_id is None else "mixed",
        check,
        batch_size=batch_size,
        num_threads=num_threads or os.cpu_count() or 1,
        device_id=device_id,
        prefetch_queue_depth=2,
    )
    pipe.build()
    total = pipe.epoch_size("reader")
    seen = 0
    while seen < total:
        shapes, metadata, labels = pipe.run()
        if check.found:
            raise RuntimeError(check.found[0])
        shapes = shapes.as_cpu() if hasattr(shapes, "as_cpu") else shapes
        for i in range(min(len(shapes), total - seen)):
            h, w, c = (int(v) for v in np.asarray(shapes[i]))
            yield DecodedSample(
                h, w, c, np.asarray(metadata[i]).tobytes(), np.asarray(labels[i]).tobytes()
            )
        seen += len(shapes)


def first_undecodable(jpegs: Iterable[tuple[Path, str, int, int]]) -> Optional[str]:
    """The first of ``(tar, key, offset, size)`` JPEG members that fails a strict decode, as a message.

    DALI's decode errors do not say which sample failed; this finds it. The 1/8-scale
    decode still entropy-decodes every block, which is where corruption shows, as the
    shard builder's own check does.
    """
    import simplejpeg

    for tar, key, offset, size in jpegs:
        with open(tar, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        try:
            # The header alone must be sound too: libjpeg stops at a scan it cannot parse.
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
            if width * height > MAX_PIXELS:  # never decoded, not even at 1/8
                return (
                    f"{tar}: key {key}: declares {width}x{height} = {width * height} pixels, "
                    f"over the limit of {MAX_PIXELS}"
                )
            simplejpeg.decode_jpeg(data, "GRAY", min_factor=8, strict=True)
        except ValueError as exc:
            return f"{tar}: key {key}: does not decode: {exc}"
    return None
