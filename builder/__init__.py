"""mbrescue: capture a host's boot disk region and build a rescue ISO that restores it."""

__version__ = "0.1.0"
