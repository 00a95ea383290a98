"""Reward models: a small protocol, the registry (declare, build, cache), weight-free rewards, the shapes
judge and the real reward-model loaders.

Everything that builds a reward goes through :mod:`miroflow.rewards.registry`, re-exported here.
Importing this package registers the built-in rewards; the heavy optional dependencies of the model
rewards are imported only inside their factories.
"""

from miroflow.rewards import clip_models as _clip_models  # noqa: E402,F401  (registers rewards)
from miroflow.rewards import image_reward as _image_reward  # noqa: E402,F401  (registers rewards)
from miroflow.rewards import pickscore as _pickscore  # noqa: E402,F401  (registers rewards)
from miroflow.rewards import shapes_judge as _shapes_judge  # noqa: E402,F401  (registers rewards)

# Built-in rewards register themselves on import, in this order (weight_free_rewards() keeps it).
from miroflow.rewards import weightfree as _weightfree  # noqa: E402,F401  (registers rewards)
from miroflow.rewards.base import Reward, RewardBuildError, RewardNotFound
from miroflow.rewards.registry import (
    LazyReward,
    RewardSpec,
    available_rewards,
    clear_reward_cache,
    create_reward,
    get_reward,
    load_rewards,
    mean_normalized_scores,
    register_reward,
    reward_domain_problem,
    reward_spec,
    reward_versions,
    weight_free_rewards,
)

__all__ = [
    "Reward",
    "RewardBuildError",
    "RewardNotFound",
    "RewardSpec",
    "LazyReward",
    "available_rewards",
    "clear_reward_cache",
    "create_reward",
    "get_reward",
    "load_rewards",
    "mean_normalized_scores",
    "register_reward",
    "reward_domain_problem",
    "reward_spec",
    "reward_versions",
    "weight_free_rewards",
]
