"""The lab: Debian kernels booted under QEMU with a scripted /init, for tests and demos."""

# Here, not in lab.kernel, so that the CLI can name them without importing the lab.
FLAVORS = {"cloud": "cloud-amd64", "amd64": "amd64", "rt": "rt-amd64"}


class LabError(RuntimeError):
    """The lab could not build, boot or reach a guest; the message says what to do."""
