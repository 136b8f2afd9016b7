"""CPU benchmark script; the code is lmconv_jax/benchmark.py (also `python -m lmconv_jax bench`).

  python benchmarks/bench_cpu.py [--shape 8,64,64,64] [--markdown F] [--json F]
"""

from lmconv_jax.benchmark import main

if __name__ == "__main__":
  main()
