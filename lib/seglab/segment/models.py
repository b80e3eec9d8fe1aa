"""Model registry: one ``load(spec)`` for every segmenter the study uses.

Specs
-----
``cpsam`` / ``cpsam_v2``
    Cellpose-SAM weights from ``$CELLPOSE_LOCAL_MODELS_PATH`` (else
    ``~/.cellpose/models``). Never downloaded here: a missing file fails at once
    with the expected path and how to fetch it on a login node.
``tiny`` / ``tiny-xs`` / ``tiny-s`` / ``tiny-m``
    A small residual U-Net with random weights (seeded), driven by the same
    ``CellposeModel.eval`` and ``cellpose.train.train_seg`` calls as cpsam. The
    CPU stand-in for cpsam in the demo profile and the tests.
``generalist``
    The committed ``tiny`` generalist pretrained on DSB2018 nuclei
    (``lib/seglab/assets/generalist_tiny.pt``; see ``seglab pretrain-generalist``).
``cpsam-random``
    cpsam's architecture with random weights (timing only; 305 M parameters).
``classical``
    Otsu threshold + distance-transform watershed (scikit-image); no weights.
a path
    A checkpoint written by seglab: ``<name>.pt`` (a bare state dict, loaded with
    ``torch.load(weights_only=True)``) beside ``<name>.pt.json``, the metadata
    sidecar (architecture, the spec it was fine-tuned from, params, training
    tiles and their hash, losses, metrics, weights' sha256).

All models segment channel-first images ``(C, Y, X)``: channel 0 is DAPI (or
the nucleus stain), channel 1 the marker; fewer than 3 channels are padded
with zeros to the network's ``[DAPI, marker, 0]`` input.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from seglab import SeglabError
from seglab.config.settings import DIAMETER_AUTO, DIAMETER_NATIVE, MaskSettings, check_diameter
from seglab.core import io
from seglab.core import paths

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "seglab-checkpoint-1"
SIDECAR_SUFFIX = ".json"
CPSAM_NAMES = ("cpsam", "cpsam_v2")
CPSAM_URL = "https://huggingface.co/mouseland/cellpose-sam/resolve/main/"
# cellpose's eval rescales by 30 / diameter: its fixed reference diameter in px.
CELLPOSE_REF_DIAMETER_PX = 30.0
TINY_PRESETS = {
    "xs": (8, 16, 32, 64),
    "s": (16, 32, 64, 128),
    "m": (32, 64, 128, 256),
}
TINY_DEFAULT_PRESET = "s"
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
GENERALIST_PATH = ASSETS_DIR / "generalist_tiny.pt"


# --------------------------------------------------------------------------------------
# the tiny residual U-Net
# --------------------------------------------------------------------------------------

def build_tiny_net(nbase: Sequence[int] = TINY_PRESETS[TINY_DEFAULT_PRESET], *, seed: int = 0,
                   diam_mean_px: float = CELLPOSE_REF_DIAMETER_PX, device=None):
    """A residual U-Net that cellpose 4 drives like its CPSAM network.

    Parameters
    ----------
    nbase : channels per level, e.g. (16, 32, 64, 128); input sizes must be
        divisible by ``2 ** (len(nbase) - 1)`` (cellpose's 256 / 384 tiles are).
    seed : seeds torch before the weights are drawn, so the same seed gives the
        same random network.
    diam_mean_px : the canonical object diameter the net is trained at
        (``train_seg(rescale=True)`` scales each image so its median object
        diameter becomes this).

    Returns
    -------
    TinyUNet (a ``cellpose.vit.BaseModel``): ``forward(x)`` maps ``(B, 3, Y, X)``
    to ``((B, 3, Y, X) [flowY, flowX, cellprob logits], (B, 256) zeros)``.
    """
    import torch  # deferred: importing torch + cellpose costs seconds

    cls = _tiny_class()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = cls(tuple(int(n) for n in nbase), diam_mean_px=float(diam_mean_px))
    if device is not None:
        net = net.to(device)
    return net


_TINY_CLASS = None


def _tiny_class():
    """Define the torch classes on first use (keeps ``import seglab.segment.models`` light)."""
    global _TINY_CLASS
    if _TINY_CLASS is not None:
        return _TINY_CLASS
    import torch  # deferred: importing torch + cellpose costs seconds

    from torch import nn
    import torch.nn.functional as F
    from cellpose.vit import BaseModel

    class ResBlock(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(cin)
            self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
            self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

        def forward(self, x):
            h = self.conv1(F.relu(self.bn1(x)))
            h = self.conv2(F.relu(self.bn2(h)))
            return h + self.skip(x)

    class TinyUNet(BaseModel):
        """Small residual U-Net with cellpose 4's network interface (see build_tiny_net)."""

        def __init__(self, nbase, diam_mean_px=CELLPOSE_REF_DIAMETER_PX, nin=3, nout=3):
            super().__init__(dtype=torch.float32)
            self.backbone = "tiny_unet"
            self.nbase = tuple(nbase)
            self.nout = nout
            self.diam_mean.data[:] = diam_mean_px
            self.diam_labels.data[:] = diam_mean_px
            # BaseModel.load_model refuses a state dict without 'W2' (its CP3 guard);
            # a frozen placeholder keeps our checkpoints loadable through it.
            self.W2 = nn.Parameter(torch.zeros(1), requires_grad=False)
            self.stem = nn.Conv2d(nin, nbase[0], 3, padding=1)
            self.down = nn.ModuleList()
            cin = nbase[0]
            for c in nbase:
                self.down.append(ResBlock(cin, c))
                cin = c
            self.up = nn.ModuleList()
            for c in reversed(nbase[:-1]):
                self.up.append(ResBlock(cin + c, c))
                cin = c
            self.head_bn = nn.BatchNorm2d(cin)
            self.head = nn.Conv2d(cin, nout, 1)

        def forward(self, x):
            h = self.stem(x)
            skips = []
            for i, block in enumerate(self.down):
                if i > 0:
                    h = F.max_pool2d(h, 2)
                h = block(h)
                skips.append(h)
            for block, skip in zip(self.up, reversed(skips[:-1])):
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
                h = block(torch.cat((h, skip), dim=1))
            y = self.head(F.relu(self.head_bn(h)))
            # cellpose.core.run_net stores a 256-wide style vector per tile
            return y, torch.zeros((x.shape[0], 256), device=x.device, dtype=y.dtype)

    _TINY_CLASS = TinyUNet
    return TinyUNet


def n_parameters(net) -> int:
    return int(sum(p.numel() for p in net.parameters()))


# --------------------------------------------------------------------------------------
# the model wrapper
# --------------------------------------------------------------------------------------

@dataclass
class Model:
    """A loaded segmenter: ``segment`` images, or run the network only (``run_net``).

    Attributes
    ----------
    spec : what ``load`` was given.
    kind : ``"cellpose"`` (network + cellpose dynamics) or ``"classical"``.
    cp : the ``cellpose.models.CellposeModel`` driving the network (None for classical).
    arch : ``"tiny_unet"``, ``"cpsam"`` or ``"classical"``.
    diam_mean_px : canonical object diameter of the network; an image whose
        objects have diameter ``d`` px is rescaled by ``diam_mean_px / d``.
    bsize : tile size the network sees at inference (px).
    meta : the sidecar of a checkpoint (empty for built-ins).
    """

    spec: str
    kind: str
    arch: str
    cp: Any = None
    diam_mean_px: float = CELLPOSE_REF_DIAMETER_PX
    bsize: int = 256
    # what ``diameter_px=None`` means for this model (see seglab.config.settings):
    # DIAMETER_AUTO (estimate per image) for nets trained at one canonical diameter, else DIAMETER_NATIVE
    default_diameter: str = DIAMETER_NATIVE
    meta: dict = field(default_factory=dict)
    # input channels the network was trained on; the others are zeroed at inference. The DSB
    # generalist saw nuclei only ([nucleus, 0, 0]): its weights on the marker channel were never
    # trained, so a marker image would feed it noise.
    channels: tuple | None = None

    @property
    def net(self):
        return None if self.cp is None else self.cp.net

    @property
    def device(self):
        return None if self.cp is None else self.cp.device

    @property
    def default_batch_size(self) -> int:
        """Network tiles per forward pass when the caller gives none: 8 on a GPU; on the CPU 1 for
        the tiny U-Net, whose single 256 px tile stays in cache (measured 2x faster per tile than
        batches of 8 on the 2-core machine) and 8 otherwise."""
        dev = self.device
        if dev is not None and dev.type == "cpu" and self.arch == "tiny_unet":
            return 1
        return 8

    # ---- input checks -----------------------------------------------------------------
    @staticmethod
    def as_network_input(image, *, name: str = "image") -> np.ndarray:
        """``(C, Y, X)`` or ``(Y, X)`` -> float32 ``(3, Y, X)`` ``[DAPI, marker, 0]``.

        cellpose's eval does not pad 2D or 2-channel images to 3 channels as
        training does, so the padding happens here, for training and inference alike.
        """
        x = np.asarray(image)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or not 1 <= x.shape[0] <= 3:
            raise SeglabError(
                f"{name}: expected a channel-first image (C, Y, X) with C = 1..3 "
                f"([DAPI, marker] or [DAPI, marker, 0]), got shape {tuple(x.shape)}; "
                "move the channel axis first (np.moveaxis) and drop extra channels")
        if min(x.shape[1:]) < 8:
            raise SeglabError(f"{name}: image of shape {tuple(x.shape)} is too small (at least 8 x 8 px)")
        out = np.zeros((3, *x.shape[1:]), np.float32)
        out[: x.shape[0]] = x
        return out

    def _restrict(self, x: np.ndarray) -> np.ndarray:
        if self.channels is None:
            return x
        keep = np.zeros(x.shape[0], bool)
        keep[list(self.channels)] = True
        x[~keep] = 0.0
        return x

    def _eval_diameter(self, diameter_px):
        """The ``diameter`` to hand cellpose so that it rescales by diam_mean_px / diameter_px."""
        if diameter_px is None:
            return None
        return float(diameter_px) * CELLPOSE_REF_DIAMETER_PX / self.diam_mean_px

    def resolve_diameter(self, image: np.ndarray, diameter_px: float | str | None = None) -> float | None:
        """The object diameter (px) to rescale ``image`` (C, Y, X) for, or None for no rescaling.

        ``diameter_px`` is a :class:`MaskSettings` diameter: a number, None (this model's
        default), ``"auto"`` (estimated from channel 0) or ``"native"`` (no rescaling).
        """
        diameter_px = check_diameter(diameter_px)
        if diameter_px is None:
            diameter_px = self.default_diameter
        if diameter_px == DIAMETER_AUTO:
            return estimate_diameter(image)
        if diameter_px == DIAMETER_NATIVE:
            return None
        return float(diameter_px)

    # ---- segmentation -------------------------------------------------------------------
    def segment(self, images, mask: MaskSettings | None = None, *, batch_size: int | None = None,
                return_outputs: bool = False, tile_overlap: float = 0.1, augment: bool = False,
                compute_masks: bool = True, return_styles: bool = False):
        """Segment one image ``(C, Y, X)`` or a same-shape stack ``(N, C, Y, X)`` / list.

        Parameters
        ----------
        images : (C, Y, X) array, (N, C, Y, X) array, or a list of (C, Y, X) arrays.
        mask : :class:`seglab.config.settings.MaskSettings` (diameter, thresholds, min size,
            niter); None: the defaults. A diameter of None is the model's default
            (``"auto"`` for tiny nets, ``"native"`` for cpsam).
        batch_size : network tiles per forward pass; None: the model's
            :attr:`default_batch_size`.
        return_outputs : also return the network outputs (see ``masks_from_outputs``).
        tile_overlap, augment : passed to cellpose's eval: overlap of the network
            tiles (fraction of bsize) and test-time flips of overlapping tiles.
        compute_masks : False: the network pass only (needs ``return_outputs``); every mask is
            None, and ``dynamics.masks_from_outputs(outputs[i], mask, device=self.device)``
            makes the mask cellpose's eval would have made (``seglab predict``'s pipeline runs
            it in another thread while the network works on the next batch).
        return_styles : also put the image's style vector into each outputs dict (``style``, see
            :func:`style_layer`; needs ``return_outputs``). cellpose 4's eval returns zeros as
            styles, so they are taken from the network here; masks and flows are unchanged.

        Returns
        -------
        masks : list of (Y, X) label images (uint16, or uint32 beyond 65,535
            objects), or one array for a single image; with ``return_outputs``, a
            tuple ``(masks, outputs)`` where ``outputs[i]`` is a dict with ``dP``
            (2, Y, X) float32, ``cellprob`` (Y, X) float32, ``niter`` int.
        """
        single = isinstance(images, np.ndarray) and images.ndim in (2, 3)
        seq = [images] if single else list(images)
        if not seq:
            raise SeglabError("segment: no images given")
        if not compute_masks and not (return_outputs and self.kind == "cellpose"):
            raise SeglabError("segment(compute_masks=False): only a network model's outputs can be returned "
                              "without masks; pass return_outputs=True")
        if return_styles and not (return_outputs and self.kind == "cellpose"):
            raise SeglabError("segment(return_styles=True): styles come with a network model's outputs; "
                              "pass return_outputs=True")
        mask = MaskSettings() if mask is None else mask
        xs = [self._restrict(self.as_network_input(im, name=f"image {i}")) for i, im in enumerate(seq)]
        batch_size = self.default_batch_size if batch_size is None else int(batch_size)
        if self.kind == "classical":
            diams = [self.resolve_diameter(x, mask.diameter_px) for x in xs]
            masks = [classical_segment(x[0], diameter_px=d, min_size=mask.min_size) for x, d in zip(xs, diams)]
            if return_outputs:
                raise SeglabError("classical: has no network outputs to return; use a network model")
            return masks[0] if single else masks
        # group same-shape images with the same diameter into one cellpose call,
        # so their tiles share network batches
        diams = [self.resolve_diameter(x, mask.diameter_px) for x in xs]
        masks: list = [None] * len(xs)
        outputs: list = [None] * len(xs)
        groups: dict = {}
        for i, (x, d) in enumerate(zip(xs, diams)):
            groups.setdefault((x.shape, None if d is None else round(float(d), 6)), []).append(i)
        for (shape, d), idx in groups.items():
            with capture_styles(self, enabled=return_styles) as styles:
                m, outs = self._eval_stack(np.stack([xs[i] for i in idx]), d, mask, batch_size,
                                           tile_overlap=tile_overlap, augment=augment, compute_masks=compute_masks)
            if return_styles:
                for out, style in zip(outs, styles.per_image(len(idx))):
                    out["style"] = style
            for j, i in enumerate(idx):
                masks[i], outputs[i] = m[j], outs[j]
        if single:
            masks, outputs = masks[0], outputs[0]
        return (masks, outputs) if return_outputs else masks

    def _eval_stack(self, x, diameter_px: float | None, mask: MaskSettings, batch_size: int,
                    tile_overlap: float = 0.1, augment: bool = False, compute_masks: bool = True):
        """(masks, outputs) of a same-shape stack ``x`` (N, 3, Y, X) float32 at one diameter (px or None):
        N (Y, X) label images (each None without ``compute_masks``) and N outputs dicts."""
        n = x.shape[0]
        diam = self._eval_diameter(diameter_px)
        # one image: (3, Y, X) with channel_axis=0. Several: cellpose takes a
        # (N, 3, Y, X) stack as a batch (channel_axis=1) and, with
        # stitch_threshold=0 and do_3D=False, normalises and segments each plane on its own.
        kwargs = dict(diameter=diam, flow_threshold=mask.flow_threshold, cellprob_threshold=mask.cellprob_threshold,
                      min_size=mask.min_size, niter=mask.niter, batch_size=batch_size, bsize=self.bsize,
                      tile_overlap=float(tile_overlap), augment=bool(augment), compute_masks=bool(compute_masks))
        with quiet_cellpose():
            if n == 1:
                m, flows, _ = self.cp.eval(x[0], channel_axis=0, **kwargs)
                ms, dPs, cps = [m], [flows[1]], [flows[2]]
            else:
                m, flows, _ = self.cp.eval(x, channel_axis=1, **kwargs)
                ms = list(m)
                dPs = [flows[1][:, i] for i in range(n)]
                cps = list(flows[2])
        rescale = 1.0 if diam is None or diam <= 0 else CELLPOSE_REF_DIAMETER_PX / diam
        # eval's own default (resample=True); a MaskSettings.niter applies when masks are rebuilt
        niter = int(200 / rescale)
        outs = [{"dP": np.ascontiguousarray(dp, np.float32), "cellprob": np.ascontiguousarray(cp, np.float32),
                 "niter": niter} for dp, cp in zip(dPs, cps)]
        if not compute_masks:  # eval returned an empty array for the masks
            return [None] * n, outs
        return [as_label_dtype(mm) for mm in ms], outs


def style_layer(net):
    """The layer whose output is a network's style (the deepest features): the tiny U-Net's last
    encoder block, Cellpose-SAM's encoder neck; SeglabError for other networks."""
    if getattr(net, "backbone", None) == "tiny_unet":
        return net.down[-1]
    encoder = getattr(net, "encoder", None)
    if encoder is not None and hasattr(encoder, "neck"):
        return encoder.neck
    raise SeglabError(f"style vectors: no style layer known for network {type(net).__name__}; "
                      "use a tiny net or Cellpose-SAM")


class _Styles:
    """The pooled features of each network tile seen while :func:`capture_styles` was active."""

    def __init__(self):
        self.rows: list = []

    def per_image(self, n_images: int) -> list:
        """One L2-normalised style vector (S,) float32 per image: cellpose runs the tiles of the images
        of one call in image order, the same number per image, so the rows split evenly."""
        if not self.rows:
            raise SeglabError("style vectors: the network ran on no tile")
        rows = np.concatenate(self.rows)
        if len(rows) % n_images:
            raise SeglabError(f"style vectors: {len(rows)} network tiles do not split over {n_images} images")
        styles = rows.reshape(n_images, -1, rows.shape[-1]).mean(axis=1)
        norms = np.linalg.norm(styles, axis=1, keepdims=True)
        return list((styles / np.where(norms > 0, norms, 1.0)).astype(np.float32))


@contextlib.contextmanager
def capture_styles(model: "Model", *, enabled: bool = True):
    """Record the style of every network tile while active: the output of :func:`style_layer`
    averaged over its spatial axes, as cellpose 3's style vector was (the mean of the deepest
    features, L2-normalised per image by :meth:`_Styles.per_image`). A forward hook only reads
    the features: the outputs do not change. Yields a :class:`_Styles`."""
    styles = _Styles()
    if not enabled:
        yield styles
        return

    def hook(module, args, out):
        styles.rows.append(out.detach().float().mean(dim=(-2, -1)).cpu().numpy())

    handle = style_layer(model.net).register_forward_hook(hook)
    try:
        yield styles
    finally:
        handle.remove()


def as_label_dtype(mask: np.ndarray) -> np.ndarray:
    """uint16 labels, uint32 when more than 65,535 objects."""
    mask = np.asarray(mask)
    top = int(mask.max()) if mask.size else 0
    return mask.astype(np.uint32 if top > 65535 else np.uint16, copy=False)


class quiet_cellpose:
    """Silence cellpose's per-call INFO/WARNING chatter (e.g. the 'stitch_threshold=0' note)."""

    def __enter__(self):
        self._lg = logging.getLogger("cellpose")
        self._level = self._lg.level
        self._lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._lg.setLevel(self._level)


# --------------------------------------------------------------------------------------
# classical reference and diameter estimate
# --------------------------------------------------------------------------------------

def classical_segment(image: np.ndarray, *, diameter_px: float | None = None, min_size: int = MaskSettings.min_size,
                      smooth_sigma_px: float = 1.0) -> np.ndarray:
    """Otsu threshold + distance-transform watershed on one channel ``(Y, X)``.

    Parameters
    ----------
    image : (Y, X) nucleus-stain intensities.
    diameter_px : typical object diameter; sets the minimum distance between
        seeds (0.3 x diameter). None: estimated from the connected components of
        the foreground (median equivalent diameter).
    min_size : objects smaller than this (px) are removed.

    Returns
    -------
    (Y, X) uint16/uint32 labels, 0 = background, ids 1..n.
    """
    from scipy import ndimage as ndi
    from skimage import filters, measure, morphology, segmentation
    from skimage.feature import peak_local_max

    img = np.asarray(image, np.float32)
    if img.ndim != 2:
        raise SeglabError(f"classical: expected a (Y, X) image, got shape {img.shape}")
    if smooth_sigma_px > 0:
        img = filters.gaussian(img, sigma=smooth_sigma_px, preserve_range=True)
    if float(img.max()) <= float(img.min()):
        return np.zeros(img.shape, np.uint16)
    fg = img > filters.threshold_otsu(img)
    fg = ndi.binary_fill_holes(fg)
    fg = morphology.remove_small_objects(fg, max(1, min_size))
    if not fg.any():
        return np.zeros(img.shape, np.uint16)
    if diameter_px is None:
        areas = np.array([r.area for r in measure.regionprops(measure.label(fg))], float)
        diameter_px = 2.0 * np.sqrt(np.median(areas) / np.pi)
    dist = ndi.distance_transform_edt(fg)
    min_distance = max(2, int(round(0.3 * float(diameter_px))))
    cc = measure.label(fg)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=cc, exclude_border=False)
    markers = np.zeros(img.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # components without a peak (tiny blobs) still get a seed
    missing = np.setdiff1d(np.unique(cc[fg]), np.unique(cc[tuple(peaks.T)]) if len(peaks) else [])
    for k, lab in enumerate(missing, start=len(peaks) + 1):
        ys, xs = np.nonzero(cc == lab)
        markers[ys[len(ys) // 2], xs[len(xs) // 2]] = k
    labels = segmentation.watershed(-dist, markers, mask=fg)
    labels = morphology.remove_small_objects(labels, max(1, min_size))
    labels, _, _ = segmentation.relabel_sequential(labels)
    return as_label_dtype(labels)


def estimate_diameter(image: np.ndarray, *, default_px: float = CELLPOSE_REF_DIAMETER_PX) -> float:
    """Median object diameter (px) of channel 0, from the classical segmentation.

    ``image``: (C, Y, X) or (Y, X). The diameter is cellpose's: that of a disk of
    the object's median area. Falls back to ``default_px`` when nothing is found.
    """
    from cellpose.utils import diameters

    x = np.asarray(image)
    chan = x[0] if x.ndim == 3 else x
    labels = classical_segment(chan, min_size=9)
    if labels.max() == 0:
        return float(default_px)
    d, _ = diameters(labels)
    return float(max(d, 5.0))


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------

def cpsam_path(name: str) -> Path:
    """Where cellpose keeps (and we expect) the weights of a built-in model."""
    base = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    return (Path(base) if base else Path.home() / ".cellpose" / "models") / name


DEVICE_ENV = "SEGLAB_DEVICE"
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def requested_device() -> str:
    """The device asked for in ``$SEGLAB_DEVICE``: ``auto`` (default: CUDA when torch sees it),
    ``cpu`` or ``cuda`` (a GPU is required: the Slurm scripts of jobs that ask for GPUs set it, so
    a job placed on a node whose GPU torch cannot see fails at its first model load instead of
    running for days on the CPU)."""
    value = os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"
    if value not in DEVICE_CHOICES:
        raise SeglabError(f"{DEVICE_ENV}={value!r}: use one of {', '.join(DEVICE_CHOICES)}")
    return value


def _gpu_device(gpu):
    """torch device for ``gpu`` (True: CUDA required; False: CPU; None: ``$SEGLAB_DEVICE``, whose
    default is CUDA when available)."""
    import torch  # deferred: importing torch + cellpose costs seconds

    why = "gpu=True"
    if gpu is None:
        asked = requested_device()
        gpu = torch.cuda.is_available() if asked == "auto" else asked == "cuda"
        why = f"{DEVICE_ENV}=cuda"
    if gpu and not torch.cuda.is_available():
        raise SeglabError(f"{why} but torch sees no CUDA GPU (torch {torch.__version__}, CUDA build "
                          f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
                          "run on a GPU node (check `nvidia-smi` there and the job's --gres), or run on the CPU "
                          f"with {DEVICE_ENV}=cpu / seglab predict --cpu")
    return torch.device("cuda") if gpu else torch.device("cpu")


def wrap_net(net, device, pretrained: str):
    """A CellposeModel around ``net`` without cellpose's constructor.

    ``CellposeModel.__init__`` sniffs the checkpoint and builds CPSAM (or
    downloads weights); eval and train_seg only need these attributes.
    """
    from cellpose.models import CellposeModel

    cp = CellposeModel.__new__(CellposeModel)
    cp.device = device
    cp.gpu = device.type == "cuda"
    cp.pretrained_model = pretrained
    cp.backbone = net.backbone
    cp.net = net.to(device)
    if device.type == "cpu" and net.backbone == "tiny_unet":
        # measured on the 2-core CPU (torch 2.14, one thread): channels-last convolutions run the
        # tiny U-Net 1.5-2x faster than the default layout, with identical masks
        import torch

        cp.net = cp.net.to(memory_format=torch.channels_last)
    cp.net.eval()
    return cp


def load(spec: str | os.PathLike, *, gpu: bool | None = None, seed: int = 0) -> Model:
    """Load a segmenter by spec (see the module docstring).

    Parameters
    ----------
    spec : ``cpsam``, ``cpsam_v2``, ``tiny`` (``tiny-xs``/``tiny-s``/``tiny-m``),
        ``generalist``, ``cpsam-random``, ``classical``, or a path to a seglab
        checkpoint (``.pt`` with a ``.pt.json`` sidecar).
    gpu : use CUDA; None: when available.
    seed : seeds the random weights of ``tiny`` / ``cpsam-random``.

    Raises
    ------
    SeglabError : unknown spec, missing cpsam weights, a file that is not a
        seglab checkpoint, or a truncated / corrupt one.
    """
    s = str(spec)
    if s == "classical":
        return Model(spec=s, kind="classical", arch="classical", default_diameter=DIAMETER_NATIVE)
    if s in CPSAM_NAMES:
        return _load_cpsam(s, gpu)
    if s == "cpsam-random":
        import torch  # deferred: importing torch + cellpose costs seconds

        from cellpose.vit import CPSAM

        device = _gpu_device(gpu)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = CPSAM(dtype=torch.float32)
        if device.type == "cuda":
            net.dtype = torch.bfloat16  # the setter casts every weight (the constructor leaves some float32)
        return Model(spec=s, kind="cellpose", arch="cpsam", cp=wrap_net(net, device, s), bsize=256)
    if s == "tiny" or s.startswith("tiny-"):
        preset = TINY_DEFAULT_PRESET if s == "tiny" else s[len("tiny-"):]
        if preset not in TINY_PRESETS:
            raise SeglabError(f"model spec '{s}': unknown tiny preset '{preset}'; "
                              f"use one of {', '.join('tiny-' + p for p in TINY_PRESETS)}")
        net = build_tiny_net(TINY_PRESETS[preset], seed=seed)
        meta = {"arch": "tiny_unet", "nbase": list(TINY_PRESETS[preset]), "preset": preset,
                "diam_mean_px": CELLPOSE_REF_DIAMETER_PX, "seed": seed}
        return Model(spec=s, kind="cellpose", arch="tiny_unet", cp=wrap_net(net, _gpu_device(gpu), s),
                     diam_mean_px=CELLPOSE_REF_DIAMETER_PX, default_diameter=DIAMETER_AUTO, meta=meta)
    if s == "generalist":
        if not GENERALIST_PATH.is_file():
            raise SeglabError(f"model spec 'generalist': {GENERALIST_PATH} is missing; "
                              "rebuild it with `seglab pretrain-generalist` (needs the DSB2018 data)")
        m = load_checkpoint(GENERALIST_PATH, gpu=gpu)
        m.spec = s
        return m
    p = Path(s).expanduser()
    if p.suffix in (".pt", ".pth") or p.exists() or os.sep in s:
        if not p.exists():
            p2 = paths.resolve(s)
            if not p2.exists():
                raise SeglabError(f"model spec '{s}': no such checkpoint file; give a path to a seglab "
                                  f"checkpoint (.pt with a .pt.json sidecar) or one of: {', '.join(known_specs())}")
            p = p2
        return load_checkpoint(p, gpu=gpu)
    raise SeglabError(f"model spec '{s}' names no known model; use one of {', '.join(known_specs())} "
                      "or a path to a seglab checkpoint (.pt with a .pt.json sidecar)")


# --------------------------------------------------------------------------------------
# model identity: the one key every cache and record uses
# --------------------------------------------------------------------------------------

_SHA256_MEMO: dict = {}
RANDOM_WEIGHT_SPECS = ("tiny", "cpsam-random")


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weights file, hashed once per process while its size, mtime and inode stay the same
    (a 1.2 GB cpsam file takes seconds to hash; a file replaced or rewritten is hashed again)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SHA256_MEMO:
        _SHA256_MEMO[key] = io.sha256_file(p)
    return _SHA256_MEMO[key]


def weights_file(spec: str) -> Path | None:
    """The weights file a spec loads (the generalist asset, a cpsam name's file in the cellpose
    models folder, or a checkpoint path), or None for specs without one (classical, random weights)."""
    if spec == "generalist":
        return GENERALIST_PATH
    if spec in CPSAM_NAMES:
        return cpsam_path(spec)
    if spec == "classical" or spec.split("-")[0] in RANDOM_WEIGHT_SPECS or spec in RANDOM_WEIGHT_SPECS:
        return None
    p = Path(spec).expanduser()
    return p if p.is_file() else paths.resolve(spec)


def model_id(model: "Model | str | os.PathLike") -> str:
    """The identity of what decides a model's outputs, for every cache key and record.

    - a model with a weights file (``generalist``, ``cpsam`` / ``cpsam_v2``, a checkpoint):
      the sha256 of that file's bytes, never its name, so two different cpsam files stored
      under the same name never share a cache entry;
    - random-weight built-ins (``tiny``, ``tiny-*``, ``cpsam-random``): ``builtin:<spec>:seed=<seed>``;
    - ``classical``: ``classical``.

    ``model`` is a spec, a checkpoint path or a loaded :class:`Model`.
    """
    spec = str(getattr(model, "spec", model))
    if spec == "classical":
        return "classical"
    f = weights_file(spec)
    if f is None:
        seed = (getattr(model, "meta", None) or {}).get("seed", 0)
        return io.sha256_text(f"builtin:{spec}:seed={seed}")
    if not f.is_file():
        raise SeglabError(f"model {spec!r}: no weights file to hash ({f} not found); pass a checkpoint path, "
                          f"put the weights there, or use a built-in spec ({', '.join(known_specs())})")
    return weights_sha256(f)


def known_specs() -> list[str]:
    return [*CPSAM_NAMES, "tiny", *("tiny-" + p for p in TINY_PRESETS), "generalist", "cpsam-random",
            "classical"]


def _load_cpsam(name: str, gpu) -> Model:
    path = cpsam_path(name)
    if not path.is_file():
        raise SeglabError(
            f"model '{name}': weights not found at {path}. This node does not download them. "
            f"On a login node with internet run:\n"
            f"  mkdir -p {path.parent} && curl -L -o {path} {CPSAM_URL}{name}\n"
            f"(or: CELLPOSE_LOCAL_MODELS_PATH={path.parent} python -c \"from cellpose import models; "
            f"models.CellposeModel(pretrained_model='{name}')\"), then set CELLPOSE_LOCAL_MODELS_PATH="
            f"{path.parent} in the job. For CPU demos use the 'generalist' or 'tiny' models.")

    from cellpose.models import CellposeModel

    device = _gpu_device(gpu)
    _check_cpsam_keys(name, path)
    try:
        with quiet_cellpose():
            cp = CellposeModel(pretrained_model=str(path), device=device,
                               use_bfloat16=device.type == "cuda")  # bfloat16 is 3x slower on CPU
    except (RuntimeError, ValueError, EOFError, OSError) as exc:
        raise SeglabError(f"model '{name}': {path} could not be loaded ({exc}); the file is probably "
                          "truncated: delete it and fetch it again") from None
    return Model(spec=name, kind="cellpose", arch="cpsam", cp=cp, bsize=256, default_diameter=DIAMETER_NATIVE,
                 meta={"arch": "cpsam", "weights": str(path), "weights_sha256": weights_sha256(path)})


def _check_cpsam_keys(name: str, path: Path) -> None:
    """SeglabError unless the file holds a state dict whose tensors are exactly Cellpose-SAM's.

    cellpose loads its built-in weights with ``load_state_dict(strict=False)``: a file of another
    architecture whose tensor shapes do not collide loads without a word and leaves the 305 M
    parameters it lacks at their random initial values. The check reads the file memory-mapped and
    builds the network on the meta device (no memory, a tenth of a second). cellpose's DINO
    backbones (files with ``encoder.cls_token``) are left to cellpose.
    """
    import torch  # deferred: importing torch + cellpose costs seconds

    try:
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise SeglabError(f"model '{name}': {path} could not be read as a torch state dict ({type(exc).__name__}: "
                          f"{exc}); the file is probably truncated: delete it and fetch it again") from None
    if not isinstance(stored, dict):
        raise SeglabError(f"model '{name}': {path} is not a state dict ({type(stored).__name__}); "
                          "put the real cellpose weights file there")
    if "encoder.cls_token" in stored:
        return
    from cellpose.vit import CPSAM

    with torch.device("meta"):
        expected = set(CPSAM(dtype=torch.float32).state_dict())
    stored_keys = {k[len("module."):] if k.startswith("module.") else k for k in stored}
    missing, extra = sorted(expected - stored_keys), sorted(stored_keys - expected)
    if missing or extra:
        raise SeglabError(
            f"model '{name}': {path} holds the weights of another architecture, not Cellpose-SAM's "
            f"({len(missing)} of its {len(expected)} tensors missing, e.g. {missing[:2]}; {len(extra)} unknown, "
            f"e.g. {extra[:2]}); put the real {name} file there ({CPSAM_URL}{name}), or load a seglab "
            "checkpoint by its path")


def sidecar_path(weights_path: str | os.PathLike) -> Path:
    p = Path(weights_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def read_sidecar(weights_path: str | os.PathLike) -> dict:
    """The metadata sidecar of a checkpoint; SeglabError when it is missing or not ours."""
    p = Path(weights_path)
    side = sidecar_path(p)
    if not side.is_file():
        raise SeglabError(f"{p}: not a seglab checkpoint (no metadata sidecar {side.name} beside it). "
                          "Load cellpose's own models by name (cpsam), or write checkpoints with seglab.segment.train")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SeglabError(f"{side}: sidecar is not valid JSON ({exc}); the checkpoint is damaged, retrain or restore it") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise SeglabError(f"{side}: not a seglab checkpoint sidecar (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                          f"expected {CHECKPOINT_FORMAT!r})")
    return meta


def load_checkpoint(path: str | os.PathLike, *, gpu: bool | None = None) -> Model:
    """Load a seglab checkpoint (weights + sidecar), verifying its hash first."""
    import torch  # deferred: importing torch + cellpose costs seconds

    p = Path(path)
    if not p.is_file():
        raise SeglabError(f"{p}: checkpoint file not found")
    meta = read_sidecar(p)
    want = meta.get("weights_sha256")
    if want and io.sha256_file(p) != want:
        raise SeglabError(f"{p}: contents do not match the sha256 in {sidecar_path(p).name} "
                          "(truncated or overwritten); copy it again or retrain")
    device = _gpu_device(gpu)
    try:
        state = torch.load(p, map_location=device, weights_only=True)  # no pickle from files
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise SeglabError(f"{p}: cannot be read as a torch state dict ({type(exc).__name__}: {exc}); "
                          "the file is truncated or not a checkpoint") from None
    if not isinstance(state, dict) or "W2" not in state:
        raise SeglabError(f"{p}: not a cellpose-4 style state dict (no 'W2' entry)")
    arch = meta.get("arch")
    if arch == "tiny_unet":
        net = build_tiny_net(meta["nbase"], diam_mean_px=meta.get("diam_mean_px", CELLPOSE_REF_DIAMETER_PX))
        default_diameter = DIAMETER_AUTO
        bsize = int(meta.get("eval_bsize", 256))
    elif arch == "cpsam":
        from cellpose.vit import CPSAM

        net = CPSAM(dtype=torch.float32)
        default_diameter = DIAMETER_NATIVE
        bsize = 256
    else:
        raise SeglabError(f"{p}: unknown architecture {arch!r} in its sidecar (known: tiny_unet, cpsam)")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SeglabError(f"{p}: weights do not fit the architecture in its sidecar ({exc})") from None
    if arch == "cpsam" and device.type == "cuda":
        net.dtype = torch.bfloat16
    diam = float(net.diam_mean.item())
    channels = meta.get("input_channels")
    return Model(spec=str(p), kind="cellpose", arch=arch, cp=wrap_net(net, device, str(p)),
                 diam_mean_px=diam, bsize=bsize, default_diameter=default_diameter, meta=meta,
                 channels=None if channels is None else tuple(int(c) for c in channels))


def git_commit() -> dict:
    """The checkout's commit and dirty flag (None outside git)."""
    root = paths.project_root()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                                    text=True, timeout=20).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def save_checkpoint(net, path: str | os.PathLike, meta: dict) -> Path:
    """Write ``net``'s state dict and its sidecar atomically; returns the weights' path.

    ``meta`` should name: ``base_spec``, ``params``, ``train_tiles`` (ids),
    ``train_tiles_sha256``, ``losses``, ``metrics``. The architecture, weights'
    hash, commit and versions are added here.
    """
    import torch  # deferred: importing torch + cellpose costs seconds

    import cellpose

    p = Path(path)
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
             for k, v in net.state_dict().items()}
    # saved through a buffer: torch.save to a path records the (temporary) file's name in the zip,
    # so equal weights gave files with other bytes and another model_id on every save
    buffer = BytesIO()
    torch.save(state, buffer)
    io.write_bytes(p, buffer.getvalue())
    full = dict(meta)
    arch = getattr(net, "backbone", None)
    full.update({
        "format": CHECKPOINT_FORMAT,
        "arch": "tiny_unet" if arch == "tiny_unet" else "cpsam",
        "diam_mean_px": float(net.diam_mean.item()),
        "n_parameters": n_parameters(net),
        "weights_file": p.name,
        "weights_sha256": io.sha256_file(p),
        "versions": {"torch": torch.__version__, "cellpose": getattr(cellpose, "__version__", None) or _cp_version()},
        **({"nbase": list(net.nbase)} if arch == "tiny_unet" else {}),
    })
    full.setdefault("git", git_commit())
    io.write_json(sidecar_path(p), full)
    return p


def _cp_version():
    try:
        from importlib.metadata import version

        return version("cellpose")
    except Exception:  # noqa: BLE001
        return None
