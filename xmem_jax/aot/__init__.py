"""Ahead-of-time compilation: the main job's programs compiled for a TPU slice that is not
attached (or for fake CPU devices), with their memory, FLOPs and collectives; see
`xmem_jax.compile` for the command."""
