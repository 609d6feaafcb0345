"""Properties of the BatchCrypt packing (fedray/crypto/codec.py), checked with Hypothesis.

Paillier adds plaintexts modulo n, and every packed sum stays below 2^(key_bits-1) < n,
so adding the packed integers here is exactly what the encrypted sum decrypts to.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedray.crypto.codec import PackedPaillierCodec, StatsCodec
from fedray.privacy.mechanisms import count_clipped

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def codecs(draw):
    """A codec that fits its key, from tiny grids (2 bits) to the default 16."""
    quant_bits = draw(st.integers(2, 16))
    max_summands = draw(st.integers(1, 64))
    key_bits = draw(st.sampled_from([128, 512, 1024]))
    num_values = draw(st.integers(1, 40))
    clip = draw(st.sampled_from([0.01, 0.5, 1.0, 3.0]))
    codec = PackedPaillierCodec(
        key_bits=key_bits,
        num_values=num_values,
        max_summands=max_summands,
        quant_bits=quant_bits,
        clip=clip,
    )
    return codec


def _edge_values(draw, codec, size):
    """Values at and around the clip edges (and beyond), where carries would start."""
    c = codec.clip
    edges = [-2 * c, -c, -c + codec.step / 3, 0.0, c - codec.step / 3, c, 2 * c]
    return np.array(
        draw(
            st.lists(
                st.one_of(
                    st.sampled_from(edges), st.floats(-2 * c, 2 * c, allow_nan=False, width=64)
                ),
                min_size=size,
                max_size=size,
            )
        )
    )


@SETTINGS
@given(data=st.data())
def test_no_carry_between_slots_at_max_summands(data):
    codec = data.draw(codecs())
    count = codec.max_summands
    vectors = [_edge_values(data.draw, codec, codec.num_values) for _ in range(count)]
    # Noise in grid steps at its extremes too: the encoder clips it back to [-Q, Q].
    noise = [
        np.array(
            data.draw(
                st.lists(
                    st.sampled_from([-3 * codec.qmax, 0, 3 * codec.qmax]),
                    min_size=codec.num_values,
                    max_size=codec.num_values,
                )
            )
        )
        if data.draw(st.booleans())
        else None
        for _ in range(count)
    ]
    packed = [codec.encode(v, n) for v, n in zip(vectors, noise, strict=True)]
    summed = [sum(col) for col in zip(*packed, strict=True)]
    assert all(0 <= m < 1 << (codec.key_bits - 1) for m in summed)
    expected = np.zeros(codec.num_values, dtype=np.int64)
    for v, n in zip(vectors, noise, strict=True):
        q = codec.quantize(v)
        if n is not None:
            q = np.clip(q + n, -codec.qmax, codec.qmax)
        expected += q
    # Slot for slot, the sum of the packings is the packing of the sum: nothing carried.
    decoded = codec.decode_sum(summed, count)
    np.testing.assert_array_equal(np.rint(decoded / codec.step).astype(np.int64), expected)
    assert codec.encode_sum(list(zip(vectors, noise, strict=True))) == summed


@SETTINGS
@given(data=st.data())
def test_round_trip_within_quantization_error(data):
    codec = data.draw(codecs())
    c = codec.clip
    values = np.array(
        data.draw(
            st.lists(
                st.floats(-c, c, allow_nan=False, width=64),
                min_size=codec.num_values,
                max_size=codec.num_values,
            )
        )
    )
    decoded = codec.decode_sum(codec.encode(values), 1)
    assert np.abs(decoded - values).max() <= codec.step / 2 + 1e-12 * c
    assert np.abs(decoded - values).max() <= codec.error_bound(1, 1.0) + 1e-12 * c


@SETTINGS
@given(data=st.data())
def test_values_outside_the_clip_come_back_clipped(data):
    codec = data.draw(codecs())
    c = codec.clip
    values = _edge_values(data.draw, codec, codec.num_values)
    decoded = codec.decode_sum(codec.encode(values), 1)
    outside = np.abs(values) >= c
    np.testing.assert_allclose(
        decoded[outside], np.sign(values[outside]) * c, rtol=0, atol=1e-12 * c
    )
    assert np.all(np.abs(decoded) <= c * (1 + 1e-12))


@SETTINGS
@given(data=st.data())
def test_clipped_values_are_counted(data):
    """What a client counts as clipped (``values_clipped``, summed in the encrypted
    statistics) is exactly the values the codec sends as +-clip instead of themselves;
    every other value comes back within half a grid step."""
    codec = data.draw(codecs())
    c = codec.clip
    values = _edge_values(data.draw, codec, codec.num_values)
    decoded = codec.decode_sum(codec.encode(values), 1)
    outside = np.abs(values) > c
    assert count_clipped(values, c) == int(outside.sum())
    np.testing.assert_allclose(decoded[outside], np.sign(values[outside]) * c, atol=1e-12 * c)
    assert np.all(np.abs(decoded[~outside] - values[~outside]) <= codec.step / 2 + 1e-12 * c)


@SETTINGS
@given(
    max_summands=st.integers(1, 64),
    counts=st.lists(st.integers(0, 2**40), min_size=1, max_size=64),
    fractions=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=64),
)
def test_stats_sum_exactly_without_carries(max_summands, counts, fractions):
    k = min(max_summands, len(counts), len(fractions))
    codec = StatsCodec(key_bits=1024, max_summands=max_summands)
    stats = [{"values_clipped": counts[i], "weighted_train_loss": fractions[i]} for i in range(k)]
    summed = codec.decode_sum(
        [sum(col) for col in zip(*(codec.encode_sum([s]) for s in stats), strict=True)]
    )
    assert summed["values_clipped"] == sum(counts[:k])
    assert summed["weighted_train_loss"] == pytest.approx(sum(fractions[:k]), abs=k * 2**-24)
    assert summed["val_weight"] == 0 and summed["weight"] == 0


def test_stats_saturate_and_count_bad_values_as_zero():
    """A value past the slot's range saturates at its largest value; NaN, infinite and
    negative values count 0 (they would otherwise borrow from the neighbouring slot)."""
    codec = StatsCodec(key_bits=1024, max_summands=4)
    top = ((1 << codec.value_bits) - 1) / (1 << codec.frac_bits)
    bad = {"values_clipped": 2.0**50, "weighted_train_loss": float("nan")}
    bad.update(weighted_val_loss=-5.0, weighted_val_accuracy=float("inf"))
    summed = codec.decode_sum(codec.encode_sum([bad, {"val_weight": 3}]))
    assert summed["values_clipped"] == top
    assert summed["weighted_train_loss"] == summed["weighted_val_loss"] == 0
    assert summed["weighted_val_accuracy"] == 0
    assert summed["val_weight"] == 3


def test_bad_input_is_one_clear_error_and_the_error_bound_is_the_documented_one():
    codec = PackedPaillierCodec(key_bits=512, num_values=4, max_summands=2, quant_bits=8)
    with pytest.raises(ValueError, match="cannot encode NaN or infinite values"):
        codec.encode(np.array([0.0, np.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"expected 4 values, got shape \(3,\)"):
        codec.encode(np.zeros(3))
    with pytest.raises(ValueError, match="cannot sum 3 encodings; between 1 and 2"):
        codec.encode_sum([(np.zeros(4), None)] * 3)
    with pytest.raises(ValueError, match="expected 1 plaintexts, got 2"):
        codec.unpack([0, 0])
    with pytest.raises(ValueError, match="count=3 must be between 1 and 2"):
        codec.decode_sum([0], 3)
    with pytest.raises(ValueError, match="expected 2 plaintexts, got 0"):
        StatsCodec(key_bits=512, max_summands=2).decode_sum([])
    # count * clip / (2 Q) / sum s_k (module docstring), and it is reached: a value half a
    # step off the grid comes back exactly half a step away.
    assert codec.error_bound(3, 1.5) == pytest.approx(3 * 1.0 / (2 * 127) / 1.5, rel=1e-12)
    off_grid = np.full(4, 0.5 * codec.step * (1 - 1e-9))
    decoded = codec.decode_sum(codec.encode(off_grid), 1)
    assert np.abs(decoded - off_grid).max() == pytest.approx(codec.error_bound(1, 1.0), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"quant_bits": 1}, r"quant_bits=1 must be in \[2, 32\]"),
        ({"quant_bits": 33}, r"quant_bits=33 must be in \[2, 32\]"),
        ({"max_summands": 0}, "max_summands=0 must be >= 1"),
        ({"clip": 0.0}, "clip=0.0 must be a finite number > 0"),
        ({"clip": float("inf")}, "clip=inf must be a finite number > 0"),
        ({"key_bits": 16}, "a 16-bit key cannot hold one 16-bit slot"),
    ],
)
def test_codec_refuses_settings_it_cannot_pack(kwargs, message):
    args = {"key_bits": 512, "num_values": 4, "max_summands": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        PackedPaillierCodec(**args)


def test_codec_accepts_its_limits():
    for quant_bits in (2, 32):
        PackedPaillierCodec(key_bits=512, num_values=4, max_summands=1, quant_bits=quant_bits)
    tight = PackedPaillierCodec(key_bits=17, num_values=1, max_summands=1, quant_bits=16)
    assert tight.slots_per_ciphertext == 1


def test_slots_wider_than_a_double_unpack_and_decode_exactly():
    """quant_bits=32 and 2^22 summands make 54-bit slots, wider than a float64's 53-bit
    mantissa: unpacking and decoding must stay in integers until the last step. Near 2^54
    a float64 holds only even numbers, so the odd slot below would lose its last bit, and
    the sum of 2^22 - 1 encodings would decode to 2^53 + 2 +- 1 grid steps, not 2^53 + 2."""
    codec = PackedPaillierCodec(key_bits=2048, num_values=2, max_summands=2**22, quant_bits=32)
    assert codec.slot_bits == 54
    count = 2**22 - 1
    offset = count * codec.qmax  # what count encodings of 0 put in a slot (odd)
    slots = np.array([offset + 2**53 + 2, offset - 5], dtype=np.uint64)
    assert int(slots[0]) % 2 == 1 and 2**53 < int(slots[0]) < 2**54
    (m,) = codec._pack(slots)
    assert codec.unpack([m]).tolist() == slots.tolist()
    steps = codec.decode_sum([m], count) / codec.step
    assert steps.tolist() == [float(2**53 + 2), -5.0]
