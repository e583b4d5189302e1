"""The Megatron-Core policy engine: model building, CPU/gloo mode, the log-prob pass, training and checkpoints.

This is the only package that imports megatron.core (and transformer_engine), always lazily inside submodules, so
`import megatron_inpo.engine` itself stays cheap and works without them.
"""
