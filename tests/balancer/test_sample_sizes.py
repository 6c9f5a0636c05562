"""NaN, infinite and negative sizes in a descriptor: an error naming the sample, the field and the value."""

import io
import json
import math

import numpy as np
import pytest

from balancer import BalancedStream, BalancerConfig, CorruptSample, Sample, SkippedSampleWarning
from lightning_bigmac.testing.reliability import record

BAD = {
    "nan-tokens": ({"text_tokens": math.nan}, r"text_tokens=nan"),
    "inf-tokens": ({"text_tokens": math.inf}, r"text_tokens=inf"),
    "negative-tokens": ({"text_tokens": -3}, r"text_tokens=-3"),
    "nan-height": ({"images": ((math.nan, 64),)}, r"images\[0\]=\(nan, 64\).*height=nan"),
    "inf-width": ({"images": ((64, 64), (32, -math.inf))}, r"images\[1\]=\(32, -inf\).*width=-inf"),
    "inf-video-height": ({"videos": ((8, math.inf, 64),)}, r"videos\[0\]=\(8, inf, 64\).*height=inf"),
    "negative-frames": ({"videos": ((-4, 64, 64),)}, r"videos\[0\]=\(-4, 64, 64\).*frames=-4"),
    "nan-output": ({"outputs": ((512, math.nan),)}, r"outputs\[0\]=\(512, nan\).*width=nan"),
    "one-dim": ({"images": ((64,),)}, r"images\[0\]=\(64,\).*\(height, width\)"),
    "not-a-shape": ({"images": (64,)}, r"images\[0\]=64.*\(height, width\)"),
}


@pytest.mark.parametrize(("fields", "message"), BAD.values(), ids=BAD.keys())
def test_a_bad_size_names_the_sample_the_field_and_the_value(fields, message):
    with pytest.raises(CorruptSample, match=rf"^sample 'laion/7': {message}"):
        Sample(key="laion/7", **fields)


def test_integral_numbers_of_any_type_are_accepted():
    sample = Sample(key="k", text_tokens=np.int64(12), images=((np.float32(64.0), 48.0),))
    assert sample.text_tokens == 12 and sample.images == ((64, 48),)
    assert type(sample.images[0][0]) is int


def test_a_stream_skips_and_counts_a_sample_with_a_bad_size():
    def describe(element):
        return element["id"], Sample(key=element["id"], text_tokens=20, images=(element["size"],))

    elements = [{"id": f"s{i}", "size": (64, 64)} for i in range(8)]
    elements.insert(3, {"id": "nan-image", "size": (math.nan, 64)})
    config = BalancerConfig(pipeline_size=2, microbatches=2, token_cap=4096)
    stream = BalancedStream(lambda epoch: iter(elements), config, describe=describe)
    with pytest.warns(SkippedSampleWarning, match=r"'nan-image' \(corrupt: images\[0\]=\(nan, 64\)"):
        steps = list(stream)
    assert steps[-1].state["counters"] == {"corrupt": 1}
    assert sorted(k for step in steps for mb in step.keys for k in mb) == sorted(f"s{i}" for i in range(8))
    record(
        "a sample whose image size is NaN",
        "skipped with a warning naming its key, the field and the value; counted as corrupt",
        section="Bad data",
    )


def test_decode_sample_names_a_non_finite_size_in_the_metadata():
    pytest.importorskip("webdataset")
    from balancer.webdataset import decode_sample

    for meta, message in [
        ({"text_tokens": math.inf}, r"text_tokens=inf"),
        ({"text_tokens": 5, "outputs": [[512, math.nan]]}, r"outputs\[0\]=\[512, nan\].*width=nan"),
    ]:
        raw = {"__key__": "000001", "__url__": "/data/shard-3.tar", "json": json.dumps(meta).encode()}
        with pytest.raises(CorruptSample, match=rf"^sample 'shard-3.tar/000001': {message}"):
            decode_sample(raw)
    video = io.BytesIO()
    np.save(video, np.zeros((0, 8, 8), dtype=np.uint8))
    raw = {"__key__": "2", "__url__": "s.tar", "json": b'{"text_tokens": 5}', "video.npy": video.getvalue()}
    with pytest.raises(CorruptSample, match=r"^sample 's.tar/2': videos\[0\]=\(0, 8, 8\).*frames=0"):
        decode_sample(raw)
