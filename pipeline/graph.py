"""The DALI graphs of the data path: a window's reader, the per-sample check, one decode, the views.

``view_pipeline`` is what a ``ViewLoader`` window runs: ``fn.readers.webdataset`` over the
window's tars and index files, ``SampleCheck`` on every sample ahead of the decoder, the image
decoded once (``mixed`` on a GPU, ``cpu`` otherwise), then two random views (or one evaluation
view). ``decode_pipeline`` reads and decodes only: the ceiling a view pipeline cannot pass.
``emission_order`` replays the order in which a window's reader hands out its samples.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from . import shards
from .augment import augment, eval_view
from .recipes import AugmentConfig, EvalConfig
from .samplecheck import PLACEHOLDER_JPEG, SampleCheck

__all__ = [
    "DTYPES",
    "decode",
    "default_threads",
    "view_pipeline",
    "window_seed",
    "decode_pipeline",
    "emission_order",
]

DTYPES = {"float16": types.FLOAT16, "float32": types.FLOAT}
"""A view dtype's name (config.DTYPE_NAMES) -> DALI's type."""


def default_threads() -> int:
    """DALI CPU threads when none are asked for: the cores per local rank."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, (os.cpu_count() or 1) // local)


def decode(jpeg, on_gpu: bool, hw_decoder_load: float):
    """Decode once: ``mixed`` on a GPU, ``cpu`` otherwise."""
    if on_gpu:
        # The hardware decoder takes its share, CUDA cores the rest; the hints
        # preallocate for ImageNet-sized images to avoid reallocations.
        return fn.decoders.image(
            jpeg,
            device="mixed",
            output_type=types.RGB,
            hw_decoder_load=hw_decoder_load,
            preallocate_width_hint=640,
            preallocate_height_hint=640,
        )
    return fn.decoders.image(jpeg, device="cpu", output_type=types.RGB)


def _reader(tars, indexes, extensions, shuffle: bool, shuffle_buffer: int, seed: int, **more):
    """The webdataset reader of a window, declared once: ``emission_order`` replays its order
    with the same arguments, so the two cannot drift apart."""
    return fn.readers.webdataset(
        paths=list(tars),
        index_paths=list(indexes),
        ext=extensions,
        missing_component_behavior="error",
        name="reader",
        random_shuffle=shuffle,
        initial_fill=shuffle_buffer,
        # Its own seed, not one drawn from the pipeline's: emission_order replays it alone.
        seed=seed,
        # Padding the last batch with repeats of the last sample keeps a partial batch's
        # padding out of evaluation (the iterator trims it).
        pad_last_batch=True,
        **more,
    )


def view_pipeline(
    tars: Sequence[str],
    indexes: Sequence[str],
    view: AugmentConfig | EvalConfig,
    check: SampleCheck,
    *,
    views: int,
    labels: bool,
    keys: bool,
    dtype: str,
    shuffle: bool,
    shuffle_buffer: int,
    prefetch: int,
    hw_decoder_load: float,
    branches: str,
    batch_size: int,
    threads: int,
    device_id: Optional[int],
    seed: int,
    checkpoint: Optional[str] = None,
):
    """An unbuilt DALI pipeline over one window and the names of its outputs, in order.

    Outputs: ``views`` random views of ``view`` (an ``AugmentConfig``) or one evaluation
    view (an ``EvalConfig``), then the ``.cls`` labels (``labels``), then each sample's
    ``source_info`` (``keys``), padded to a common length.
    """
    dali_dtype = DTYPES[dtype]
    on_gpu = device_id is not None
    extensions = ["jpg"] + (["cls"] if labels else [])

    @pipeline_def(enable_conditionals=True, enable_checkpointing=True)
    def graph():
        outputs = _reader(
            tars, indexes, extensions, shuffle, shuffle_buffer, seed, prefetch_queue_depth=prefetch
        )
        jpeg = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        source = fn.get_property(jpeg, key="source_info")
        checked = [jpeg, source] + ([outputs[1]] if labels else [])
        if fn.python_function(*checked, function=check, batch_processing=True):
            image = decode(jpeg, on_gpu, hw_decoder_load)
        else:  # the decoder never sees a header it cannot parse (samplecheck.py says why)
            placeholder = types.Constant(PLACEHOLDER_JPEG, device="cpu")
            image = decode(placeholder, on_gpu, hw_decoder_load)
        if isinstance(view, AugmentConfig):
            result = [augment(image, view, dali_dtype, branches) for _ in range(views)]
        else:
            result = [eval_view(image, view, dali_dtype)]
        if labels:
            result.append(fn.pad(outputs[1], fill_value=0))
        if keys:
            result.append(fn.pad(source, fill_value=0))
        return tuple(result)

    names = (
        (["view_q", "view_k"] if isinstance(view, AugmentConfig) and views == 2 else ["view_q"])
        + (["labels"] if labels else [])
        + (["source"] if keys else [])
    )
    extra = {"checkpoint": checkpoint} if checkpoint else {}
    pipe = graph(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch,
        **extra,
    )
    return pipe, names


