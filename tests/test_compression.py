"""compression=none|int8|topk for plaintext updates."""

from __future__ import annotations

import numpy as np
import pytest

from fedray.compression import CompressedUpdate, compress, decompress
from fedray.errors import ConfigError
from tests.conftest import compose


def test_int8_error_is_at_most_half_a_step_and_one_byte_per_value():
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    c = compress(x, "int8")
    y = decompress(c, x.size)
    assert y.dtype == np.float32 and c.nbytes == 1000 + 4
    assert np.max(np.abs(y - x)) <= c.scale / 2 + 1e-7
    assert np.array_equal(decompress(compress(np.zeros(5, np.float32), "int8"), 5), np.zeros(5))


def test_topk_keeps_exactly_the_largest_values():
    x = np.random.default_rng(1).normal(size=1000).astype(np.float32)
    c = compress(x, "topk", 0.05)
    y = decompress(c, x.size)
    kept = np.flatnonzero(y)
    assert len(kept) == 50 and c.nbytes == 50 * 8
    assert set(kept) == set(np.argsort(-np.abs(x))[:50]) and np.array_equal(y[kept], x[kept])


def test_decompress_rejects_updates_that_do_not_fit():
    c = compress(np.ones(10, np.float32), "topk", 0.5)
    with pytest.raises(ValueError, match="does not describe 11 values"):
        decompress(c, 11)
    bad = CompressedUpdate("topk", 10, values=c.values, indices=c.indices + np.uint32(9))
    with pytest.raises(ValueError, match="out of range"):
        decompress(bad, 10)
    with pytest.raises(ValueError, match="bad scale"):
        decompress(CompressedUpdate("int8", 2, scale=float("nan"),
                                    values=np.zeros(2, np.int8)), 2)  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["compression=int8"], "compression=int8 applies to plaintext updates; use crypto=none"),
        (["compression=topk", "crypto=none", "privacy=dp"], "cannot be used with privacy=dp"),
        (["compression=zip"], "Could not find 'compression/zip'"),
    ],
)
def test_compression_config_errors(overrides, message):
    with pytest.raises(Exception, match=message) as err:
        compose(overrides)
    if "Could not find" not in message:
        assert err.type is ConfigError


@pytest.mark.slow
def test_compressed_jobs_send_fewer_bytes_and_still_learn(ray_2cpus, tmp_path):
    from fedray.runtime.driver import run_experiment

    base = ["crypto=none", "rounds=5", "progress=false", "checkpoint.every=0"]
    out = {}
    for kind in ("int8", "topk"):  # compression=none sends 4 bytes a value (test_hf.py)
        extra = ["compression.topk_fraction=0.1"] if kind == "topk" else []
        cfg = compose([*base, f"compression={kind}", *extra])
        out[kind] = run_experiment(cfg, tmp_path / kind)
    n = out["int8"]["num_parameters"]
    per_update = {k: s["bytes_up"] / (5 * 10) for k, s in out.items()}
    # float32 deltas would be 4 n bytes: int8 sends n + 4 (one scale), top-k 10% 8 per kept
    assert per_update == {"int8": n + 4, "topk": 8 * np.ceil(0.1 * n)}
    assert out["int8"]["final_accuracy"] > 0.9 and out["topk"]["final_accuracy"] > 0.85
    assert out["int8"]["client_failures"] == out["topk"]["client_failures"] == 0
