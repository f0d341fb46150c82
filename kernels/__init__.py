"""Pallas attention kernels and sequence-parallel attention.

flash_attention      TPU (Mosaic) flash attention, forward + backward with custom_vjp; lengths,
                     segment ids ('same' / 'other', block-sparse tile skipping), dense masks, GQA
flash_attention_gpu  the same kernels shaped for GPU (Triton)
ring_attention       ring attention over the mesh axis 'sequence' (shard_map, ppermute)
ulysses_attention    all-to-all sequence <-> head parallel attention
sharded_flash        the flash kernel shard_mapped over batch / heads / queries on a mesh
aot                  AOT compilation for TPU topologies from a CPU host (memory, cost)
"""
