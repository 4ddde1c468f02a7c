from .agent import Agent, AgentExit

__all__ = ["Agent", "AgentExit"]
