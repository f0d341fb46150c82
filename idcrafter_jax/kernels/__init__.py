"""Pallas attention kernels and sequence-parallel attention.

common               what they share: MASK_VALUE, SEGMENT_MODES, the one input check
                     (`check_inputs`), layout, custom_vjp and mesh helpers; imports no kernel
flash_attention      TPU (Mosaic) flash attention, forward + backward with custom_vjp; lengths,
                     segment ids ('same' / 'other', block-sparse tile skipping), dense masks, GQA
flash_attention_gpu  the same kernels shaped for GPU (Triton)
ring_attention       ring attention over the mesh axis 'sequence' (shard_map, ppermute)
ulysses_attention    all-to-all sequence <-> head parallel attention
sharded_flash        the flash kernel shard_mapped over batch / heads / queries on a mesh

Imports: common <- flash_attention_gpu <- flash_attention <- ring / ulysses / sharded_flash.
"""
