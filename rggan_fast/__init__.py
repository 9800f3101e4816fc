"""rggan_fast: RG-GAN (dynamic regenerative pruning) training on top of rgkernels' masked layers.

    python -m rggan_fast.train sngan [options]     # train (see rggan_fast/train.py)
    python -m rggan_fast.demo                       # the CPU demo on lfw100 (about 6 minutes)
"""
__version__ = "0.1.0"
