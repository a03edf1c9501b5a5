"""Distributed helpers (single process) and a 2-process gloo DDP training run on CPU."""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from engine import distributed as D


class ToyTokenizer(nn.Module):
    vocab_size = 16

    def get_codebook_indices(self, x01):
        m = F.avg_pool2d(x01.float().mean(1, keepdim=True), 8)[:, 0]
        return (m * self.vocab_size).long().clamp(0, self.vocab_size - 1)


def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed("cpu")
    assert (info.distributed, info.rank, info.world_size, info.device.type) == (False, 0, 1, "cpu")
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    t = torch.tensor([1.0, 3.0])
    assert torch.equal(D.all_reduce_mean(t), t) and D.all_reduce_mean(2.5) == 2.5
    D.barrier()
    m = nn.Linear(2, 2)
    assert D.unwrap_model(m) is m


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data_path: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import models
    import run_pretraining
    from engine.train import run

    args = run_pretraining.get_args_parser().parse_args([
        "--data_path", data_path, "--output_dir", out_dir, "--input_size", "64", "--batch_size", "2",
        "--device", "cpu", "--num_workers", "0", "--epochs", "2", "--warmup_epochs", "0", "--lr", "2e-3",
        "--max_steps", "3", "--no_progress", "--no_tensorboard", "--no_auto_resume"])
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    model = models.create_model("vit_tiny_patch16_224_8k_vocab_dual", img_size=64, vocab_size=16,
                                embed_dim=32, depth=2, num_heads=2)
    try:
        res = run(args, model=model, tokenizer=ToyTokenizer())
        torch.save({"model": res["model"].state_dict(), "sampler": res["mask_sampler"].state_dict(),
                    "step": res["state"].step}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        D.cleanup()


def test_two_process_gloo_training_keeps_ranks_identical(synthetic_train, tmp_path):
    from datasets.masking import mask_count

    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(synthetic_train), str(tmp_path)), nprocs=world, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world))
    assert r0["step"] == r1["step"] == 3
    for name, a in r0["model"].items():
        assert torch.equal(a, r1["model"][name]), name
    for p, k in ((16, mask_count(4, 0.3)), (32, mask_count(2, 0.3))):
        assert torch.equal(r0["sampler"]["sum"][p], r1["sampler"]["sum"][p])
        # merged: both ranks' 3 steps × 2 images × k masked positions
        assert r0["sampler"]["count"][p].sum().item() == 3 * world * 2 * k
    from engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "checkpoint-last.pth")  # written by rank 0 only
    assert ckpt["step"] == 3 and len(ckpt["rng_per_rank"]) == world == len(ckpt["mask_sampler_per_rank"])
    # each rank's own RNG streams are kept, so a resumed multi-process run continues identically
    assert not torch.equal(ckpt["mask_sampler_per_rank"][0]["generator"], ckpt["mask_sampler_per_rank"][1]["generator"])
    assert ckpt["config"]["batch_size"] == 2 and ckpt["run_info"]["config"]["world_size"] == world
