"""The run's components built from config, as lightning-hydra-template does: `hydra.utils.instantiate` of the
codec's entry and of the cache policy's partial. Their constructors own validation; this module only turns a
failed instantiation into the one-line error the CLI prints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from harness.codecs import Codec
from harness.errors import HarnessError
from harness.registry import unknown_message
from harness.runtime.policy import CachePolicy


def instantiate(where: str, conf: DictConfig) -> Any:
    """hydra.utils.instantiate, its errors in one line: a constructor's own HarnessError as it is, anything else
    (an option the component does not take, a target that does not import) prefixed with the config key."""
    try:
        return hydra.utils.instantiate(conf)
    except InstantiationException as e:
        if isinstance(e.__cause__, HarnessError):
            raise e.__cause__ from None
        cause = e.__cause__ if e.__cause__ is not None else e
        raise HarnessError(f"{where}: {' '.join(str(cause).split())}") from None


def build_codec(compress: DictConfig) -> Codec:
    """The codec `compress.codec` names, built from its entry in `compress.codecs` (a new instance per call)."""
    name = compress.codec
    if name not in compress.codecs:
        raise HarnessError(unknown_message("codec", name, compress.codecs))
    return instantiate(f"compress.codec={name}", compress.codecs[name])


def policy_factory(cache: DictConfig) -> Callable[..., CachePolicy]:
    """The `cache` config as a partial of make_policy: called with the runtime (and `captured`) once the layers
    are compressed, or with an empty runtime to check the options before the model loads."""
    return instantiate(f"cache={cache.get('name')}", cache)
