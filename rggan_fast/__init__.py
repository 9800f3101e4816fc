"""rggan_fast: RG-GAN (dynamic regenerative pruning) training on top of rgkernels' masked layers.

    python -m rggan_fast.train sngan [options]     # train (see rggan_fast/train.py)
    python -m rggan_fast.demo                       # the ~10 minute CPU demo on lfw100
"""
__version__ = "0.1.0"
