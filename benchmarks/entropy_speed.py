"""Throughput of the `entropy` encoding method's codecs on 1 MB streams.

Run: ``python benchmarks/entropy_speed.py [--mb 1] [--repeat 3]``. Prints, per stream kind
and codec, the coded size and the best-of-``repeat`` encode and decode times. The streams
mimic what an artifact holds: quantized weights (Laplace-shaped int8), cluster indices with a
few dominant values (very skewed), and incompressible random bytes (the worst case for the
Huffman decoder, which then decodes only about two symbols per table lookup).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from autoshrink_plugins.entropy import Entropy


def streams(size: int) -> dict[str, bytes]:
    """The benchmark inputs, ``size`` bytes each, from a fixed seed."""
    rng = np.random.default_rng(0)
    laplace = np.clip(np.round(rng.laplace(0, 6, size)), -128, 127).astype(np.int8)
    skew = np.array([0.6, 0.2, 0.1, 0.05, 0.03, 0.02])
    return {
        "skewed indices": rng.choice(len(skew), size, p=skew).astype(np.uint8).tobytes(),
        "int8 weights": laplace.tobytes(),
        "random bytes": rng.bytes(size),
    }


def best_of(repeat: int, fn: Callable[[], bytes]) -> tuple[float, bytes]:
    """The fastest of ``repeat`` timed calls (the others absorb warm-up), and the result."""
    times, result = [], b""
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.0, help="stream size in MB (10**6 bytes)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best is shown")
    args = parser.parse_args()
    method = Entropy()
    size = int(args.mb * 1_000_000)
    print(f"{'stream':<16}{'codec':<9}{'ratio':>7}{'encode s':>10}{'decode s':>10}{'MB/s dec':>10}")
    for kind, data in streams(size).items():
        for codec in ("huffman", "lzma", "zlib"):
            config = method.config({"codec": codec})
            enc_s, coded = best_of(args.repeat, lambda c=config, d=data: method.encode(d, c))
            dec_s, back = best_of(args.repeat, lambda c=config, e=coded: method.decode(e, c))
            assert back == data, f"{codec} did not round-trip {kind}"
            print(
                f"{kind:<16}{codec:<9}{len(coded) / len(data):>7.3f}{enc_s:>10.3f}"
                f"{dec_s:>10.3f}{size / 1e6 / dec_s:>10.1f}"
            )


if __name__ == "__main__":
    main()
