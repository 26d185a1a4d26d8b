"""What the view pipeline checks on every sample before DALI's decoder sees it.

A JPEG whose header DALI 2.4 cannot parse does not end in an exception: its decoder's
threads corrupt memory after the error and the process crashes wherever it is (on
the CPU: a segfault in most runs from batch 48 up, 6 of 6 at batch 64). Damage inside the
entropy-coded data decodes leniently, with a warning. So ``SampleCheck`` runs in the
pipeline as a ``python_function`` ahead of the decoder: a sample whose header does
not parse is flagged, decoded as ``PLACEHOLDER_JPEG`` instead, and named (shard and
key) for the loader to raise before its batch is handed over. So is one whose header declares
more than ``shards.MAX_PIXELS`` pixels (decoding it could take the machine's memory). The ``.cls``
of each sample is checked on the way (ASCII digits naming one of the manifest's classes; of a
label pointer, the digits it ends in: ``shards.label_digits``).
"""

from __future__ import annotations

import numpy as np
import simplejpeg

from .shards import MAX_PIXELS, label_digits

__all__ = ["PLACEHOLDER_JPEG", "SampleCheck"]


# What a bad sample is decoded as, so that the decoder never sees it.
PLACEHOLDER_JPEG = np.frombuffer(
    simplejpeg.encode_jpeg(np.full((8, 8, 3), 128, np.uint8), 90, "RGB", "444"), np.uint8
)


class SampleCheck:
    """A DALI ``python_function`` over a batch: per sample 1 to decode it, 0 to decode the placeholder.

    Finds (a JPEG header that does not parse or declares too many pixels, a ``.cls`` that is
    not a class index) are kept in ``found`` as one line naming shard and key. Holds no
    reference to the pipeline (DALI would never free it).
    """

    def __init__(self, classes: int, pointer: bool = False):
        self.classes = classes
        self.pointer = pointer
        """Whether the ``cls`` components are label pointers (a manifest with ``label_key``)."""
        self.found: list[str] = []

    def __call__(self, jpegs, sources, labels=None):
        flags = []
        for i, (jpeg, source) in enumerate(zip(jpegs, sources)):
            ok = 1
            try:
                height, width = simplejpeg.decode_jpeg_header(jpeg)[:2]
            except ValueError as exc:
                ok = 0
                self.found.append(f"{_where(source)}: does not decode: {exc}")
            else:
                if width * height > MAX_PIXELS:
                    ok = 0
                    self.found.append(
                        f"{_where(source)}: declares {width}x{height} = {width * height} pixels, "
                        f"over the limit of {MAX_PIXELS}"
                    )
            if labels is not None:
                raw = labels[i].tobytes()
                digits = label_digits(raw, self.pointer)
                # At most 18 digits: int() of thousands of them is refused (and slow).
                if not (0 < len(digits) <= 18 and int(digits) < self.classes):
                    shown = raw[-20:] if self.pointer else raw[:20]
                    self.found.append(
                        f"{_where(source)}: class {shown!r} is not a class index in "
                        f"0..{self.classes - 1}"
                    )
            flags.append(np.array(ok, dtype=np.uint8))
        return flags


def _where(source: np.ndarray) -> str:
    # DALI's source_info of a webdataset sample is "path/to/shard.tar:offset:KEY.ext"
    text = np.asarray(source).tobytes().decode(errors="replace")
    tar, _, member = text.rsplit(":", 2)
    return f"{tar}: key {member.split('.')[0]}"
