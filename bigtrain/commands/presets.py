"""``bigtrain presets``: the built-in model presets with their exact parameter counts (each model
built on the meta device; :mod:`bigtrain.presets` imports torch only there)."""

from __future__ import annotations

from ..presets import PRESETS, count_parameters, hf_config_for, meta_model


def add_parser(sub) -> None:
    pr = sub.add_parser("presets", help="list built-in model presets with exact parameter counts")
    pr.set_defaults(func=cmd_presets)


def cmd_presets(args) -> int:
    print(f"{'name':<12} {'arch':<8} {'layers':>6} {'d_model':>7} {'heads':>5} {'kv':>3} {'ffn':>6} "
          f"{'vocab':>7} {'context':>7} {'params':>16}  source")
    for name, p in PRESETS.items():
        n = count_parameters(meta_model(hf_config_for(name, vocab_size=1024)))
        print(f"{name:<12} {p.arch:<8} {p.layers:>6} {p.d_model:>7} {p.heads:>5} {p.kv_heads or p.heads:>3} "
              f"{p.ffn:>6} {p.vocab or 1024:>7} {p.context:>7} {n:>16,}  {p.source}")
    print("(kv: key/value heads, fewer than heads = grouped-query attention; tiny presets take the "
          "built-in tokenizer's vocabulary, counted here with 1024; model.num_layers=N changes any "
          "preset's depth)")
    return 0
