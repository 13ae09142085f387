"""phi-1.5 exactly as the report trained it: fp16 with dynamic loss scaling and ZeRO-2 (optimizer state sharded,
parameters replicated) over pure data parallelism. Same recipe as configs/phi15.py otherwise."""

from configs.phi15 import get_config as phi15_config


def get_config():
    c = phi15_config()
    c.dtype = "float16"
    c.remat = "full"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.sharding = "zero1"  # ZeRO-1 and ZeRO-2 coincide under jit: gradients are reduce-scattered into the moments
    return c
