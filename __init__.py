"""nanoswarm: peer-to-peer volunteer compute sharing for GPT inference."""

__version__ = "0.1.0"
