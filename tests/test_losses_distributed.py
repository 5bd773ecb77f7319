"""contrastive / ract under DDP: negatives gathered from every worker, checked against one process on the whole batch.

Two real CPU processes with a gloo process group on a free localhost port. Each rank computes the loss of its own
slice of a batch and backpropagates it; the parent computes the loss of one process on the concatenated batch.
"""

import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bict_ray.core.losses import ContrastiveLoss, RACTLoss, all_gather_rows

WORLD = 2
LOSSES = {"contrastive": ContrastiveLoss(temperature=0.5), "ract": RACTLoss(temperature=0.5)}


def _rank_main(rank, port, cases, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    try:
        results = []
        for kind, sizes, new, old, labels in cases:
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            local_new = new[rows].clone().requires_grad_()
            loss = LOSSES[kind](local_new, labels[rows], ref_emb=old[rows])
            # the weight N_r W / N is 1 with equal batches (what training backpropagates); it keeps a smaller last
            # batch's samples at their share of the whole batch
            (loss * sizes[rank] * WORLD / sum(sizes)).backward()
            results.append((loss.detach(), local_new.grad))
        try:
            all_gather_rows(torch.zeros(3, 2), torch.zeros(2))
            refusal = "no error"
        except ValueError as err:
            refusal = str(err)
        torch.save({"results": results, "refusal": refusal}, f"{out_dir}/rank{rank}.pt")
        # both ranks done before either tears the group down: a rank destroying it while its peer is still in gloo
        # aborted the peer once in CI ("terminate called without an active exception", SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(cases, out_dir, timeout_s=60):
    context = mp.start_processes(_rank_main, args=(_free_port(), cases, str(out_dir)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD} ranks did not finish in {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def _case(kind, sizes, seed):
    generator = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    new = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    old = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,), generator=generator)
    return kind, sizes, new, old, labels


def test_gathered_negatives_give_the_loss_and_gradients_of_the_whole_batch(tmp_path):
    # equal batches (what drop_last gives every step) and a smaller batch on rank 1 (padding dropped again)
    cases = [_case(kind, sizes, seed) for seed, (kind, sizes) in enumerate(
        [("contrastive", [5, 5]), ("ract", [5, 5]), ("contrastive", [6, 3]), ("ract", [6, 3])])]
    ranks = _run_ranks(cases, tmp_path)
    for index, (kind, sizes, new, old, labels) in enumerate(cases):
        whole = new.clone().requires_grad_()
        expected = LOSSES[kind](whole, labels, ref_emb=old)
        expected.backward()
        losses = [ranks[rank]["results"][index][0] for rank in range(WORLD)]
        grads = torch.cat([ranks[rank]["results"][index][1] for rank in range(WORLD)])
        # (i) the samples' mean over all ranks (with equal batches: the mean of the per-rank losses) is the
        # one-process loss of the whole batch
        torch.testing.assert_close(sum(loss * n for loss, n in zip(losses, sizes)) / sum(sizes), expected.detach())
        if sizes[0] == sizes[1]:
            torch.testing.assert_close(sum(losses) / WORLD, expected.detach())
        # (ii) a rank's feature gradient is the sum over ranks r' of d loss_r' / d (its features): all_gather's
        # backward adds up what every rank's loss sends it. DDP then averages the parameter gradients over the W
        # ranks, so what reaches the model is that gradient / W, which must be the one-process gradient
        torch.testing.assert_close(grads / WORLD, whole.grad)
        assert not torch.equal(losses[0], losses[1])  # each rank computed its own samples' loss
    assert all("tensors must have the same number of rows" in rank["refusal"] for rank in ranks)


def test_gather_rows_without_a_group_or_with_one_worker_is_the_identity():
    rows = torch.randn(4, 3)
    (same,), offset = all_gather_rows(rows)
    assert same is rows and offset == 0
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        new, old, labels = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
        (same,), offset = all_gather_rows(rows)
        assert same is rows and offset == 0
        for loss in LOSSES.values():
            assert torch.equal(loss(new, labels, ref_emb=old), _without_group(loss, new, labels, old))
    finally:
        dist.destroy_process_group()


def _without_group(loss, new, labels, old):
    # what the loss computed before negatives were gathered, written out: one process, the local batch only
    new_n, old_n = torch.nn.functional.normalize(new, dim=1), torch.nn.functional.normalize(old, dim=1)
    other = labels[:, None] != labels[None, :]
    logits = (new_n @ old_n.T).masked_fill(~(other | torch.eye(len(labels), dtype=torch.bool)), -float("inf"))
    if loss.new_to_new:
        logits = torch.cat([logits, (new_n @ new_n.T).masked_fill(~other, -float("inf"))], dim=1)
    return torch.nn.functional.cross_entropy(logits / loss.temperature, torch.arange(len(labels)))
