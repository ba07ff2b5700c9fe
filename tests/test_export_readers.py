"""The readers and writers under the exporter, each against an independent implementation.

- torch DCP weights against torch.distributed.checkpoint's own loader (through the fixtures'
  allow-list unpickler), whole tensors and sub-regions;
- zarr weights against the fixtures' chunk reassembly;
- the restricted unpickler refuses what a checkpoint does not need;
- the streaming safetensors writer against the safetensors library, with bounded block sizes;
- NeMo's tiktoken vocabulary converted to tokenizer.json against the tiktoken library.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess

import pytest
import regex
import torch
from fixtures import REAL_NEMO2, tiny_model, write_nemo1, write_nemo2
from fixtures.dist_ckpt import load_tensors, read_zarr
from safetensors.torch import load_file

from tritonize.export import ExportError, safe_pickle
from tritonize.export.dcp import read_dcp
from tritonize.export.lazy import Lazy
from tritonize.export.tiktoken_convert import PATTERN_TIKTOKEN, load_ranks, tokenizer_json
from tritonize.export.tree import DirTree, TarTree
from tritonize.export.writer import write_safetensors
from tritonize.export.zarr_store import read_zarr as our_zarr


def test_dcp_reader_matches_torch(bpe_dir, tmp_path):
    """Megatron chunking (TP 2: qkv per rank, gate/up halves, layer-stacked) read region by region."""
    model = tiny_model("mixtral", vocab_size=300, bos_token_id=0, eos_token_id=0)
    src = write_nemo2(model, bpe_dir, tmp_path / "ckpt", tp_size=2, with_optimizer=True)
    dirs = [src / "weights"] + ([REAL_NEMO2 / "nemo2" / "weights"] if (REAL_NEMO2 / "nemo2").is_dir() else [])
    for d in dirs:
        ours = read_dcp(DirTree(d), d.name, lambda k: not k.startswith("optimizer."))
        theirs = load_tensors(d, keys=list(ours))
        assert set(ours) == set(theirs) and len(ours) > 5
        for key, t in ours.items():
            assert torch.equal(t.read(), theirs[key]), key
            if len(t.shape) >= 2 and t.shape[0] > 1:
                a, b = 1, min(t.shape[0], 3)
                assert torch.equal(t.read((slice(a, b),)), theirs[key][a:b]), key
            if len(t.shape) >= 3:
                rows = t.shape[1]
                assert torch.equal(t.read((1, slice(rows // 3, rows - 1))), theirs[key][1, rows // 3: rows - 1])


def test_dcp_reader_inside_a_tar(bpe_dir, tmp_path):
    """An uncompressed .nemo is read in place: tensors come from byte ranges of the tar itself."""
    model = tiny_model("llama", vocab_size=300, bos_token_id=0, eos_token_id=0)
    nemo = write_nemo1(model, bpe_dir, tmp_path / "m.nemo", tp_size=2)
    extracted = write_nemo1(model, bpe_dir, tmp_path / "m", tp_size=2, tar=False)
    tar = TarTree(nemo)
    ours = read_dcp(tar.sub("model_weights"), "tar")
    theirs = load_tensors(extracted / "model_weights", keys=list(ours))
    for key, t in ours.items():
        assert all(c.path == nemo for c in t.chunks)
        assert torch.equal(t.read(), theirs[key]), key


def test_zarr_reader(bpe_dir, tmp_path):
    model = tiny_model("gemma", vocab_size=300, bos_token_id=0, eos_token_id=0)
    src = write_nemo1(model, bpe_dir, tmp_path / "z", backend="zarr", tar=False, dtype="bfloat16")
    store = our_zarr(DirTree(src / "model_weights"), "z")
    assert len(store) > 5
    for key, t in store.items():
        want = read_zarr(src / "model_weights" / key)
        assert t.dtype == want.dtype == torch.bfloat16
        assert torch.equal(t.read(), want), key
        if t.shape[0] > 2:
            assert torch.equal(t.read((slice(1, t.shape[0] - 1),)), want[1:-1])


class _Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload", [
    _Evil(os.system, "true"),
    _Evil(eval, "1 + 1"),
    _Evil(subprocess.Popen, ["true"]),
    _Evil(getattr, [], "append"),
    _Evil(__import__, "os"),
    _Evil(torch.load, "/dev/null"),
])
def test_restricted_unpickler_refuses_code(payload):
    data = pickle.dumps({"state": payload})
    with pytest.raises(ExportError, match="refusing to unpickle"):
        safe_pickle.loads(data, what="common.pt")


def test_restricted_unpickler_reads_dcp_metadata():
    if not (REAL_NEMO2 / "nemo2" / "weights" / ".metadata").is_file():
        pytest.skip("the shared NeMo 2 fixture is not present")
    meta = safe_pickle.loads((REAL_NEMO2 / "nemo2" / "weights" / ".metadata").read_bytes(), what=".metadata")
    assert isinstance(meta, safe_pickle.Metadata)
    qkv = meta.state_dict_metadata["module.decoder.layers.self_attention.linear_qkv.weight"]
    assert qkv.properties.dtype == torch.float32 and tuple(qkv.size) == (2, 128, 64)
    assert len(meta.storage_data) == 25
    with pytest.raises(ExportError, match="not a readable pickle"):
        safe_pickle.loads(b"\x80\x04garbage", what="x")


class _Recorder(Lazy):
    """A lazy tensor that remembers the largest row range the writer asked for."""

    def __init__(self, t: torch.Tensor):
        self.t, self.shape, self.dtype, self.largest = t, tuple(t.shape), t.dtype, 0

    def rows(self, a, b):
        self.largest = max(self.largest, (b - a) * self.row_numel * self.dtype.itemsize)
        return self.t if not self.shape else self.t[a:b]  # a 0-d tensor comes whole


def test_streaming_writer_bounded_blocks(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(1000, 64, generator=g), "b": torch.randn(300, generator=g),
               "c": torch.randn(7, 3, 5, generator=g), "d": torch.tensor(2.5)}
    lazies = {k: _Recorder(v) for k, v in tensors.items()}
    result = write_safetensors(tmp_path, list(lazies.items()), dtype=torch.bfloat16, block_bytes=4096,
                               max_shard_bytes=64 << 10)
    assert len(result.files) == 2  # a (125 KB in bf16) is larger than a shard: alone in the first
    assert result.weight_map["a"] != result.weight_map["b"] == result.weight_map["d"]
    loaded = {}
    for f in result.files:
        loaded.update(load_file(str(tmp_path / f)))
    for k, v in tensors.items():
        assert loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], v.to(torch.bfloat16)), k
    assert lazies["a"].largest <= 4096 * 2  # float32 source rows sized for the wider dtype
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)


def _train_ranks(text: str, merges: int) -> dict[bytes, int]:
    """A small byte-level BPE, trained the way tiktoken vocabularies are (most frequent pair first)."""
    words = [[bytes([b]) for b in w.encode()] for w in regex.findall(PATTERN_TIKTOKEN, text)]
    ranks = {bytes([i]): i for i in range(256)}
    for _ in range(merges):
        counts: dict[tuple[bytes, bytes], int] = {}
        for w in words:
            for pair in zip(w, w[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        a, b = max(counts, key=counts.get)
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i: i + 2] = [a + b]
                i += 1
    return ranks


def test_tiktoken_conversion_matches_tiktoken():
    tiktoken = pytest.importorskip("tiktoken")
    from tokenizers import Tokenizer

    corpus = ("The capital of France is Paris. Numbers 12345 and 67890; déjà vu, naïve café. "
              "def main():\n    return 42\n日本語のテキスト 🙂🙂 ") * 3
    ranks = _train_ranks(corpus, 120)
    vocab_file = json.dumps([{"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("utf-8", "replace")}
                             for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]).encode()
    ours = Tokenizer.from_str(tokenizer_json(load_ranks(vocab_file), num_special=1000))
    ref = tiktoken.Encoding("nemo", pat_str=PATTERN_TIKTOKEN, mergeable_ranks=ranks, special_tokens={})
    for text in (corpus, "Paris, naïve 日本 🙂 return 4242\n\n\tx", "unseen words zebra quixotic"):
        want = [i + 1000 for i in ref.encode(text)]
        got = ours.encode(text, add_special_tokens=False).ids
        assert got == want
        assert ours.decode(got) == text
    assert ours.token_to_id("</s>") == 2 and ours.token_to_id("<SPECIAL_999>") == 999
