"""Write the built-in shapes data set (no download): train/ and test/ image folders with captions and Q&A.

    python scripts/make_demo_data.py [--out data/shapes] [--train 4000] [--test 400] [--seed 0] [--held-out placements]

The test split holds attribute combinations that never occur in training: (colour, shape, position) triples
with ``--held-out placements`` (the default), whole colour-shape pairs with ``--held-out pairs``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demo.shapes import HELD_OUT, IMAGE_SIZE, write_imagefolder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/shapes")
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=IMAGE_SIZE, help="pixels per side")
    ap.add_argument("--held-out", choices=sorted(HELD_OUT), default="placements",
                    help="what the test split holds out of training (demo/shapes.py: HELD_OUT)")
    args = ap.parse_args()
    write_imagefolder(args.out, args.train, args.test, args.seed, args.size, args.held_out)
    print(f"shapes data set: {args.train} train / {args.test} held-out test images ({args.held_out}) in {args.out}")


if __name__ == "__main__":
    main()
