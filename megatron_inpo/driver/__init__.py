"""The INPO iteration driver (`megatron-inpo run`, megatron_inpo/cli/run.py).

    config.py    RunConfig: the run's concerns, embedding the engine's config objects whole (engine/config.py)
    recipes.py   recipes as functions (tiny_cpu, llama3_8b_h100, llama3_8b_h100_rm, llama3_70b_h100)
    loop.py      Driver.run(): Algorithm 1, stage by stage, resumable
    results.py   the typed result of each stage (what the manifest records)
    manifest.py  the run manifest (stages done, config digest)
    stages.py    the policy stages behind one interface: MegatronStages (Megatron-Core) or TorchStages
    launcher.py  a Megatron stage in the stage worker or as a process group (one process, torchrun, one agent per
                 node), its log, timeout, live line
    worker.py    the persistent stage worker (launch.stage_runner 'persistent'): both ends of its file protocol
    torch_stages.py   the in-process transformers reference stages
    report.py    the table and plot of a run
"""
