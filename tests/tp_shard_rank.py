"""One rank of a tensor-parallel group that test_tp.py starts itself (spawned: this module imports only the
runtime, so each rank starts quickly): loads its shard of every checkpoint, sends rank 0's logits back, and
says when it has done all its work, before it leaves the group."""

from __future__ import annotations

import torch


def shard_logits(rank: int, world: int, port: int, model_dirs: list[str], ids: list[int], results) -> None:
    import torch.distributed as dist

    from tritonize.runtime.config import ModelArgs
    from tritonize.runtime.model import prompt_logits
    from tritonize.runtime.tp import Shard, parallelize
    from tritonize.runtime.tp_ranks import init_process_group
    from tritonize.runtime.weights import load_model, read_config

    torch.set_num_threads(1)
    group = init_process_group(rank, world, port, torch.device("cpu"))
    try:
        for model_dir in model_dirs:
            shard = Shard(ModelArgs.from_hf_config(read_config(model_dir)), rank, world)
            model = load_model(model_dir, shard=shard)
            held = sum(t.numel() for t in model.state_dict().values())
            parallelize(model, shard, group)
            logits = prompt_logits(model, ids)
            if rank == 0:
                kv_heads = model.layers[0].attention.paged.k_cache.shape[2]
                results.put(("logits", model_dir, logits.numpy(), held, kv_heads))
        dist.barrier()  # no rank tears its connections down while another still reads from them
        results.put(("done", rank))
        results.close()
        results.join_thread()  # delivered before the group is torn down
    finally:
        dist.destroy_process_group()
