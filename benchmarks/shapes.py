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


# ---- single-layer cases with batch sizes (benchmarks/bench_masked_layers.py) ---------------------
# Each case: (model, name, kind, weight shape, input shape, conv stride, conv padding, on_cpu).
# kind is "linear", "conv" or "conv_transpose" (weight shape given as rows [C_out, C_in, kh, kw] too). Input shapes carry the training batch size of the model. `on_cpu`
# marks the cases that the CPU run also times (the rest are GPU-only: too slow for a 2-core CPU).
# StyleGAN2's modulated convs run as grouped per-sample convs in the original code; the plain conv of
# the same shape stands in for them here.

SNGAN32_BATCH = 64      # SNGAN on CIFAR-10 (Miyato et al.): batch 64
STYLEGAN2_256_BATCH = 64  # StyleGAN2-ADA "paper256" config: batch 64, channels min(16384 / res, 512)
FASTGAN256_BATCH = 8    # FastGAN default batch size

LAYER_CASES = [
    # SNGAN 32x32: G (256 channels), D (128 channels)
    ("sngan32", "G.l1", "linear", (4 * 4 * 256, 128), (SNGAN32_BATCH, 128), 1, 0, True),
    ("sngan32", "G.conv8", "conv", (256, 256, 3, 3), (SNGAN32_BATCH, 256, 8, 8), 1, 1, True),
    ("sngan32", "G.conv16", "conv", (256, 256, 3, 3), (SNGAN32_BATCH, 256, 16, 16), 1, 1, False),
    ("sngan32", "G.conv32", "conv", (256, 256, 3, 3), (SNGAN32_BATCH, 256, 32, 32), 1, 1, False),
    ("sngan32", "G.sc16", "conv", (256, 256, 1, 1), (SNGAN32_BATCH, 256, 16, 16), 1, 0, False),
    ("sngan32", "G.rgb", "conv", (3, 256, 3, 3), (SNGAN32_BATCH, 256, 32, 32), 1, 1, False),
    ("sngan32", "D.conv32", "conv", (128, 128, 3, 3), (SNGAN32_BATCH, 128, 32, 32), 1, 1, False),
    ("sngan32", "D.conv8", "conv", (128, 128, 3, 3), (SNGAN32_BATCH, 128, 8, 8), 1, 1, True),
    ("sngan32", "D.l5", "linear", (1, 128), (SNGAN32_BATCH, 128), 1, 0, False),
    # StyleGAN2 256x256
    ("stylegan2_256", "map.fc", "linear", (512, 512), (STYLEGAN2_256_BATCH, 512), 1, 0, True),
    ("stylegan2_256", "G.conv8", "conv", (512, 512, 3, 3), (STYLEGAN2_256_BATCH, 512, 8, 8), 1, 1, False),
    ("stylegan2_256", "G.conv32", "conv", (512, 512, 3, 3), (STYLEGAN2_256_BATCH, 512, 32, 32), 1, 1, False),
    ("stylegan2_256", "G.conv64", "conv", (256, 256, 3, 3), (STYLEGAN2_256_BATCH, 256, 64, 64), 1, 1, False),
    ("stylegan2_256", "G.conv128", "conv", (128, 128, 3, 3), (STYLEGAN2_256_BATCH, 128, 128, 128), 1, 1, False),
    ("stylegan2_256", "G.conv256", "conv", (64, 64, 3, 3), (STYLEGAN2_256_BATCH, 64, 256, 256), 1, 1, False),
    ("stylegan2_256", "G.rgb256", "conv", (3, 64, 1, 1), (STYLEGAN2_256_BATCH, 64, 256, 256), 1, 0, False),
    ("stylegan2_256", "D.conv4", "conv", (512, 512, 3, 3), (STYLEGAN2_256_BATCH, 512, 4, 4), 1, 1, True),
    ("stylegan2_256", "D.fc", "linear", (512, 512 * 4 * 4), (STYLEGAN2_256_BATCH, 512 * 4 * 4), 1, 0, False),
    # FastGAN 256x256 (ngf = ndf = 64): up-block convs output 2x channels for the GLU; its first layer is a
    # transposed conv from the 256-d noise (1x1) to 4x4 with 2 * 1024 channels
    ("fastgan256", "G.init", "conv_transpose", (2048, 256, 4, 4), (FASTGAN256_BATCH, 256, 1, 1), 1, 0, True),
    ("fastgan256", "G.up8", "conv", (1024, 1024, 3, 3), (FASTGAN256_BATCH, 1024, 8, 8), 1, 1, True),
    ("fastgan256", "G.up16", "conv", (512, 512, 3, 3), (FASTGAN256_BATCH, 512, 16, 16), 1, 1, False),
    ("fastgan256", "G.up64", "conv", (256, 128, 3, 3), (FASTGAN256_BATCH, 128, 64, 64), 1, 1, False),
    ("fastgan256", "G.up256", "conv", (64, 64, 3, 3), (FASTGAN256_BATCH, 64, 256, 256), 1, 1, False),
    ("fastgan256", "G.se", "conv", (128, 512, 4, 4), (FASTGAN256_BATCH, 512, 4, 4), 1, 0, True),
    ("fastgan256", "D.down64", "conv", (128, 64, 4, 4), (FASTGAN256_BATCH, 64, 64, 64), 2, 1, False),
    ("fastgan256", "D.down16", "conv", (512, 256, 4, 4), (FASTGAN256_BATCH, 256, 16, 16), 2, 1, False),
]
