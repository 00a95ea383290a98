"""The reward registry: the one place where rewards are declared, built and cached.

Declaring
---------
``@register_reward(name, needs_weights=..., uses_prompt=..., version=...)`` registers a factory.
``needs_weights`` is required: ``False`` marks a *weight-free* reward (cheap, deterministic, no
checkpoint; :func:`weight_free_rewards`), which refuses ``weights``. ``uses_prompt`` and
``version`` are declared when they are the same for every instance (weight-free rewards and the
shapes judge); a model reward's version names its checkpoint, so it is left ``None`` and read from
the built reward. A built reward must agree with what its registration declares.
``domains`` names the data domains (``data.domain``) a reward can score, ``None`` = every domain:
``shapes_alignment`` parses shapes captions only (``domains=("shapes",)``), so preflight refuses it
for ``data.domain=import`` (:func:`reward_domain_problem`), and :func:`weight_free_rewards` with a
``domain`` lists the weight-free rewards valid there (docs/architecture.md, "Imported data").

Every factory is called as ``factory(device=..., [weights=...], **options)`` and must accept
``device`` (weight-free rewards ignore it: they run on the CPU).

Building
--------
* :func:`create_reward` builds a fresh reward every call.
* :func:`get_reward` builds once per process and caches by ``(name, options)``; one cache for
  everything here, emptied by :func:`clear_reward_cache`.
* :func:`load_rewards` turns ``params.score`` into :class:`LazyReward` objects that build through
  :func:`get_reward` on first use; their ``version`` and ``uses_prompt`` come from the declaration
  when there is one, so an up-to-date score table is skipped without building anything.
* :func:`mean_normalized_scores` scores generated images with the weight-free rewards (the
  ``reward/<name>`` metrics of training).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from miroflow.config import ScoreConfig
from miroflow.rewards.base import Reward, RewardBuildError, RewardNotFound

__all__ = [
    "RewardFactory",
    "RewardSpec",
    "register_reward",
    "available_rewards",
    "reward_spec",
    "weight_free_rewards",
    "reward_domain_problem",
    "create_reward",
    "get_reward",
    "clear_reward_cache",
    "LazyReward",
    "load_rewards",
    "reward_versions",
    "mean_normalized_scores",
]

log = logging.getLogger(__name__)

RewardFactory = Callable[..., Reward]
_F = TypeVar("_F", bound=RewardFactory)


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: its factory and what it declares about every instance.

    Attributes:
        name: registered name (also the reward's ``name``).
        factory: ``(device=..., [weights=...], **options) -> Reward``.
        needs_weights: ``False`` for weight-free rewards (``weights`` is refused).
        uses_prompt: the instances' ``uses_prompt``, or ``None`` when only a built reward knows it.
        version: the instances' ``version``, or ``None`` when it depends on the options (checkpoint).
        domains: the data domains (``data.domain`` values) the reward can score; ``None`` = every domain.
    """

    name: str
    factory: RewardFactory
    needs_weights: bool
    uses_prompt: bool | None = None
    version: str | None = None
    domains: tuple[str, ...] | None = None


_REGISTRY: dict[str, RewardSpec] = {}
_CACHE: dict[tuple[str, str], Reward] = {}
_CACHE_LOCK = threading.Lock()


def register_reward(
    name: str,
    *,
    needs_weights: bool,
    uses_prompt: bool | None = None,
    version: str | None = None,
    domains: tuple[str, ...] | None = None,
) -> Callable[[_F], _F]:
    """Decorator registering a factory under ``name`` with its declarations (see the module docstring).

    Raises:
        ValueError: ``name`` is already registered, ``version`` is an empty string, or ``domains`` is empty.
    """
    if version is not None and not version:
        raise ValueError(f"reward {name!r}: an empty version; declare None when it is not static")
    if domains is not None and not domains:
        raise ValueError(f"reward {name!r}: empty domains; declare None for a reward valid in every domain")

    def deco(factory: _F) -> _F:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} registered twice")
        doms = tuple(domains) if domains is not None else None
        _REGISTRY[name] = RewardSpec(name, factory, bool(needs_weights), uses_prompt, version, doms)
        return factory

    return deco


