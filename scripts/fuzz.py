#!/usr/bin/env python3
"""Run the decoder fuzz properties of tests/test_fuzz.py for longer.

    python scripts/fuzz.py --examples 20000            # every property, hypothesis
    python scripts/fuzz.py -k session --examples 5000  # properties whose name has "session"
    python scripts/fuzz.py --atheris -k mutated -- -max_total_time=600

With --atheris (if installed; not a dependency) one property is driven by
libFuzzer through hypothesis's ``fuzz_one_input``; arguments after ``--`` go
to libFuzzer.
"""

import argparse
import os
import sys
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000, help="examples per property (default 10000)")
    parser.add_argument("-k", default="", help="only properties whose name contains this")
    parser.add_argument("--atheris", action="store_true", help="drive the first matching property with atheris")
    parser.add_argument("libfuzzer_args", nargs="*", help="after --: passed to libFuzzer")
    args = parser.parse_args()

    os.environ["TURBO_FUZZ_EXAMPLES"] = str(args.examples)  # read when test_fuzz is imported
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import test_fuzz

    props = [
        getattr(test_fuzz, name)
        for name in dir(test_fuzz)
        if name.startswith("test_") and args.k in name and hasattr(getattr(test_fuzz, name), "hypothesis")
    ]
    if not props:
        sys.exit(f"no property matches -k {args.k!r}")

    if args.atheris:
        try:
            import atheris
        except ImportError:
            sys.exit("--atheris needs the atheris package (pip install atheris); it is not a dependency")
        prop = props[0]
        print(f"atheris: {prop.__name__}")
        atheris.Setup([sys.argv[0], *args.libfuzzer_args], prop.hypothesis.fuzz_one_input)
        atheris.Fuzz()
        return

    for prop in props:
        start = time.perf_counter()
        print(f"{prop.__name__}: {args.examples} examples ...", end=" ", flush=True)
        prop()  # raises with the falsifying example on failure
        print(f"ok ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
