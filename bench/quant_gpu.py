"""model.quantize on one GPU: the dequantization kernels, Triton against eager.

For the largest linear weights of GPT-3 6.7B and 13B (the MLP's d_model × 4·d_model), as one, two
and (6.7B) three ranks' gathered rows (three: partitions that end inside a block, the fallback
path), and for both schemes (int8, nf4): what training runs on a GPU (``Scheme.dequantize``: the
Triton kernels of ``quantize._triton_kernels``) gives the CPU's eager values bit for bit, and how long
it takes against eager PyTorch on the GPU (median of 20 after 3 warm-ups, CUDA events), as
effective bandwidth over the bytes read (stored form) plus written (bf16). Writes
``quant_gpu.json`` under --out; exits 1 if any row differs.

  python bench/quant_gpu.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bigtrain import quantize as Z  # noqa: E402


def timed(fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for name, d, worlds in (("gpt3-6.7b", 4096, (1, 2, 3)), ("gpt3-13b", 5120, (1, 2))):
        numel = 4 * d * d
        for world in worlds:
            part = -(-numel // world)
            x = torch.randn(world, part, generator=g, device=dev, dtype=torch.bfloat16) * 0.02
            for scheme in ("int8", "nf4"):
                s = Z.SCHEMES[scheme]
                parts = [s.quantize(x[r]) for r in range(world)]
                stacked = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
                out = torch.empty(world, part, dtype=torch.bfloat16, device=dev)
                fast = s.dequantize(stacked, part, torch.bfloat16, out=out).cpu()
                ref = s.dequantize({k: v.cpu() for k, v in stacked.items()}, part, torch.bfloat16)
                same = bool(torch.equal(fast, ref))
                t_fast = timed(lambda: s.dequantize(stacked, part, torch.bfloat16, out=out))
                if scheme == "int8":
                    def eager():
                        full = torch.zeros(world, -(-part // 64) * 64, device=dev)
                        full[:, :part] = stacked["values"]
                        full = full.view(world, -1, 64).mul_(stacked["scales"][..., None]).view(world, -1)
                        return out.copy_(full[:, :part])
                else:
                    def eager():
                        sc = Z._nf4_scales(stacked["scales"], stacked["scales2"])
                        return out.copy_(Z._nf4_values(stacked["codes"], sc, torch.bfloat16, 64)[..., :part])
                t_eager = timed(eager)
                stored = world * s.nbytes(part)
                moved = stored + 2 * world * part
                err = float((x.float() - fast.to(dev).float()).norm() / x.float().norm())
                row = dict(model=name, weight=f"{d}x{4 * d}", world=world, scheme=scheme, bit_equal=same,
                           triton_ms=1e3 * t_fast, eager_ms=1e3 * t_eager,
                           triton_gbps=moved / t_fast / 1e9, eager_gbps=moved / t_eager / 1e9,
                           stored_bytes=stored, bf16_bytes=2 * world * part, rel_frobenius=err)
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "quant_gpu.json").write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if not r["bit_equal"]]
    print("GPU kernels == CPU eager bit for bit:", "yes" if not bad else f"NO for {len(bad)} rows")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