def available_rewards() -> list[str]:
    """Sorted names of all registered rewards."""
    return sorted(_REGISTRY)


def reward_spec(name: str, where: str = "") -> RewardSpec:
    """The registration of ``name``.

    Args:
        where: the config entry the name came from, for the error message (e.g. ``"score.rewards"``).

    Raises:
        RewardNotFound: for an unknown name, listing the valid ones.
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        ctx = f" in {where}" if where else ""
        raise RewardNotFound(f"unknown reward {name!r}{ctx}; valid rewards: {', '.join(available_rewards())}")
    return spec


def weight_free_rewards(domain: str | None = None) -> tuple[str, ...]:
    """Names of the rewards registered with ``needs_weights=False``, in registration order.

    Args:
        domain: a ``data.domain`` value: keep only the rewards that can score it (``domains``); ``None``
            = all of them. ``weight_free_rewards("import")`` is the import domain's default
            ``score.rewards`` (``miroflow.config.IMPORT_DEFAULT_REWARDS`` is checked against it).
    """
    return tuple(
        n
        for n, s in _REGISTRY.items()
        if not s.needs_weights and (domain is None or s.domains is None or domain in s.domains)
    )


def reward_domain_problem(field: str, name: str, domain: str) -> str | None:
    """The preflight line refusing reward ``name`` (from params key ``field``) for ``data.domain=domain``.

    Returns:
        ``"<field>: '<name>' scores <domains> captions only; not valid for data.domain=<domain>"`` when
        the reward declares ``domains`` without ``domain``; ``None`` when it is valid there or unknown
        (unknown names are reported by the unknown-reward check).
    """
    spec = _REGISTRY.get(name)
    if spec is None or spec.domains is None or domain in spec.domains:
        return None
    return f"{field}: {name!r} scores {'/'.join(spec.domains)} captions only; not valid for data.domain={domain}"


def _options(spec: RewardSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for the factory of ``spec``: ``weights=None`` is dropped for weight-free rewards.

    Raises:
        ValueError: weights given to a weight-free reward.
    """
    out = dict(kwargs)
    if not spec.needs_weights and "weights" in out:
        if out.pop("weights") is not None:
            raise ValueError(
                f"score.reward_weights.{spec.name}: reward {spec.name!r} is weight-free and takes no weights; "
                f"remove score.reward_weights.{spec.name} from params.yaml"
            )
    return out


def _build(spec: RewardSpec, kwargs: dict[str, Any]) -> Reward:
    """Call the factory and check the result against the declarations."""
    reward = spec.factory(**_options(spec, kwargs))
    if getattr(reward, "name", spec.name) != spec.name:
        log.warning("reward registered as %r reports name %r", spec.name, reward.name)
    if spec.version is not None and str(reward.version) != spec.version:
        raise ValueError(
            f"reward {spec.name!r} is registered with version {spec.version!r} but built {reward.version!r}"
        )
    if spec.uses_prompt is not None and bool(reward.uses_prompt) != spec.uses_prompt:
        raise ValueError(
            f"reward {spec.name!r} is registered with uses_prompt={spec.uses_prompt} but built "
            f"uses_prompt={reward.uses_prompt}"
        )
    return reward


def create_reward(name: str, **kwargs: Any) -> Reward:
    """Build a fresh reward by name. ``kwargs`` go to its factory (e.g. ``weights=``, ``device=``).

    Raises:
        RewardNotFound: for an unknown name, listing the valid ones.
        ValueError: weights for a weight-free reward.
    """
    return _build(reward_spec(name), kwargs)


def _cache_key(name: str, kwargs: dict[str, Any]) -> tuple[str, str]:
    return name, json.dumps(kwargs, sort_keys=True, default=str)


def get_reward(name: str, **kwargs: Any) -> Reward:
    """The reward ``name`` built with ``kwargs``, once per process (thread-safe, cached).

    Raises:
        RewardNotFound: for an unknown name, listing the valid ones.
    """
    spec = reward_spec(name)
    key = _cache_key(name, kwargs)
    with _CACHE_LOCK:
        reward = _CACHE.get(key)
        if reward is None:
            reward = _CACHE[key] = _build(spec, kwargs)
        return reward


