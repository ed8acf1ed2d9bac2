"""Training on several processes: the device mesh, the parallel plan (FSDP2 + expert
parallelism), moge's token all-to-all, and ranks agreeing on failures.

    config.py           ParallelConfig: the `parallel` section of a run config
    mesh.py             MeshShape / plan_mesh (validation), World, connect, close
    expert_parallel.py  the expert-parallel MoGE layer and its all-to-all
    parallelize.py      parallelize(model, world): the plan, applied from outside
    agree.py            agree / PeerError: every rank raises together
    launch.py           `moge torchrun`: torchrun with our one-line errors
"""
