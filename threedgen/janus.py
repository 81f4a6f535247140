"""Janus metrics of ``threedgen eval``: does a run of an object with a front show that front once,
and only where it belongs?

A 2D prior that mostly saw fronts pulls every side of a 3D result towards a front: the Janus
problem (a face on the back of the head). The shapes prior's objects with a front (the house's
door, the mug's badge, the head's nose: ``has_front``) carry a marker in a reserved colour
(``marker_colour``, magenta), so a second front can be counted and seen. Every metric is taken
against the truth; the settings are the module constants below (also written to ``metrics.json``
as ``janus_settings``).

- ``front_markers`` (int) and ``janus`` (bool, ``front_markers >= 2``): on a
  ``GRID_RESOLUTION``^3 axis-aligned grid over the fixed box ``[-GRID_BOUND, GRID_BOUND]^3`` (the
  same voxels for the truth and the run; component counts do not depend on the yaw, so no turning
  is needed) a voxel is opaque when its opacity ``alpha > OPAQUE_ALPHA``
  (``Representation.opacity_grid``: for a NeRF or Gaussians, inside the surface their export
  meshes; the truth: inside its SDF). Enclosed cavities are filled, as the export fills them; the
  *shell* is the opaque voxels with at least one non-opaque 6-neighbour (the inside of a field is
  never seen, so its colour is meaningless). Marker voxels are shell voxels of the marker's colour
  (``marker_mask``: each colour divided by its largest channel, so that grey shading cancels;
  within ``MARKER_TOLERANCE`` of the marker's normalised colour and nearer to it than to the
  body's; never when the largest channel is below ``DARK_CHANNEL``). ``front_markers`` counts
  their 26-connected components of at least ``MIN_MARKER_VOXELS`` voxels, after bridging gaps of
  up to ``2 * MARKER_LINK`` voxels (a marker's colour bleeding over an edge is one part, not two).
  The truth scores exactly 1. Both are ``None`` for a representation without ``opacity_grid``.
  ``front_marker_voxels`` lists the parts' sizes in marker voxels, for judging them, and
  ``front_marker_voxels_truth`` the truth's ([312], [206] and [144] for the door, badge and nose):
  a second part of a few dozen voxels is a fragment, not a second front (a failed text-only house
  run, a blob, showed two dark smudges of 32 and 24 and so counts as Janus; its ``view_mi`` of
  0.29 says what it is).
- ``janus_view_rate``: the run and the truth rendered over white at ``len(VIEW_AZIMUTHS)``
  azimuths (every 15 degrees, in (-180, 180]) at elevation ``VIEW_ELEVATION``, ``VIEW_RESOLUTION``
  pixels square, at the run's camera distance and field of view, the run turned by the best yaw
  the held-out metrics found (its cameras' azimuths are ``azimuth + yaw``, as
  ``evaluate.held_out_cameras`` does) and then by the multiple of 15 degrees that lines its views
  up with the truth's best by colour (``colour_shift``; the mask IoU cannot tell a house's front
  from its back, the marker can; ``janus_yaw_degrees`` is the total turn). For each run view i the truth view j with the least RGB
  mean squared error ``MSE_ij`` is its match; the rate is the share of back views
  (``|azimuth| >= BACK_AZIMUTH``) whose match is a front view (``|azimuth| <= FRONT_AZIMUTH``).
  0 for the truth; a two-faced run that shows its front from behind scores high. Read it with
  ``view_mi``: for a result that looks alike from everywhere (a blob) the matches are arbitrary
  and the rate means nothing (two failed text-only house runs, blobs: 0.33 and 0.44 at a
  ``view_mi`` of 0.30; a good camera-aware run: 0 at 0.91, its truth 0.97).
- ``view_mi``: how well a run view tells which truth view it is. ``p(j|i) = softmax_j(-MSE_ij /
  MI_TEMPERATURE)``; ``MI = H(mean_i p(.|i)) - mean_i H(p(.|i))``, divided by ``ln 24`` (1: every
  view is told apart from the others; 0: a run view says nothing of its azimuth). A run that shows
  the front from several sides piles its matches onto the front views and loses information.
  ``view_mi_truth`` is the truth against itself (same temperature): the best a run can score, for
  comparison (below 1 where the truth's own views 15 degrees apart look alike).
- ``back_front_psnr_gap``: mean PSNR (dB) of the run's back views against the truth's at the same
  azimuths, minus the mean over the front views. Strongly negative when the back is worse than
  the front (a back that copies the front, or was never shaped); 0 for the truth (each view's PSNR
  is capped at 100 dB, a mean squared error of 1e-10).
- ``janus_views``: per azimuth, the truth azimuth matched and the PSNR at the same azimuth.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from threedgen.cameras import Cameras
from threedgen.views import render_views

GRID_BOUND = 0.55  # the shapes' world fits in [-0.5, 0.5]^3, plus room for a run that grew a little
GRID_RESOLUTION = 64  # voxel edge 1.1 / 63 = 0.0175: the nose (radius 0.08) is ~9 voxels across
OPAQUE_ALPHA = 0.5
MIN_MARKER_VOXELS = 8  # smaller marker-coloured components are noise (a truth marker has hundreds)
# Marker voxels less than this many voxels apart are one part (dilation steps before labelling; a gap
# of up to 2 * MARKER_LINK voxels, 0.07 world units, is bridged). A trained NeRF's colour grid bleeds
# a marker's colour a few voxels across an edge: a 250-step camera-aware house run showed its door
# (334 voxels) and a 45-voxel fringe underneath it one voxel apart. Two fronts are 0.5 or more apart.
MARKER_LINK = 2
DARK_CHANNEL = 0.1  # below this largest channel a colour has no reliable hue: never a marker
# The marker (0.90, 0.05, 0.90) normalises to (1, 0.056, 1). Every other palette colour lies at
# least 0.368 from it after normalising (purple, (0.69, 0.25, 1); then pink at 0.537, red 0.886,
# blue 0.895), whatever its grey shading. 0.25 leaves 0.12 of margin to purple and still accepts a
# marker blurred into its surroundings: mixed up to 24% with white or 39% with mid grey.
MARKER_TOLERANCE = 0.25
VIEW_ELEVATION = 15.0
VIEW_STEP = 15.0
VIEW_AZIMUTHS = tuple(float(-165 + VIEW_STEP * k) for k in range(24))  # (-180, 180], every 15 degrees
# 32 px (the truth supersampled 2x2, as evaluate renders it): the 24 views add ~0.5 s to a NeRF
# eval of ~1.5 s on 2 CPU cores, ~0.35 s of it the truth's sphere tracing; 64 px took ~2.9 s and
# moved no verdict on the runs measured.
VIEW_RESOLUTION = 32
FRONT_AZIMUTH = 45.0  # |azimuth| <= this: a front view
BACK_AZIMUTH = 120.0  # |azimuth| >= this: a back view
# The temperature. At 32 px the truth's views 15 degrees apart differ by an MSE of 1e-4..4e-3 (the
# median over views 1.4e-3..3.8e-3 for the house and mug, 6e-4..1.1e-3 for the head, over the 12
# palette colours; black bodies down to 1e-5), so T = 2e-4 weights a typical neighbour at
# exp(-3)..exp(-19) of an exact match and the closest at exp(-0.5): the truth's own views are told
# apart (view_mi_truth 0.90-0.99 for the three shapes in every colour but black, 0.85-0.87, and the
# brown mug, 0.897), while the truth made two-faced (back views showing the front) scores 0.73-0.80
# (at most ln 13 / ln 24 = 0.81 at any T: 24 views onto 13 distinct images). A larger T blurs the
# truth's own neighbours (at 5e-4 the head's view_mi_truth is 0.59-0.79, the black head's below its
# two-faced version's); a smaller one leaves only the argmin matches of a run's views.
MI_TEMPERATURE = 2e-4

JANUS_SETTINGS = {"grid_resolution": GRID_RESOLUTION, "grid_bound": GRID_BOUND, "opaque_alpha": OPAQUE_ALPHA,
                  "min_marker_voxels": MIN_MARKER_VOXELS, "marker_link": MARKER_LINK,
                  "marker_tolerance": MARKER_TOLERANCE, "dark_channel": DARK_CHANNEL,
                  "view_elevation": VIEW_ELEVATION, "view_azimuth_step": VIEW_STEP, "view_resolution": VIEW_RESOLUTION,
                  "front_azimuth": FRONT_AZIMUTH, "back_azimuth": BACK_AZIMUTH, "mi_temperature": MI_TEMPERATURE}


# ---- marker voxels ------------------------------------------------------------------------------

def normalised_colour(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colours ``[...,3]`` divided by their largest channel (grey shading cancels), and that channel."""
    rgb = np.asarray(rgb, dtype=np.float64)
    peak = rgb.max(axis=-1)
    return rgb / np.maximum(peak, 1e-12)[..., None], peak


