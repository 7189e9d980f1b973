"""The "what LoRA saves" table (docs/results.md) from ``bigtrain measure`` outputs (measure.json files, or the
.jsonl of them that bench/measure_h200.sh appends to).

  python bench/measure_table.py OUT/measure_1gpu.jsonl OUT/measure_2gpu.jsonl > table.md
  python bench/measure_table.py runs/x/measure/measure.json

One row per (setting, mode): per GPU, max over ranks, GiB (2**30 bytes): the peak that
torch.cuda.max_memory_allocated saw and bigtrain estimate's prediction (without the CUDA context, which
that counter does not see), the error (estimate / measured - 1), reserved, the model states counted on
the live tensors against their estimate, the rest (activations, buffers, logits), tokens/s per GPU;
then per setting the full / LoRA ratio of the peaks, measured and estimated. On CPU (tests) the
model states stand in for the peak.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GiB = 2 ** 30


def load(paths: list[str]) -> list[dict]:
    reports = []
    for p in paths:
        text = Path(p).read_text()
        if p.endswith(".jsonl"):
            reports += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            reports.append(json.loads(text))
    return reports


def _g(b) -> str:
    return "–" if b is None else f"{b / GiB:.1f}"


def _pct(e) -> str:
    return "–" if e is None else f"{e:+.1%}".replace("-", "−")


def table(reports: list[dict]) -> str:
    lines = ["| model | GPUs | act. ckpt | mode | peak allocated | estimate | error | reserved | "
             "model states (est.) | rest (est.) | tokens/s per GPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for rep in reports:
        setting = (f"| {rep['model']} | {rep['world_size']} | {'on' if rep['checkpointing'] else 'off'} ")
        for mode, m in rep["modes"].items():
            p = m["predicted"]
            tps = m.get("tokens_per_s_per_gpu")
            if m["status"] != "ok":
                fewest = p.get("fewest_gpus")
                where = (f"; the estimate: {fewest} GPUs of {rep['gpu_mem_bytes'] / GiB:.0f} GiB at the fewest"
                         if fewest else "")
                lines.append(f"{setting}| {mode} | **{m['status']}**{where} | {_g(p['peak_bytes'])} | – | – | "
                             f"– ({_g(p['states_total'])}) | – ({_g(p['rest_bytes'])}) | – |")
                continue
            peak = m.get("peak_allocated_bytes")
            lines.append(
                f"{setting}| {mode} | {_g(peak)} | {_g(p['peak_bytes'])} | {_pct(m.get('error'))} | "
                f"{_g(m.get('peak_reserved_bytes'))} | {_g(m['states_total'])} ({_g(p['states_total'])}) | "
                f"{_g(m.get('rest_bytes'))} ({_g(p['rest_bytes'])}) | {'–' if tps is None else f'{tps:,.0f}'} |")
        for k, r in rep.get("ratios", {}).items():
            meas = r.get("measured_peak")
            ratios.append(f"{rep['model']}, {rep['world_size']} GPU(s), act. ckpt "
                          f"{'on' if rep['checkpointing'] else 'off'}: {k} peak per GPU "
                          f"{'not measured' if meas is None else f'{meas:.2f}x measured'}, "
                          f"{r['predicted_peak']:.2f}x estimated")
    return "\n".join(lines + [""] + [f"- {r}" for r in ratios])


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    print(table(load(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
