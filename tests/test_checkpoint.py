"""Checkpoint files tensor by tensor: the shard writer puts each tensor straight into its place (the
layout is planned up front, nothing is held), and what it writes is read back bit-exactly by
safetensors itself, by transformers and by the engine's own reader."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ecoflap_fast import checkpoint


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(3, 11, generator=g),
        "c.bias": torch.randn(13, generator=g).to(torch.float16),
        "d.index": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "e.mask": torch.rand(4, 6, generator=g) > 0.5,
        "f.empty": torch.empty(0, 4),
        "g.scalar": torch.tensor(2.5, dtype=torch.float64),
        "h.bytes": torch.randint(0, 255, (17,), generator=g, dtype=torch.uint8),
    }


def _layout(tensors):
    return [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


@pytest.mark.parametrize("shard_bytes", [1 << 30, 64, 1])
def test_written_in_any_order_reads_back_exactly(tmp_path, shard_bytes):
    tensors = _tensors()
    writer = checkpoint.ShardWriter(tmp_path, _layout(tensors), shard_bytes=shard_bytes)
    for name in reversed(list(tensors)):  # any order: every tensor's place is known up front
        writer.add(name, tensors[name])
    files = writer.close()
    shards = [f for f in files if f.suffix == ".safetensors"]
    if shard_bytes == 1 << 30:
        assert [f.name for f in shards] == ["model.safetensors"]
    else:
        assert len(shards) > 1
        index = json.loads((tmp_path / checkpoint.INDEX).read_text())
        assert set(index["weight_map"]) == set(tensors)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert index["metadata"]["total_size"] == nbytes
    back = {}
    for f in shards:  # safetensors' own reader validates the headers and offsets
        back.update(load_file(str(f)))
        with safe_open(str(f), framework="pt") as h:
            assert h.metadata() == {"format": "pt"}
    ours = checkpoint.Checkpoint(tmp_path)
    assert set(back) == set(tensors) == set(ours.files)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
        got = ours.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
    assert not list(tmp_path.glob("shard-*"))


def test_a_shard_is_split_at_the_size_and_keeps_the_order(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(10)}  # 1 KiB each
    writer = checkpoint.ShardWriter(tmp_path, _layout(tensors), shard_bytes=3 * 1024)
    for n, t in tensors.items():
        writer.add(n, t)
    writer.close()
    index = json.loads((tmp_path / checkpoint.INDEX).read_text())["weight_map"]
    per_shard = {}
    for n in tensors:
        per_shard.setdefault(index[n], []).append(n)
    assert [len(v) for v in per_shard.values()] == [3, 3, 3, 1]


def test_the_writer_holds_no_tensor(tmp_path):
    t = torch.randn(64, 64)
    ref = weakref.ref(t)
    writer = checkpoint.ShardWriter(tmp_path, [("x", torch.float32, (64, 64)), ("y", torch.float32, (2,))])
    writer.add("x", t)
    del t
    gc.collect()
    assert ref() is None  # written to its place at once, not kept until the shard is full
    writer.add("y", torch.ones(2))
    writer.close()


def test_wrong_tensors_are_refused_by_name(tmp_path):
    writer = checkpoint.ShardWriter(tmp_path, [("x", torch.bfloat16, (4, 4))])
    with pytest.raises(ValueError, match="tensor y is not in the checkpoint's layout"):
        writer.add("y", torch.zeros(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"tensor x is torch.float32 \(4, 4\); the layout says torch.bfloat16"):
        writer.add("x", torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"the layout says torch.bfloat16 \(4, 4\)"):
        writer.add("x", torch.zeros(4, 5, dtype=torch.bfloat16))
    writer.add("x", torch.zeros(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="tensor x written twice"):
        writer.add("x", torch.zeros(4, 4, dtype=torch.bfloat16))
    writer.close()
    with pytest.raises(ValueError, match="tensor x appears twice in the layout"):
        checkpoint.ShardWriter(tmp_path / "dup", [("x", torch.float32, (1,)), ("x", torch.float32, (1,))])
    with pytest.raises(ValueError, match="dtype torch.complex64 cannot be written"):
        checkpoint.ShardWriter(tmp_path / "cx", [("x", torch.complex64, (1,))])


def test_a_tensor_never_written_leaves_no_checkpoint(tmp_path):
    writer = checkpoint.ShardWriter(tmp_path, [("x", torch.float32, (2,)), ("y", torch.float32, (3,))])
    writer.add("x", torch.ones(2))
    with pytest.raises(ValueError, match=r"tensor y \(and 0 more\) was never written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []  # no half-filled shard that a loader could take for a model


def test_save_model_round_trips_through_transformers(tmp_path):
    from tiny_models import tiny_llama
    from transformers import AutoModelForCausalLM

    model = tiny_llama(hidden=64, layers=2)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    checkpoint.save_model(model, tmp_path, dtype=torch.bfloat16, shard_bytes=40_000)
    assert (tmp_path / checkpoint.INDEX).is_file()
    ck = checkpoint.Checkpoint(tmp_path)
    assert "lm_head.weight" not in ck  # the tied copy is written once
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    want = model.state_dict()
    for name, t in back.state_dict().items():
        assert torch.equal(t, want[name].to(torch.bfloat16)), name


def test_a_truncated_shard_is_refused_by_name(tmp_path):
    writer = checkpoint.ShardWriter(tmp_path, [("x", torch.float32, (1024,))])
    writer.add("x", torch.ones(1024))
    writer.close()
    f = tmp_path / checkpoint.SINGLE
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(Exception, match="incomplete metadata|truncated"):
        checkpoint.Checkpoint(tmp_path).get("x")


def test_short_writes_are_completed_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    real = checkpoint.os.pwrite
    calls = []

    def half(fd, data, offset):  # the kernel may write less than asked (a full disk, a signal)
        data = memoryview(data)
        calls.append(len(data))
        return real(fd, data[: max(1, len(data) // 2)], offset)

    monkeypatch.setattr(checkpoint.os, "pwrite", half)
    tensors = _tensors()
    with checkpoint.ShardWriter(tmp_path / "ok", _layout(tensors), shard_bytes=64) as writer:
        for n, t in tensors.items():
            writer.add(n, t)
    assert len(calls) > 2 * len(tensors)
    for f in (tmp_path / "ok").glob("*.safetensors"):
        for n, t in load_file(str(f)).items():
            assert torch.equal(t, tensors[n]), n

    monkeypatch.setattr(checkpoint.os, "pwrite", lambda fd, data, offset: 0)  # no space at all
    with pytest.raises(OSError, match="short write"):
        checkpoint.ShardWriter(tmp_path / "full", _layout(tensors))
    assert list((tmp_path / "full").iterdir()) == []


def test_an_error_inside_the_writer_removes_its_shards(tmp_path):
    tensors = _tensors()
    with pytest.raises(RuntimeError, match="stopped"):
        with checkpoint.ShardWriter(tmp_path, _layout(tensors), shard_bytes=64) as writer:
            writer.add("a.weight", tensors["a.weight"])
            raise RuntimeError("stopped")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="is closed; tensor a.weight not written"):
        writer.add("a.weight", tensors["a.weight"])
    with pytest.raises(ValueError, match="already closed"):
        writer.close()
    with pytest.raises(ValueError, match="cannot be named __metadata__"):
        checkpoint.ShardWriter(tmp_path / "m", [("__metadata__", torch.float32, (1,))])


def test_a_closed_checkpoint_says_so(tmp_path):
    with checkpoint.ShardWriter(tmp_path, [("x", torch.float32, (3,))]) as writer:
        writer.add("x", torch.ones(3))
    ck = checkpoint.Checkpoint(tmp_path)
    ck.close()
    with pytest.raises(ValueError, match="was closed; open it again to read x"):
        ck.get("x")
