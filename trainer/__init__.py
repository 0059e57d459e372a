"""Training on top of engine (no Qt): ``dosepilot train STAGE ...`` (:mod:`trainer.cli`).

Shared machinery: presets (:mod:`.config`), datasets and augmentation (:mod:`.data`), on-disk
caches (:mod:`.caches`), torchrun DDP (:mod:`.distributed`), atomic checkpoints
(:mod:`.checkpointing`), the event log (:mod:`.events`), the loop (:mod:`.loop`), LoRA
(:mod:`.lora`) and the DiffusionNFT objective (:mod:`.nft`). Stages live in :mod:`.stages`.
"""
