from .broker import INPROC_ADDRESS, Broker

__all__ = ["Broker", "INPROC_ADDRESS"]
