"""The restore runner and the disk-layout code it shares with the builder.

Standard library only: this package is copied as it is into the rescue system,
where a stripped Python 3.11 runs it, and it also backs `mbrescue capture`,
`mbrescue inspect` and `mbrescue restore` on any Linux. Imports inside the
package are relative so that it works under any package name.
"""

__version__ = "0.1.0"
