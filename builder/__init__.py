"""mbrescue: capture a host's boot disk region and build a rescue ISO that restores it."""

# One version for both halves: the runner package is copied alone into the rescue system
# (as `mbrescue_runner`), so it holds the number and the builder takes it from there.
from .runner import __version__ as __version__
