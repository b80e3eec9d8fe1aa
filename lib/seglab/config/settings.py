"""The settings objects every stage takes, made once from a notebook's validated params.

A notebook's params (``params/<profile>/NN_name.yaml``, validated by
:mod:`seglab.config.params`) reach the library as two typed objects, never as
loose keyword copies:

- :class:`MaskSettings`: how network outputs become instance masks (diameter,
  flow and cell-probability thresholds, minimum size, dynamics iterations).
  Its field defaults are THE defaults of the library: ``Model.segment``,
  ``seglab predict``, the output caches and every experiment take a
  ``MaskSettings``; nothing else declares a default for them.
- :class:`TrainSettings`: the hyper-parameters of one fine-tune (names follow
  cellpose's ``train_seg``; ``epochs`` is the params key and the field).

Both are frozen dataclasses; ``replace(**changes)`` gives a variant (a sweep
point), ``as_dict()`` the plain mapping that cache keys and run records hash.

What ``diameter_px`` means
--------------------------
One meaning everywhere (params, ``Model.segment``, ``seglab predict``):

- a number: the objects' diameter in px; the image is rescaled by
  ``model.diam_mean_px / diameter_px`` before the network sees it;
- ``None`` (params ``null``): the model's own default: :data:`DIAMETER_AUTO`
  for the tiny nets (trained at one canonical diameter), :data:`DIAMETER_NATIVE`
  for cpsam (which was trained across scales);
- :data:`DIAMETER_AUTO` (``"auto"``): estimated per tile (Otsu + watershed on DAPI);
- :data:`DIAMETER_NATIVE` (``"native"``): no rescaling.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from seglab import SeglabError

DIAMETER_AUTO = "auto"
DIAMETER_NATIVE = "native"
DIAMETER_WORDS = (DIAMETER_AUTO, DIAMETER_NATIVE)


def check_diameter(value: Any, source: str = "diameter_px") -> float | str | None:
    """``value`` as a diameter setting: a float > 0 (px), ``None``, ``"auto"`` or ``"native"``."""
    if value is None or (isinstance(value, str) and value in DIAMETER_WORDS):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0:
        raise SeglabError(f"{source}: {value!r} is not a diameter; give a number of px > 0, null (the model's "
                          f"default), '{DIAMETER_AUTO}' (estimated per tile) or '{DIAMETER_NATIVE}' (no rescaling)")
    return float(value)


class _Settings:
    """Shared behaviour of the settings dataclasses: from params, replace, as a plain dict."""

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_params(cls, params: Mapping, **overrides):
        """The settings named in ``params`` (other keys are ignored); missing ones take the defaults."""
        given = {k: params[k] for k in cls.keys() if k in params}
        return cls(**{**given, **overrides})

    def replace(self, **changes):
        unknown = sorted(set(changes) - set(self.keys()))
        if unknown:
            raise SeglabError(f"{type(self).__name__}: unknown settings {unknown} (known: {list(self.keys())})")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MaskSettings(_Settings):
    """How a model's network outputs become instance masks (cellpose's dynamics and filters).

    diameter_px : objects' diameter in px, None (the model's default), ``"auto"`` or
        ``"native"``; see the module docstring.
    flow_threshold : largest mean squared error between a mask's flows and the
        flows recomputed from the mask; masks above it are dropped (0 keeps all).
    cellprob_threshold : pixels with cell probability logit above it are foreground.
    min_size : masks smaller than this many px (area) are removed (-1 keeps all).
    niter : iterations of the flow dynamics; None: what cellpose's eval uses
        (200 at the network's scale, divided by the rescale factor).
    """

    diameter_px: float | str | None = None
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_size: int = 15
    niter: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "diameter_px", check_diameter(self.diameter_px))
        object.__setattr__(self, "flow_threshold", float(self.flow_threshold))
        object.__setattr__(self, "cellprob_threshold", float(self.cellprob_threshold))
        object.__setattr__(self, "min_size", int(self.min_size))
        if self.niter is not None:
            if int(self.niter) < 1:
                raise SeglabError(f"niter: {self.niter} must be >= 1 or null (cellpose's default)")
            object.__setattr__(self, "niter", int(self.niter))

    @property
    def mask_key(self) -> tuple:
        """The settings that shape masks from given outputs: (flow, cellprob, min_size, niter)."""
        return (self.flow_threshold, self.cellprob_threshold, self.min_size, self.niter)


@dataclass(frozen=True)
class TrainSettings(_Settings):
    """Hyper-parameters of one fine-tuning run (names follow cellpose's ``train_seg``).

    epochs : training epochs (>= 1).
    learning_rate, weight_decay : AdamW; the rate warms up linearly from 0 over
        the first 10 epochs and is halved in steps near the end (cellpose's schedule).
    batch_size : crops per optimizer step.
    bsize : crop size in px (256 for cpsam; a multiple of 8 for tiny nets).
    nimg_per_epoch : crops per epoch (None: the number of training images).
    scale_range : augmentation scales images by 1 +- scale_range / 2 (fraction).
    rescale : scale each image so its median object diameter becomes the net's
        canonical diameter (``diam_mean_px``); None: True for tiny nets, False for cpsam.
    min_train_masks : images with fewer objects are dropped (with a loud warning).
    checkpoint_every : epochs per chunk / checkpoint.
    seed : seeds numpy and torch.
    normalize : percentile-normalise each image channel (cellpose's default).
    """

    epochs: int = 10
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    bsize: int = 256
    nimg_per_epoch: int | None = None
    scale_range: float = 0.5
    rescale: bool | None = None
    min_train_masks: int = 5
    checkpoint_every: int = 5
    seed: int = 0
    normalize: bool = True

    def __post_init__(self):
        def bad(key, why):
            raise SeglabError(f"train settings: {key}={getattr(self, key)!r} {why}")

        if int(self.epochs) < 1:
            bad("epochs", "must be >= 1")
        if not self.learning_rate > 0:
            bad("learning_rate", "must be > 0")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if int(self.batch_size) < 1:
            bad("batch_size", "must be >= 1")
        if int(self.bsize) < 16 or int(self.bsize) % 8:
            bad("bsize", "must be a multiple of 8 and >= 16 (256 for cpsam)")
        if self.nimg_per_epoch is not None and int(self.nimg_per_epoch) < 1:
            bad("nimg_per_epoch", "must be >= 1 or null")
        if not 0 <= self.scale_range <= 2:
            bad("scale_range", "must be in [0, 2]")
        if int(self.min_train_masks) < 0:
            bad("min_train_masks", "must be >= 0")
        if int(self.checkpoint_every) < 1:
            bad("checkpoint_every", "must be >= 1")

    def cache_fields(self) -> dict:
        """The fields that decide the trained weights, for cache keys: every field, with
        ``nimg_per_epoch`` left out when None (as the fine-tune cache has always keyed it)."""
        out = self.as_dict()
        if out["nimg_per_epoch"] is None:
            del out["nimg_per_epoch"]
        return out