def marker_mask(colour: np.ndarray, marker, body, tolerance: float = MARKER_TOLERANCE) -> np.ndarray:
    """Which colours ``[...,3]`` (shaded or not) are the marker's: after normalising by the largest
    channel, within ``tolerance`` (Euclidean) of the marker and nearer to it than to the body;
    never a colour whose largest channel is below ``DARK_CHANNEL``."""
    norm, peak = normalised_colour(colour)
    marker_n, _ = normalised_colour(np.asarray(marker, dtype=np.float64))
    body_n, _ = normalised_colour(np.asarray(body, dtype=np.float64))
    d_marker = np.linalg.norm(norm - marker_n, axis=-1)
    d_body = np.linalg.norm(norm - body_n, axis=-1)
    return (peak >= DARK_CHANNEL) & (d_marker <= tolerance) & (d_marker < d_body)


def shell(opaque: np.ndarray) -> np.ndarray:
    """Opaque voxels with at least one non-opaque 6-neighbour (outside the grid counts as empty),
    once enclosed cavities are filled: the voxels that can be seen from outside."""
    six = ndimage.generate_binary_structure(3, 1)
    solid = ndimage.binary_fill_holes(opaque, structure=six)
    return solid & ~ndimage.binary_erosion(solid, structure=six, border_value=0)


