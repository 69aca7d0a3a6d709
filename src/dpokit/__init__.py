"""dpokit: SFT and DPO preference training with checkpoints you can trust."""

__version__ = "0.1.0"
