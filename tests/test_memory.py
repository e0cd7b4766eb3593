"""Bounded memory (issue #14): importing opdkit turns oneDNN's per-shape caches off, so bf16 matmuls whose shapes
change every step (a trainer's teacher scoring) do not grow RSS; scripts/soak.py measures a whole run
(docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# 300 bf16 linears, each with a new number of rows (as the teacher's chunked head / forward sees): RSS growth in MB
PROBE = r"""
import ctypes, json, os, sys
if sys.argv[1] == "opdkit":
    import opdkit  # noqa: F401  (sets the cache capacities unless the environment has them)
import torch
torch.set_num_threads(1)
libc = ctypes.CDLL("libc.so.6")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
w = torch.randn(256, 128, dtype=torch.bfloat16)
with torch.no_grad():
    for n in range(1, 21):
        torch.nn.functional.linear(torch.randn(n, 128, dtype=torch.bfloat16), w)
    libc.malloc_trim(0)
    start = rss()
    for n in range(21, 321):
        torch.nn.functional.linear(torch.randn(n, 128, dtype=torch.bfloat16), w)
libc.malloc_trim(0)
print(json.dumps({"growth_mb": rss() - start, "env": [os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
                                                       os.environ.get("LRU_CACHE_CAPACITY")]}))
"""


def _probe(mode: str, **env) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    full.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env)
    res = subprocess.run([sys.executable, "-c", PROBE, mode], env=full, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS from /proc (Linux)")
def test_bf16_matmuls_with_changing_shapes_do_not_grow_memory():
    plain = _probe("torch")  # the library defaults: a cache entry per new shape
    if plain["growth_mb"] < 20:
        pytest.skip(f"this CPU does not route bf16 matmuls through oneDNN's caches (+{plain['growth_mb']:.1f} MB)")
    fixed = _probe("opdkit")
    assert fixed["env"] == ["0", "1"]
    assert fixed["growth_mb"] < 0.1 * plain["growth_mb"] and fixed["growth_mb"] < 10, (plain, fixed)


def test_a_cache_capacity_set_by_the_user_is_kept():
    res = _probe("opdkit", ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024")
    assert res["env"] == ["1024", "1024"]