def marker_parts(alpha: np.ndarray, colour: np.ndarray, marker, body) -> list[int]:
    """The sizes (in marker voxels, largest first) of the parts of at least ``MIN_MARKER_VOXELS``
    marker-coloured shell voxels of the grid ``alpha [R,R,R]``, ``colour [R,R,R,3]``: 26-connected
    components once gaps of up to ``2 * MARKER_LINK`` voxels are bridged."""
    surface = shell(np.asarray(alpha) > OPAQUE_ALPHA)
    found = surface & marker_mask(colour, marker, body)
    cube = np.ones((3, 3, 3), dtype=bool)
    linked = ndimage.binary_dilation(found, structure=cube, iterations=MARKER_LINK)
    labels, n = ndimage.label(linked, structure=cube)
    sizes = np.bincount(labels[found], minlength=n + 1)[1:]  # marker voxels per linked part
    return sorted((int(v) for v in sizes if v >= MIN_MARKER_VOXELS), reverse=True)


def count_markers(alpha: np.ndarray, colour: np.ndarray, marker, body) -> int:
    """The number of :func:`marker_parts`."""
    return len(marker_parts(alpha, colour, marker, body))


def grid_points(bound: float, resolution: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The points ``[R,R,R,3]`` of the grid ``linspace(-bound, bound, R)`` per axis, indexed ``[x,y,z]``."""
    lin = torch.linspace(-bound, bound, resolution, dtype=dtype, device=device)
    return torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1)


@torch.no_grad()
def truth_opacity_grid(truth, bound: float = GRID_BOUND, resolution: int = GRID_RESOLUTION):
    """The truth on the grid: ``alpha`` 1 inside (SDF < 0) and 0 outside, colour ``albedo_at``."""
    points = grid_points(bound, resolution, torch.float64)
    return (truth.sdf(points) < 0).double(), truth.albedo_at(points)


def front_marker_parts(representation, truth) -> list[int] | None:
    """:func:`marker_parts` of a representation on the metrics' grid (None when it has no
    ``opacity_grid``); ``front_markers`` is their number."""
    try:
        alpha, colour = representation.opacity_grid(GRID_BOUND, GRID_RESOLUTION)
    except NotImplementedError:
        return None
    return marker_parts(_numpy(alpha), _numpy(colour), truth.marker_colour, truth.albedo)


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t)


# ---- views --------------------------------------------------------------------------------------

def janus_cameras(distance: float, fovy: float, yaw: float = 0.0) -> Cameras:
    """The ``VIEW_AZIMUTHS`` at ``VIEW_ELEVATION`` over white; ``yaw`` is added to each azimuth."""
    az = [a + yaw for a in VIEW_AZIMUTHS]
    return Cameras.from_angles([VIEW_ELEVATION] * len(az), az, distance, fovy, (1.0, 1.0, 1.0))


def view_mse(run_rgb: np.ndarray, true_rgb: np.ndarray) -> np.ndarray:
    """``MSE_ij`` ``[N,M]`` between run view i and truth view j (means over pixels and channels)."""
    a = run_rgb.reshape(len(run_rgb), -1)
    b = true_rgb.reshape(len(true_rgb), -1)
    return np.stack([((b - row) ** 2).mean(1) for row in a])  # exact: 0 for identical views


def _wrap(azimuth) -> np.ndarray:
    """Azimuths in degrees, wrapped into (-180, 180]."""
    a = (np.asarray(azimuth, dtype=np.float64) + 180.0) % 360.0 - 180.0
    return np.where(a == -180.0, 180.0, a)


def janus_view_rate(mse: np.ndarray, azimuths=VIEW_AZIMUTHS) -> float:
    """The share of back views (``|azimuth| >= BACK_AZIMUTH``) whose best match (least MSE) is a
    front view (``|azimuth| <= FRONT_AZIMUTH``)."""
    az = np.abs(_wrap(azimuths))
    back = az >= BACK_AZIMUTH
    matched = az[np.argmin(mse, axis=1)]
    return float((matched[back] <= FRONT_AZIMUTH).mean())


def view_mutual_information(mse: np.ndarray, temperature: float = MI_TEMPERATURE) -> float:
    """The mutual information of run view and matched truth view, ``p(j|i) = softmax_j(-MSE_ij / T)``,
    over a uniform run view, divided by ``ln M`` (M truth views): in [0, 1]."""
    logits = -np.asarray(mse, dtype=np.float64) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)

    def entropy(q):
        return -(q * np.log(np.where(q > 0, q, 1.0))).sum(-1)

    return float((entropy(p.mean(0)) - entropy(p).mean()) / math.log(mse.shape[1]))


def psnr_from_mse(mse: np.ndarray) -> np.ndarray:
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


def back_front_psnr_gap(mse: np.ndarray, azimuths=VIEW_AZIMUTHS) -> float:
    """Mean PSNR of the back views minus that of the front views, each against the truth's view at
    the same azimuth (the diagonal of ``mse``)."""
    az = np.abs(_wrap(azimuths))
    psnr = psnr_from_mse(np.diagonal(mse))
    return float(psnr[az >= BACK_AZIMUTH].mean() - psnr[az <= FRONT_AZIMUTH].mean())


def colour_shift(mse: np.ndarray) -> int:
    """The turn, in view steps, that best lines the run's views up with the truth's by colour:
    the cyclic shift ``k`` whose pairs (run view ``i + k``, truth view ``i``) have the highest mean
    PSNR; the smallest turn among equals. The mask IoU's yaw cannot tell a house's front from its
    back or sides (their silhouettes are alike); the marker's colour can."""
    n = mse.shape[0]
    index = np.arange(n)
    scores = [psnr_from_mse(mse[(index + k) % n, index]).mean() for k in range(n)]
    best = max(scores)
    return min((k for k in range(n) if scores[k] >= best - 1e-9), key=lambda k: min(k, n - k))


