"""The engine -> postprocessing response format round-trips every field."""

from __future__ import annotations

import numpy as np
import pytest

from tritonize.runtime.packed import METRICS, Packed, pack, unpack


@pytest.mark.parametrize("packed", [
    Packed(delta=[5]),
    Packed(delta=[1, 2, 3], prefix=[9, 8], log_probs=[-0.5, -1.25, -3.0], final=True, finish_reason="length",
           num_input_tokens=7, num_output_tokens=3, cum_log_prob=-4.75, handle=123456,
           metrics={k: (i + 1) * 1_700_000_000_000_000_000 // 10 for i, k in enumerate(METRICS)}),
    Packed(delta=[], final=True, finish_reason="cancelled", handle=2**31 - 1),
    Packed(delta=[4, 4], batch_index=3, sequence_index=2, batched=True, sequences=True, perf=True,
           metrics={k: 0 for k in METRICS}),
])
def test_round_trip(packed):
    array = pack(packed)
    assert array.dtype == np.int32 and array.shape[0] == 1
    assert unpack(array) == packed


def test_a_foreign_tensor_is_refused():
    with pytest.raises(ValueError, match="regenerate the repository"):
        unpack(np.zeros((1, 3), dtype=np.int32))
