"""The built-in demo: RG-SNGAN on lfw100 (100 faces shipped with scikit-image) at 32x32.

    python -m rggan_fast.demo [--outdir runs] [any other train option]

About 6 minutes on a quiet 2-core CPU (measured; see presets.NAMED_PRESETS['demo']); prints the
FID at each evaluation (a small-sample FID, labelled with its sample counts) and a summary at the end.
Same as `python -m rggan_fast.train sngan --preset demo`.
"""
import sys

from .train import main

if __name__ == "__main__":
    sys.exit(main(["sngan", "--preset", "demo", *sys.argv[1:]]))
