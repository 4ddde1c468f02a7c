"""Optional LLM clients with cost tracking, for rollouts that call a model.

    from arservice.models import get_model
    model = get_model({"model_class": "openrouter", "model_name": "anthropic/claude-sonnet-4",
                       "model_kwargs": {"temperature": 0}})
    answer = model.query([{"role": "user", "content": "hi"}])   # content, usage, cost, ...

Nothing here needs a third-party package; litellm is imported only by its own class.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .cost import GLOBAL, CostLimitExceeded, CostTracker, PriceTable
from .http import ModelError

if TYPE_CHECKING:
    from .base import Model

# model_class -> "module:Class", imported on use (so litellm is never imported unless asked for).
MODEL_CLASSES = {
    "openai": "arservice.models.openai:OpenAIModel",
    "openrouter": "arservice.models.openai:OpenRouterModel",
    "anthropic": "arservice.models.anthropic:AnthropicModel",
    "litellm": "arservice.models.litellm_model:LitellmModel",
}


def get_model(config: dict[str, Any]) -> "Model":
    """A model from `{"model_class", "model_name", "model_kwargs"?, ...}`; other keys go to the class."""
    config = dict(config)
    name = config.pop("model_class", None)
    path = MODEL_CLASSES.get(name) or (name if isinstance(name, str) and ":" in name else None)
    if path is None:
        raise ValueError(f"unknown model_class {name!r}: one of {', '.join(MODEL_CLASSES)} or 'module:Class'")
    module, cls = path.split(":")
    if "model_name" not in config:
        raise ValueError("a model config needs 'model_name'")
    model: Model = getattr(importlib.import_module(module), cls)(**config)
    return model


__all__ = ["get_model", "MODEL_CLASSES", "ModelError", "CostLimitExceeded", "CostTracker", "PriceTable", "GLOBAL"]
