"""The engine: everything that touches DeepSpeed's ZeRO-3 internals, for a partitioned frozen base.

``core.Engine`` is the one object the training loop, checkpointing and export talk to. Below it:

* ``ds_config.py``: the DeepSpeed config a run uses (defaults, then the user's ``zero.ds_config``
  JSON, then the keys bigtrain owns), the checks on it made before any process group starts, and
  the checks on the installed DeepSpeed's private APIs;
* ``build.py``: building the frozen base one decoder layer at a time (``build_streamed``: a
  meta-device skeleton, each layer made on the device, initialised by the architecture's own
  ``_init_weights`` or read from a checkpoint, partitioned by ``deepspeed.zero.Init(module=layer)``,
  and with ``model.quantize`` quantized before the next layer exists), so no rank, host or device,
  ever holds the whole model or more than one unpartitioned layer of it; counting this rank's
  partition bytes;
* ``gather.py``: gathering the base during a step: by default bigtrain's ``LayerGatherer`` (one
  all-gather per decoder layer over DeepSpeed's partitions, the next layer prefetched), else
  ZeRO-3's own fetch/release hooks through ``DeepSpeedZeRoOffload`` alone (not
  ``deepspeed.initialize``; hpZ, offload and DeepSpeed's quantized weights need it). Neither needs an
  optimizer: backward is a plain ``loss.backward()``, and frozen parameters get no gradient, no fp32
  master and no Adam state. Also gathering whole parameters (``GatheredParameters``) and returning
  the leftovers of backward to their partitions;
* ``full_ft.py``: full fine-tuning under ``deepspeed.initialize`` (still built under ``zero.Init``
  through ``HfDeepSpeedConfig``), only for ``bigtrain measure``'s comparison.

Outside this package: ``bigtrain/dist.py`` starts the process group (through DeepSpeed's comm layer
at stage 3) and owns the collectives on replicated tensors; ``bigtrain/quantize.py`` the int8/nf4
schemes and kernels (no DeepSpeed); ``bigtrain/loader.py`` reads a checkpoint into the partitions.

The adapters are never handed to DeepSpeed: ZeRO-3 would otherwise partition them and their Adam
state and re-gather them after every step (it has no per-module opt-out, DeepSpeed #7271). They are
replicated instead, through the collectives in ``dist.py``.

Several of the APIs used here are private or undocumented (listed in ``ds_config.PRIVATE_APIS`` and
``ds_config.PARAM_ATTRS``) and may change between DeepSpeed releases: ``check_deepspeed_version``
checks that they are there, and warns when the installed DeepSpeed is another minor version than the
one this code was written against. DeepSpeed itself is imported only inside functions: importing it
is slow, and stage 0 runs (and ``bigtrain estimate``) never need it. This file holds no code: import
from the modules themselves.
"""