def clear_reward_cache() -> None:
    """Forget every reward built by :func:`get_reward` (and :class:`LazyReward`) in this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


class LazyReward:
    """A :class:`~miroflow.rewards.Reward` that builds the real reward on first use.

    Args:
        name: registered reward name.
        kwargs: keyword arguments for its factory.

    ``name`` never builds; ``version`` and ``uses_prompt`` build only when the registration does not
    declare them; ``score`` and ``normalize`` build. Built rewards are shared per process through
    the cache of :func:`get_reward`.

    Raises:
        RewardNotFound: (on construction) an unknown name.
    """

    def __init__(self, name: str, kwargs: dict[str, Any] | None = None) -> None:
        self.name = name
        self.kwargs = dict(kwargs or {})
        self.spec = reward_spec(name)
        self._key = _cache_key(name, self.kwargs)

    @property
    def built(self) -> bool:
        """Whether the underlying reward has been built in this process."""
        with _CACHE_LOCK:
            return self._key in _CACHE

    def get(self) -> Reward:
        """The real reward (built once per process and cached).

        Raises:
            RewardBuildError: the factory failed (names the reward and the options given).
        """
        try:
            return get_reward(self.name, **self.kwargs)
        except Exception as err:
            raise RewardBuildError(
                f"reward {self.name!r}: cannot build it with {sorted(self.kwargs)} ({type(err).__name__}: {err})"
            ) from err

    @property
    def version(self) -> str:
        """Reward version: the declared one, else the built reward's."""
        if self.spec.version is not None:
            return self.spec.version
        return str(self.get().version)

    @property
    def uses_prompt(self) -> bool:
        """Whether the reward reads the prompt: the declared value, else the built reward's."""
        if self.spec.uses_prompt is not None:
            return self.spec.uses_prompt
        return bool(self.get().uses_prompt)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw scores ``[B]`` for images ``[B, 3, H, W]`` in [0, 1] (delegates)."""
        return self.get().score(images, prompts)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Normalised scores ``[N]`` (delegates)."""
        return self.get().normalize(raw)

    def __repr__(self) -> str:
        return f"LazyReward({self.name!r}, built={self.built})"


def load_rewards(cfg: ScoreConfig) -> list[Reward]:
    """Lazy rewards for ``cfg.rewards`` in order (nothing is built here).

    Each factory gets ``device=cfg.device`` and, only when configured, ``weights=cfg.reward_weights[name]``.

    Raises:
        RewardNotFound: an unknown reward name (the message lists the valid ones).
        ValueError: no or duplicate names, or weights for a weight-free reward.
    """
    names = list(cfg.rewards)
    if not names:
        raise ValueError("score.rewards: empty; name at least one reward")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"score.rewards: duplicate reward(s) {dupes}")
    for extra in sorted(set(cfg.reward_weights) - set(names)):
        log.warning("score.reward_weights.%s is set but %r is not in score.rewards; ignored", extra, extra)
    out: list[Reward] = []
    for name in names:
        spec = reward_spec(name, "score.rewards")
        kwargs: dict[str, Any] = {"device": cfg.device}
        weights = cfg.reward_weights.get(name)
        if weights is not None:
            kwargs["weights"] = weights
        out.append(LazyReward(name, _options(spec, kwargs)))
    return out


def reward_versions(rewards: Iterable[Reward]) -> dict[str, str]:
    """``{name: version}`` of ``rewards`` (what score tables and manifests record)."""
    return {r.name: str(r.version) for r in rewards}


def mean_normalized_scores(names: Iterable[str], images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """``{"reward/<name>": mean normalised score}`` of ``images`` for the weight-free rewards among ``names``.

    Args:
        names: reward names; those not registered as weight-free (or not registered) are skipped.
        images: ``[B, 3, H, W]`` float in [0, 1].
        prompts: ``B`` captions.

    Returns:
        ``float(r.normalize(r.score(images, prompts)).float().nanmean())`` per reward (NaN when every
        value is absent); rewards are built once per process (:func:`get_reward`).
    """
    free = set(weight_free_rewards())
    out: dict[str, float] = {}
    for name in names:
        if name not in free:
            continue
        r = get_reward(name)
        out[f"reward/{name}"] = float(r.normalize(r.score(images, prompts)).float().nanmean())
    return out
