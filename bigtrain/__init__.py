"""bigtrain: LoRA fine-tuning of very large causal LMs with a ZeRO-3-sharded frozen base and
replicated adapters, on DeepSpeed."""

__version__ = "0.1.0"
