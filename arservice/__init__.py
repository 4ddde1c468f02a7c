"""arservice: the Agent Rollout Service."""


def __getattr__(name: str) -> str:
    # __version__ comes from the installed package's metadata, read on first use: importing
    # importlib.metadata costs about 15 ms, which every agent start would pay otherwise.
    if name != "__version__":
        raise AttributeError(f"module 'arservice' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("arservice")
    except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
        return "0+unknown"