def window_seed(seed: int, epoch: int, rank: int, window: int) -> int:
    """The random seed of one window's pipeline: a pure function of where it is in the run."""
    return int(np.random.SeedSequence([seed, epoch, rank, window]).generate_state(1)[0])


def decode_pipeline(
    folder: str | os.PathLike,
    batch_size: int,
    *,
    threads: int = 0,
    device_id: Optional[int] = None,
    hw_decoder_load: float = 0.75,
    prefetch: int = 2,
):
    """A built DALI pipeline that only reads and decodes, as ``ViewLoader`` does: the decoder's rate.

    ``run()`` returns a batch of decoded images; it is the ceiling a view pipeline over the
    same shards and settings cannot pass.
    """
    manifest = shards.load_manifest(folder)
    pairs = [shards.open_shard(manifest, manifest.entry(i)) for i in range(len(manifest.counts))]
    on_gpu = device_id is not None

    @pipeline_def
    def graph():
        jpeg = fn.readers.webdataset(
            paths=[str(t) for t, _ in pairs],
            index_paths=[str(i) for _, i in pairs],
            ext=["jpg"],
            missing_component_behavior="error",
            name="reader",
            pad_last_batch=True,
            prefetch_queue_depth=prefetch,
        )
        return decode(jpeg, on_gpu, hw_decoder_load)

    pipe = graph(
        batch_size=batch_size,
        num_threads=threads or max(1, os.cpu_count() or 1),
        device_id=device_id,
        prefetch_queue_depth=prefetch,
    )
    pipe.build()
    return pipe


def emission_order(
    counts: Sequence[int],
    *,
    seed: int,
    shuffle: bool,
    shuffle_buffer: int,
    batch_size: int,
    stop: int,
    workdir: str | os.PathLike,
) -> np.ndarray:
    """Positions (in index order over the window's shards) of the first ``stop`` samples the reader
    of ``view_pipeline`` hands out, for shards of ``counts`` samples, with the same settings.

    DALI's shuffle buffer draws from its random generator by sample count alone, whatever the
    bytes, so a reader over index files whose lines all point at one byte of one tiny tar, named
    by position, hands out the same order as the real window without reading it: an elastic
    resume learns which samples an old rank had read from its seed and a count.
    """
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    tar = work / "replay.tar"
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as out:
        member = tarfile.TarInfo("x.jpg")
        member.size = 1
        out.addfile(member, io.BytesIO(b"x"))
    indexes, position = [], 0
    for number, count in enumerate(counts):
        path = work / f"replay-{number}.idx"
        lines = "".join(f"jpg 512 1 p{position + i}.jpg\n" for i in range(int(count)))
        path.write_text(shards.index_header(int(count)) + lines)
        indexes.append(str(path))
        position += int(count)

    @pipeline_def
    def graph():
        jpeg = _reader([str(tar)] * len(indexes), indexes, ["jpg"], shuffle, shuffle_buffer, seed)
        return fn.pad(fn.get_property(jpeg, key="source_info"), fill_value=0)

    pipe = graph(batch_size=batch_size, num_threads=1, device_id=None)
    pipe.build()
    found: list[int] = []
    while len(found) < stop:
        (names,) = pipe.run()
        for i in range(len(names)):
            text = bytes(np.asarray(names[i])[np.asarray(names[i]) > 0].tolist()).decode()
            found.append(int(text.rsplit(":", 1)[1][1:].split(".")[0]))
    return np.asarray(found[:stop], dtype=np.int64)
