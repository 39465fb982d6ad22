"""DistributedDataParallel: 2 CPU processes (gloo), as torchrun would start them on one machine,
each on half of a batch, must produce the gradients of one process on the whole batch."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fused_s2s.demo.data import date_task, date_vocabs, make_batch
from fused_s2s.demo.models import Seq2Seq, sequence_loss

WORLD = 2
DESIGNS = [("gru", "bahdanau"), ("lstm", "general")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(cell: str, attention: str) -> Seq2Seq:
    torch.manual_seed(0)
    src_vocab, tgt_vocab = date_vocabs()
    return Seq2Seq(len(src_vocab), len(tgt_vocab), 16, 24, num_layers=2, cell=cell, attention=attention,
                   backend="torch")


def the_batch():
    src_vocab, tgt_vocab = date_vocabs()
    return make_batch(date_task(16, 1, seed=5)[0], src_vocab, tgt_vocab)


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for cell, attention in DESIGNS:
            model = torch.nn.parallel.DistributedDataParallel(build_model(cell, attention))
            part = the_batch().split(WORLD)[rank]
            sequence_loss(model(part.src, part.src_lengths, part.tgt_in), part.tgt_out).backward()
            torch.save({name: p.grad for name, p in model.module.named_parameters()},
                       os.path.join(out_dir, f"{cell}-{attention}-rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears down (rank 0 hosts the store)
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalisation: now and then, torch's C++ teardown of the gloo and
    # store threads aborts the process after all Python code has finished (seen about once in
    # 20 runs, with no Python frame on the stack). The results are on disk by now.
    os._exit(0)


def test_ddp_gradients_match_single_process(tmp_path):
    batch = the_batch()
    # the loss is a per-token mean: halves with equal token counts make the DDP average of the
    # two halves' gradients equal the full batch's gradient
    assert len({half.num_tgt_tokens for half in batch.split(WORLD)}) == 1
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)  # one spawn for all designs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for cell, attention in DESIGNS:
            model = build_model(cell, attention)
            sequence_loss(model(batch.src, batch.src_lengths, batch.tgt_in), batch.tgt_out).backward()
            for rank in range(WORLD):
                grads = torch.load(tmp_path / f"{cell}-{attention}-rank{rank}.pt")
                assert grads.keys() == dict(model.named_parameters()).keys()
                for name, p in model.named_parameters():
                    torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6,
                                               msg=f"{cell}/{attention}, rank {rank}: {name}")
    finally:
        torch.set_num_threads(threads)
