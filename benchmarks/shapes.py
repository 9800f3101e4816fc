"""Layer shapes used by the benchmarks (weights as [C_out, C_in, kh, kw] or [C_out, C_in])."""

# SNGAN 32x32 (ResNet generator with 256 channels, discriminator with 128; DESIGN.md §1)
SNGAN32_G = (
    [(4 * 4 * 256, 128)]  # linear z -> 4x4x256
    + [(256, 256, 3, 3), (256, 256, 3, 3), (256, 256, 1, 1)] * 3  # 3 up-blocks: 2 convs + shortcut
    + [(3, 256, 3, 3)]  # to RGB
)
SNGAN32_D = (
    [(128, 3, 3, 3), (128, 128, 3, 3), (128, 3, 1, 1)]  # optimised first block
    + [(128, 128, 3, 3), (128, 128, 3, 3), (128, 128, 1, 1)]  # down block with shortcut
    + [(128, 128, 3, 3), (128, 128, 3, 3)] * 2  # two plain blocks
    + [(1, 128)]  # linear head
)
SNGAN32 = SNGAN32_G + SNGAN32_D
