"""Reward models: a small protocol, a registry, weight-free rewards, the shapes judge, real loaders."""

from miroflow.rewards.base import Reward, RewardNotFound, available_rewards, create_reward, register_reward

# Built-in rewards register themselves on import. Modules that need heavy optional
# dependencies import them lazily inside their factories.
from miroflow.rewards import weightfree as _weightfree  # noqa: F401,E402
from miroflow.rewards import shapes_judge as _shapes_judge  # noqa: F401,E402
from miroflow.rewards import models as _models  # noqa: F401,E402

__all__ = ["Reward", "RewardNotFound", "available_rewards", "create_reward", "register_reward"]
