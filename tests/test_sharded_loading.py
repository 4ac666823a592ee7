"""Tensor-parallel loading: each rank reads only its shard, and full shapes are checked at every size.

The ranks are simulated in one process: a parallel layer needs its rank and world size to know
its shard, not a process group (collectives run only in forward). Tensor-parallel 8 runs on the
meta device: nothing is allocated or read, only the files' headers.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load_model, load_model_args
from model.loader import CheckpointError, checkpoint_files, checkpoint_places, plan_reads
from model.parallel import ParallelContext
from model.pixtral import PixtralModel
from model.tiny import make_tiny_checkpoint

# Sizes divisible by 8 everywhere tensor parallelism cuts: 8 query and 8 KV heads (head_dim 16,
# so n_heads * head_dim = 128 != dim as in 12B), hidden 128, vocabulary 131072.
TP8 = {"n_heads": 8, "n_kv_heads": 8, "head_dim": 16, "hidden_dim": 128}


@pytest.fixture(scope="module", params=["mistral", "hf"])
def tp8_checkpoint(request, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(f"tp8-{request.param}"), request.param, overrides=TP8)


class CountingSafeOpen:
    """safe_open that counts the bytes of every tensor handed out (whole or sliced)."""

    def __init__(self, real, counts: dict[str, int]) -> None:
        self.real, self.counts = real, counts

    def __call__(self, path, framework):
        return _CountingFile(self.real(path, framework=framework), self.counts)


class _CountingFile:
    def __init__(self, f, counts) -> None:
        self.f, self.counts = f, counts

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def _count(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        self.counts[key] = self.counts.get(key, 0) + tensor.numel() * tensor.element_size()
        return tensor

    def get_tensor(self, key):
        return self._count(key, self.f.get_tensor(key))

    def get_slice(self, key):
        sliced, count = self.f.get_slice(key), self._count

        class Slice:
            def get_shape(self):
                return sliced.get_shape()

            def get_dtype(self):
                return sliced.get_dtype()

            def __getitem__(self, index):
                return count(key, sliced[index])

        return Slice()


def _full_bytes(ckpt, wanted=lambda key: True) -> int:
    total = 0
    for path in checkpoint_files(ckpt)[1]:
        for key, t in load_file(str(path)).items():
            if wanted(key):
                total += t.numel() * t.element_size()
    return total


def test_each_rank_reads_only_its_shard(tp8_checkpoint, monkeypatch, caplog):
    import model.loader

    whole = load_model(tp8_checkpoint, with_vision_encoder=False)
    whole_places = checkpoint_places(whole)
    # a decoder replica reads everything but the vision encoder (the adapter runs in the decoder)
    decoder_bytes = _full_bytes(tp8_checkpoint, lambda key: not key.startswith(("vision_encoder.", "vision_tower.")))
    for rank in range(2):
        counts: dict[str, int] = {}
        monkeypatch.setattr(model.loader, "safe_open", CountingSafeOpen(model.loader.safe_open, counts))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="model.loader"):
            shard = load_model(tp8_checkpoint, tp=ParallelContext(rank, 2), with_vision_encoder=False)
        monkeypatch.undo()
        needed = sum(p.numel() * 4 for p in shard.parameters())  # fp32 checkpoint: its shard, read once
        read = sum(counts.values())
        assert read == needed, (rank, read, needed)
        places = checkpoint_places(shard)
        replicated = sum(target.numel() * 4 for target, where in places.values() if where is None)
        assert read - replicated == (decoder_bytes - replicated) // 2  # half of every sharded tensor
        assert read < 0.6 * decoder_bytes
        # ... and what it read is the right shard, un-permuted per shard for HF q/k
        for name, (target, where) in places.items():
            full = whole_places[name][0]
            expected = full.narrow(where.dim, where.start, where.size) if where else full
            assert torch.equal(target, expected), name
        # progress comes from rank 0 alone, counting what it read
        loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
        assert loaded == ([f"loaded {tp8_checkpoint}: read {read / 1e9:.2f} GB in "
                           f"{loaded[0].rsplit(' in ', 1)[1]}"] if rank == 0 else [])


def _meta_model(ckpt, rank: int, world: int) -> PixtralModel:
    with torch.device("meta"):
        return PixtralModel(load_model_args(ckpt), ParallelContext(rank, world), with_vision_encoder=True)


@pytest.mark.parametrize("world", [1, 8])
def test_every_rank_checks_full_shapes_before_reading(tp8_checkpoint, world):
    for rank in range(world):
        reads = plan_reads(_meta_model(tp8_checkpoint, rank, world), tp8_checkpoint, load_model_args(tp8_checkpoint))
        assert len(reads) == len(checkpoint_places(_meta_model(tp8_checkpoint, 0, 1)))


def _rewrite(ckpt, dst, edit):
    """A copy of a Mistral-format checkpoint with its state dict edited."""
    shutil.copytree(ckpt, dst)
    state = load_file(str(dst / "consolidated.safetensors"))
    edit(state)
    save_file(state, str(dst / "consolidated.safetensors"))
    return dst


@pytest.mark.parametrize("world", [1, 8])
def test_bad_tensors_name_themselves_at_every_tp_size(tmp_path_factory, world):
    good = make_tiny_checkpoint(tmp_path_factory.mktemp("good"), overrides=TP8)
    cases = {
        # 8 more rows: at TP 8 each rank's shard would still fit, and was silently cut down before
        "oversized": (lambda s: s.__setitem__("layers.1.attention.wq.weight",
                                              torch.zeros(136, 64)),
                      r"1 mis-shaped tensors: layers\.1\.attention\.wq\.weight: checkpoint shape \(136, 64\) "
                      r"!= model shape \(128, 64\)"),
        "row-parallel": (lambda s: s.__setitem__("layers.0.feed_forward.w2.weight", torch.zeros(64, 256)),
                         r"layers\.0\.feed_forward\.w2\.weight: checkpoint shape \(64, 256\) != model shape \(64, 128\)"),
        "missing": (lambda s: s.pop("layers.0.feed_forward.w3.weight"),
                    r"1 missing tensors: layers\.0\.feed_forward\.w3\.weight"),
        "extra": (lambda s: s.__setitem__("layers.9.attention.wq.weight", torch.zeros(1)),
                  r"1 tensors with no parameter in the model \(wrong config\?\): layers\.9\.attention\.wq\.weight"),
    }
    for what, (edit, message) in cases.items():
        bad = _rewrite(good, tmp_path_factory.mktemp(what) / "ckpt", edit)
        for rank in range(world):
            with pytest.raises(CheckpointError, match=message):
                plan_reads(_meta_model(bad, rank, world), bad, load_model_args(bad))
    # a real load refuses before allocating: the error comes from the header pass
    with pytest.raises(CheckpointError, match=r"layers\.1\.attention\.wq\.weight"):
        load_model(_rewrite(good, tmp_path_factory.mktemp("load") / "ckpt", cases["oversized"][0]),
                   tp=ParallelContext(world - 1, world))
