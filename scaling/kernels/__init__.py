"""Pallas kernels, each beside its pure-jnp reference and a dispatcher (`dispatch.py`).

    hstu_attention.py      HSTU pointwise attention (jagged lengths, causal, fused relative bias,
                           M-FALCON candidates): public entry points, custom_vjp, reference
    hstu_attention_fwd.py  its forward kernel and the block-range/mask helpers the kernels share
    hstu_attention_bwd.py  its backward kernels: dK/dV, dQ, and the head-summed bias gradient
    hstu_bias.py           the in-kernel relative bias and the bias tables' gradient reduction
    fm_block.py            Wukong's FM block X (X^T Y) -> flatten -> LayerNorm, forward and backward
    flash_attention.py     softmax attention (FlashAttention-2), causal by position with a valid key
                           range per sequence: OneTrans's attention, forward and backward
    tiles.py               the tile arithmetic they share: power-of-two tile extents, fp32-accumulated
                           2-D dots, ceiling division, the longest-rows-first grid order
    sharded.py             under a multi-device mesh: the kernel per device under shard_map (batch
                           over data x fsdp, heads over tensor where the layout splits heads)
    hstu_attention_mgpu.py HSTU attention without bias on Mosaic GPU (Hopper), forward and
                           backward, FlashAttention-3's structure (HSTU's attention_impl: mosaic)
    mgpu_pipeline.py       the warp-specialized pipeline those kernels share: a TMA producer
                           warpgroup, two consumer warpgroups, ping-pong

Every Triton kernel is a `pl.pallas_call` with the Triton block structure (power-of-2 tiles >= 16,
2-D dots, no scratch memory, no atomics) and runs on CPU with `interpret=True`; the Mosaic GPU
kernels (`plgpu.kernel`) run on CPU in JAX's Mosaic GPU interpreter.
"""