def janus_metrics(representation, truth, distance: float, fovy: float, yaw: float = 0.0,
                  size: int = VIEW_RESOLUTION) -> dict:
    """Every Janus metric of a representation against a truth with a front (see the module
    docstring); ``yaw`` turns the run onto the truth as in ``evaluate.held_out_cameras``."""
    true_rgb = truth.render(janus_cameras(distance, fovy), size, size)[0].double().numpy()
    # Not quantised to 8 bits: the matches compare views that may differ by little.
    run_rgb = render_views(representation, janus_cameras(distance, fovy, yaw), size, chunk=8,
                           quantise=False)[0].astype(np.float64)
    mse = view_mse(run_rgb, true_rgb)
    shift = colour_shift(mse)
    mse = np.roll(mse, -shift, axis=0)  # run view i + shift now sits beside truth view i
    truth_mse = view_mse(true_rgb, true_rgb)
    parts = front_marker_parts(representation, truth)
    matched = np.argmin(mse, axis=1)
    psnr = psnr_from_mse(np.diagonal(mse))
    return {
        "front_markers": None if parts is None else len(parts),
        "janus": None if parts is None else len(parts) >= 2,
        "front_marker_voxels": parts,
        "front_marker_voxels_truth": marker_parts(*(_numpy(g) for g in truth_opacity_grid(truth)), truth.marker_colour,
                                                  truth.albedo),
        "janus_yaw_degrees": float(_wrap(yaw + VIEW_STEP * shift)),
        "janus_view_rate": janus_view_rate(mse),
        "view_mi": view_mutual_information(mse),
        "view_mi_truth": view_mutual_information(truth_mse),
        "back_front_psnr_gap": back_front_psnr_gap(mse),
        "janus_views": [{"azimuth": a, "matched_azimuth": VIEW_AZIMUTHS[int(j)], "psnr": float(p)}
                        for a, j, p in zip(VIEW_AZIMUTHS, matched, psnr)],
        "janus_settings": dict(JANUS_SETTINGS),
    }
