"""The INPO iteration driver: RunConfig (config.py), recipes (recipes.py), the run manifest (manifest.py), the
policy stages behind one interface (stages.py: Megatron-Core subprocesses or the torch reference) and the loop of
Algorithm 1 (loop.py); `megatron-inpo run` is cli.py."""
