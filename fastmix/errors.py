"""Error types shared by the `fastmix` commands and the library."""


class UsageError(ValueError):
    """A mistake in what was asked for (a flag, the config, the data, the checkpoint): the
    `fastmix` commands print its message alone, where any other error keeps its traceback."""
